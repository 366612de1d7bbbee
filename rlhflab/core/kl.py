"""Per-token estimators of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). With
log r = ref_logp - logp for a token x ~ pi:
    k1 = -log r                 unbiased, high variance, can be negative
    k2 = 1/2 (log r)^2          biased (exact to second order), low variance, >= 0
    k3 = (r - 1) - log r        unbiased, low variance, >= 0   (GRPO's KL penalty, DeepSeekMath eq. 4)
Shapes: logp, ref_logp [...] -> [...] (elementwise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

KLEstimator = Callable[[Tensor, Tensor], Tensor]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp - ref_logp (Schulman 2020); its mean over x ~ pi is exactly KL(pi || pi_ref)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 1/2 (logp - ref_logp)^2 (Schulman 2020); biased, but close when pi ~ pi_ref."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1 (Schulman 2020); unbiased and >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def get_kl_estimator(name: str) -> KLEstimator:
    """The KL estimator called `name`; ValueError listing the valid names otherwise."""
    if name not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}")
    return KL_ESTIMATORS[name]

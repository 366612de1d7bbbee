"""PPO/GRPO token losses and the one contract for turning token losses into a scalar.

Aggregation and gradient accumulation. A training step may see its batch in several micro-batches. Every
mode is a ratio numerator / denominator whose parts are *sums* over sequences or tokens, so

    aggregate(full batch) == sum_k numerator_k / sum_k denominator_k

over micro-batches k (tested exactly). The training loop asks each micro-batch for its parts
(`return_parts=True`), totals the denominators of the whole accumulated batch first (they depend only
on the masks), and backpropagates numerator_k / denominator_total; the gradients then add up to the
full-batch gradient whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhflab.core.kl import kl_k3

# (token_losses [B, T], mask [B, T], max_tokens) -> (numerator, denominator), both 0-dim
Aggregation = Callable[[Tensor, Tensor, "int | None"], tuple[Tensor, Tensor]]


def _token_mean_parts(token_losses: Tensor, mask: Tensor, max_tokens: int | None) -> tuple[Tensor, Tensor]:
    """DAPO (Yu et al. 2025, eq. 8): sum of all token losses / number of tokens in the batch."""
    m = mask.to(token_losses.dtype)
    return (token_losses * m).sum(), m.sum()


def _seq_mean_token_mean_parts(
    token_losses: Tensor, mask: Tensor, max_tokens: int | None
) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024, eq. 3): mean over each sequence's tokens, then mean over sequences.
    Sequences without any token are not counted."""
    m = mask.to(token_losses.dtype)
    lengths = m.sum(dim=-1)  # [B]
    per_seq = (token_losses * m).sum(dim=-1) / lengths.clamp(min=1)  # [B]
    return per_seq.sum(), (lengths > 0).to(token_losses.dtype).sum()


def _seq_mean_token_sum_norm_parts(
    token_losses: Tensor, mask: Tensor, max_tokens: int | None
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3): each sequence's token sum
    divided by a constant max_tokens (not its own length), then mean over sequences with any token."""
    if max_tokens is None:
        raise ValueError("seq_mean_token_sum_norm needs max_tokens (a constant, e.g. max_new_tokens)")
    m = mask.to(token_losses.dtype)
    per_seq = (token_losses * m).sum(dim=-1) / max_tokens  # [B]
    return per_seq.sum(), (m.sum(dim=-1) > 0).to(token_losses.dtype).sum()


LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": _token_mean_parts,
    "seq_mean_token_mean": _seq_mean_token_mean_parts,
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm_parts,
}


def aggregate(
    token_losses: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    max_tokens: int | None = None,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reduce token losses [B, T] over the mask [B, T] to a scalar, by `mode` (see LOSS_AGGREGATIONS).

    token_mean:              sum_{b,t} m l / sum_{b,t} m
    seq_mean_token_mean:     (1/B') sum_b [ sum_t m l / sum_t m ]
    seq_mean_token_sum_norm: (1/B') sum_b [ sum_t m l / max_tokens ]
    (B' = sequences with at least one token.) With return_parts=True returns (numerator, denominator) so
    micro-batch parts can be summed before dividing (see the module docstring). An empty batch gives 0.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(sorted(LOSS_AGGREGATIONS))}")
    numerator, denominator = LOSS_AGGREGATIONS[mode](token_losses, mask, max_tokens)
    if return_parts:
        return numerator, denominator
    return numerator / denominator.clamp(min=1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum_{b,t} m x / sum_{b,t} m: the mean of x over the masked tokens (0 when none is). [B, T] -> 0-dim."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def ppo_clip_token_losses(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> Tensor:
    """Per-token clipped surrogate (Schulman et al. 2017, "PPO", eq. 7), negated to a loss:

        rho = exp(logp - old_logp)
        l   = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))

    eps_high = clip_eps_high or clip_eps (DAPO's "clip-higher", Yu et al. 2025, eq. 10).
    Shapes: all [B, T] -> [B, T].
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + eps_high)
    return torch.maximum(unclipped, clipped)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`ppo_clip_token_losses` [B, T] and, in the same call, its statistics over the mask.

    stats (detached 0-dim tensors, token means over the mask; the metric names PPO and GRPO log):
      clip_ratio/low     fraction of tokens with rho < 1 - eps_low and A < 0 (clip binding from below)
      clip_ratio/high    fraction of tokens with rho > 1 + eps_high and A > 0 (clip binding from above)
      clip_ratio/region  fraction of tokens where the clipped term is the larger loss (gradient cut)
      ratio              mean rho
      approx_kl          mean k3 estimate of KL(pi_old || pi) (samples come from pi_old)
    Shapes: logp, old_logp, response_mask [B, T]; advantages [B, T] or [B, 1] (one per sequence).
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.expand_as(logp)
    token_losses = ppo_clip_token_losses(logp, old_logp, advantages, clip_eps, clip_eps_high)
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        low = ((ratio < 1 - clip_eps) & (advantages < 0)).to(logp.dtype)
        high = ((ratio > 1 + eps_high) & (advantages > 0)).to(logp.dtype)
        stats = {
            "clip_ratio/low": masked_mean(low, response_mask),
            "clip_ratio/high": masked_mean(high, response_mask),
            "clip_ratio/region": masked_mean((token_losses > -advantages * ratio).to(logp.dtype), response_mask),
            "ratio": masked_mean(ratio, response_mask),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), response_mask),
        }
    return token_losses, stats


def sequence_level_logps(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence importance ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 7),
    expressed as log-probs for `ppo_clip_token_losses`:

        s_i = exp( mean_{t in y_i} (logp_t - old_logp_t) )        one ratio per sequence
        returned: old_logp + log s_i on every token, so exp(returned - old_logp) = s_i

    The gradient reaches every token's logp through the mean. Shapes: [B, T] -> [B, T].
    """
    m = mask.to(logp.dtype)
    mean_log_ratio = ((logp - old_logp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return old_logp + mean_log_ratio


def value_token_losses(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float | None = 0.2
) -> Tensor:
    """Per-token clipped value loss (PPO2 baselines; Ouyang et al. 2022 / TRL PPOTrainer):

        V_clip = old_V + clip(V - old_V, -c, c)
        l      = 1/2 max((V - R)^2, (V_clip - R)^2)       (1/2 (V - R)^2 when clip_range is None)
    Shapes: all [B, T] -> [B, T].
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * unclipped
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * torch.maximum(unclipped, (clipped_values - returns) ** 2)


def clipped_value(
    values: Tensor, old_values: Tensor, returns: Tensor, response_mask: Tensor, clip_range: float | None = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """`value_token_losses` [B, T] and, in the same call, `value/clip_frac`: the fraction of masked tokens where
    the clipped error is the larger one (TRL's `val/clipfrac`)."""
    token_losses = value_token_losses(values, old_values, returns, clip_range)
    with torch.no_grad():
        clipped_larger = token_losses > 0.5 * (values - returns) ** 2
        stats = {"value/clip_frac": masked_mean(clipped_larger.to(values.dtype), response_mask)}
    return token_losses, stats

"""Preference losses: the DPO family (named and numbered as TRL names them), SimPO, ORPO, Bradley-Terry.

Every DPO-family loss is a function of the two log-ratios
    h_c = log pi(y_c | x) - log pi_ref(y_c | x),    h_r = log pi(y_r | x) - log pi_ref(y_r | x)
and returns one loss per pair ([B]). The implicit rewards are r = beta * h, detached (TRL's
`rewards/chosen`, `rewards/rejected`).

Parity: with the same inputs these give TRL 1.16's `DPOTrainer` numbers (reverse-KL, no weighting,
no `ld_alpha`) for every name in `DPO_LOSSES`; see tests/test_losses.py. Two documented differences:
  * `sigmoid` with label_smoothing > 0 is conservative DPO (cDPO) as in TRL < 1.0; TRL 1.16 ignores
    label_smoothing for `sigmoid`. At label_smoothing = 0 the numbers are identical.
  * `bco_pair` takes its reward shift delta as an explicit argument (`bco_delta`). TRL < 1.0 and the BCO
    paper use a running mean of past rewards; TRL 1.16 uses delta = 0, the default here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# (h_c [B], h_r [B], beta, eps = label_smoothing, delta = bco_delta) -> losses [B]
DPOLossFn = Callable[[Tensor, Tensor, float, float, "float | Tensor"], Tensor]


def sigmoid_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), conservative when eps > 0.

    loss = -(1 - eps) log sigmoid(beta (h_c - h_r)) - eps log sigmoid(-beta (h_c - h_r))
    (cDPO: Mitchell 2023, "A note on DPO with noisy preferences"; eps = label_smoothing.)
    """
    logits = beta * (h_c - h_r)
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def hinge_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, "SLiC-HF", eq. 2, margin 1 / beta): loss = relu(1 - beta (h_c - h_r))."""
    return torch.relu(1 - beta * (h_c - h_r))


def ipo_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, tau = beta): loss = (h_c - h_r - 1 / (2 beta))^2.

    TRL applies it to per-token-averaged log-ratios; `dpo_loss` does that when given lengths.
    """
    return (h_c - h_r - 1 / (2 * beta)) ** 2


def robust_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 9), eps = label_smoothing in [0, 0.5):

    loss = (-(1 - eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps),  d = h_c - h_r.
    """
    logits = beta * (h_c - h_r)
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


def exo_pair_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """EXO, pairwise (Ji et al. 2024, "Towards Efficient Exact Optimization of LM Alignment", eq. 16):
    KL(q || p) over {chosen, rejected}, q = softmax(beta h), p = [1 - eps, eps], eps = label_smoothing > 0.

    loss = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps),  q_w = sigmoid(beta d), q_l = sigmoid(-beta d).
    """
    logits = beta * (h_c - h_r)
    eps_t = torch.as_tensor(eps, dtype=logits.dtype, device=logits.device)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps_t))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps_t))
    return chosen_term + rejected_term


def nca_pair_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """NCA, pairwise (Chen et al. 2024, "Noise Contrastive Alignment of LMs with Explicit Rewards", eq. 12):

    loss = -log sigmoid(beta h_c) - 1/2 log sigmoid(-beta h_c) - 1/2 log sigmoid(-beta h_r).
    """
    r_c, r_r = beta * h_c, beta * h_r
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


def bco_pair_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """BCO, pairwise (Jung et al. 2024, "Binary Classifier Optimization for LLM Alignment", eq. 7):

    loss = -log sigmoid(beta h_c - delta) - log sigmoid(-(beta h_r - delta)).
    The BCO paper (and TRL < 1.0) sets delta to a running mean of past rewards beta h; TRL 1.16 uses 0.
    Here delta is the caller's choice (`dpo_loss(..., bco_delta=)`, default 0 = TRL 1.16).
    """
    r_c, r_r = beta * h_c, beta * h_r
    return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


def sppo_hard_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7 with
    P(winner) = 1, P(loser) = 0): loss = (h_c - 1 / (2 beta))^2 + (h_r + 1 / (2 beta))^2.
    """
    return (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2


def apo_zero_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7): raise chosen,
    lower rejected.  loss = 1 - sigmoid(beta h_c) + sigmoid(beta h_r).
    """
    return 1 - torch.sigmoid(beta * h_c) + torch.sigmoid(beta * h_r)


def apo_down_loss(h_c: Tensor, h_r: Tensor, beta: float, eps: float, delta: float | Tensor) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, rejected more.
    loss = sigmoid(beta h_c) + 1 - sigmoid(beta (h_c - h_r)).
    """
    return torch.sigmoid(beta * h_c) + 1 - torch.sigmoid(beta * (h_c - h_r))


DPO_LOSSES: dict[str, DPOLossFn] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
}


def get_dpo_loss(name: str) -> DPOLossFn:
    """The DPO-family loss called `name`; ValueError listing the valid names otherwise."""
    if name not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type {name!r}; valid: {', '.join(sorted(DPO_LOSSES))}")
    return DPO_LOSSES[name]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    bco_delta: float | Tensor = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family loss per pair, with the implicit rewards.

    h_c = policy_chosen_logps - ref_chosen_logps, h_r likewise; losses = DPO_LOSSES[loss_type](h_c, h_r, ...);
    chosen_rewards = beta * h_c, rejected_rewards = beta * h_r (detached).

    Inputs are summed sequence log-probs ([B] each). `chosen_lengths` / `rejected_lengths` ([B], response
    token counts) are used by `ipo` only, which then works on h / length as TRL 1.16 does; without them
    `ipo` uses the summed log-ratios (the paper's form). `bco_delta` is the BCO reward shift.
    `label_smoothing` is eps for `sigmoid` (cDPO), `robust` (in [0, 0.5)) and `exo_pair` (> 0).

    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    loss_fn = get_dpo_loss(loss_type)
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {label_smoothing}"
        )
    h_c = policy_chosen_logps - ref_chosen_logps  # [B]
    h_r = policy_rejected_logps - ref_rejected_logps  # [B]
    if loss_type == "ipo" and chosen_lengths is not None and rejected_lengths is not None:
        losses = loss_fn(
            h_c / chosen_lengths.clamp(min=1), h_r / rejected_lengths.clamp(min=1), beta, 0.0, 0.0
        )
    else:
        losses = loss_fn(h_c, h_r, beta, label_smoothing, bco_delta)
    return losses, beta * h_c.detach(), beta * h_r.detach()


def simpo_loss(
    policy_chosen_logps_avg: Tensor,
    policy_rejected_logps_avg: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    Reference-free, on length-normalised log-probs a = (1/|y|) log pi(y | x):
        loss = -(1 - eps) log sigmoid(beta (a_c - a_r) - gamma) - eps log sigmoid(-(beta (a_c - a_r) - gamma))
    gamma is the target reward margin (TRL CPOConfig.simpo_gamma; the paper often quotes gamma / beta).
    Same numbers as TRL's CPOTrainer with loss_type="simpo" (cpo_alpha = 0, alpha = 0).

    Returns (losses [B], chosen_rewards = beta a_c, rejected_rewards = beta a_r), rewards detached.
    """
    logits = beta * (policy_chosen_logps_avg - policy_rejected_logps_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * policy_chosen_logps_avg.detach(), beta * policy_rejected_logps_avg.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(policy_chosen_logps_avg: Tensor, policy_rejected_logps_avg: Tensor) -> Tensor:
    """log [odds(y_c) / odds(y_r)] with odds(y) = P(y) / (1 - P(y)), P(y) = exp(average log-prob).

    = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r))). Shapes [B] -> [B].
    """
    a_c, a_r = policy_chosen_logps_avg, policy_rejected_logps_avg
    return (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))


def orpo_loss(
    policy_chosen_logps_avg: Tensor,
    policy_rejected_logps_avg: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 6-7): loss_OR = -beta log sigmoid(log_odds_ratio(a_c, a_r)), on average log-probs a.

    The full ORPO objective is NLL(chosen) + mean(loss_OR). TRL's `ORPOTrainer.odds_ratio_loss` returns the
    negated term (beta log sigmoid(.)) and subtracts its mean; the numbers agree up to that sign.

    Returns (losses [B], chosen_rewards = beta a_c, rejected_rewards = beta a_r), rewards detached.
    """
    losses = -beta * F.logsigmoid(log_odds_ratio(policy_chosen_logps_avg, policy_rejected_logps_avg))
    return losses, beta * policy_chosen_logps_avg.detach(), beta * policy_rejected_logps_avg.detach()


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, "InstructGPT", eq. 1):

    loss = -log sigmoid(r_c - r_r - m), m = margin (Touvron et al. 2023, "Llama 2", eq. 2) or 0.
    Shapes: scores [B], margin [B] or None -> [B]. Same per-pair numbers as TRL's RewardTrainer.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)

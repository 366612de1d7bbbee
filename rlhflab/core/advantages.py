"""Advantage estimators: GAE over masked token sequences (PPO) and group-relative advantages (GRPO, RLOO).

Token-level tensors here live in the label-aligned frame of `core.logprobs.token_logps` ([B, T-1] for a
[B, T] batch): position t holds the reward, value and log-prob of the token predicted at t, and the mask
is `response_mask[:, 1:]`. Positions where the mask is 0 are skipped: they neither receive an advantage
nor pass one along.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(
    rewards: Tensor, values: Tensor, response_mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
    GAE", eq. 16) over the masked tokens of each sequence, bootstrapping 0 after the last one:

        delta_t = r_t + gamma V_{t'} - V_t          (t' = next masked position, V = 0 past the end)
        A_t     = delta_t + gamma lam A_{t'}
        R_t     = A_t + V_t                         (the value target)

    Masked-out positions (prompt, padding, holes) are skipped and get A = R = 0.
    Shapes: rewards, values, response_mask [B, T] -> (advantages [B, T], returns [B, T]).
    """
    mask = response_mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])  # [B]
    next_adv = torch.zeros_like(values[:, 0])  # [B]
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # On a masked-out position carry the later value and advantage through unchanged.
        next_value = m * values[:, t] + (1 - m) * next_value
        next_adv = m * adv + (1 - m) * next_adv
        advantages[:, t] = m * adv
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise x over its masked entries: (x - mean) / sqrt(var + eps), unbiased variance as in TRL's
    `masked_whiten`. With shift_mean=False the mean is added back (only the scale changes), as PPO does
    for rewards. Masked-out entries are returned as 0. Shapes: x, mask [B, T] -> [B, T].
    """
    m = mask.to(x.dtype)
    count = m.sum()
    mean = (x * m).sum() / count
    var = (((x - mean) ** 2) * m).sum() / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def group_reward_std(rewards: Tensor, group_size: int) -> Tensor:
    """Unbiased standard deviation of the rewards within each group of `group_size` consecutive completions.

    A group whose std is 0 (all completions scored alike) carries no GRPO learning signal: the
    `grpo.zero_std_groups` diagnostic and TRL's `frac_reward_zero_std` read this. Shapes: [N] -> [N / group_size].
    """
    return rewards.view(-1, group_size).std(dim=1)


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative outcome advantages (GRPO: Shao et al. 2024, "DeepSeekMath", eq. 3 / sec. 4.1.2).

    Completions come in consecutive groups of `group_size` sampled for the same prompt.
        A_i = (r_i - mean_group(r)) / (std + eps)
    with std the unbiased std of the group (scale_rewards="group", GRPO), of the whole batch ("batch",
    as in TRL and Liu et al. 2025's recommendation), or no division at all ("none", Dr. GRPO: Liu et al.
    2025, "Understanding R1-Zero-Like Training"). Same numbers as TRL's GRPOTrainer.
    Shapes: rewards [N] -> [N], N a multiple of group_size.
    """
    grouped = rewards.view(-1, group_size)  # [N / G, G]
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)
    elif scale_rewards == "batch":
        std = rewards.std()
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: batch, group, none")
    return centred / (std + eps)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Leave-one-out baseline (RLOO: Ahmadian et al. 2024, "Back to Basics", eq. 5):
    A_i = r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean_group(r)). Shapes: [N] -> [N].
    """
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)

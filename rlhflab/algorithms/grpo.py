"""GRPO: group-relative policy optimisation (Shao et al. 2024, "DeepSeekMath", sec. 4.1).

One step = one rollout batch:

    B prompts ─► k samples each (prompt prefilled once) ─► rewards r [B·k] (reward fn or reward model)
      ─► A_i = (r_i − mean_group r) / (std + eps)           (scale_rewards: group | batch | none)
             or RLOO: A_i = r_i − mean_{j≠i} r_j             (advantage_estimator: rloo)
      ─► reference log-probs (if beta > 0), old log-probs (if num_iterations > 1): packed forwards,
         each prompt computed once per group  [P | c1 | ... | ck]
      ─► num_iterations optimizer updates over the whole batch (grad_accum micro-batches each):
             ρ_t = exp(log π(y_t) − log π_old(y_t))     (GSPO, importance_sampling_level sequence:
                                                          ρ = exp(mean_t of that) for every token of y)
             ℓ_t = max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε_high)) + β k3(π, π_ref)_t
             loss = aggregate(ℓ, mask, loss_agg)     (seq_mean_token_mean | token_mean | seq_mean_token_sum_norm)
         mask: the completion tokens, less cut-off completions (mask_truncated_completions) and groups whose
         rewards all tie (drop_zero_std_groups), if asked for

With LoRA (`--lora-r`) the reference is the policy with its adapters off (models/lora.py), not a second model.
With num_iterations = 1 every rollout batch is used once, so π_old = π: the old log-probs are the
current forward's own values, detached (ρ = 1 exactly, the gradient is that of A · log π), and no
extra forward is spent on them. Log-probs are taken at the sampling temperature (as TRL does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlhflab.algorithms.rewards import RewardFn, reward_functions
from rlhflab.algorithms.rollout import (
    PromptPool,
    Rollout,
    RolloutConfig,
    SamplingSettings,
    example_completions,
    generate,
    pack,
    policy_logps,
    prompt_groups,
    reward_metrics,
    rollout_metrics,
    rows_of,
    score,
    start_rollout_run,
    step_seeds,
    train_rollout,
)
from rlhflab.config import opt
from rlhflab.core.advantages import group_advantages, group_reward_std, rloo_advantages
from rlhflab.core.causal_lm import attention_break_even
from rlhflab.core.kl import kl_k3
from rlhflab.core.policy_loss import aggregate, clipped_surrogate, masked_mean, sequence_level_logps
from rlhflab.diagnostics.rl import grpo_monitors
from rlhflab.models.lora import adapters_disabled, lora_from_config
from rlhflab.training import timing
from rlhflab.training.checks import stop_on_mask_mismatch
from rlhflab.training.loop import StepPlan, save_final_model
from rlhflab.training.sharding import plan_micro_batches


@dataclass
class GRPOConfig(RolloutConfig):
    beta: float = opt(0.04, "k3 KL-to-reference coefficient; 0: no reference model is loaded", minimum=0.0)
    clip_eps_high: float | None = opt(None, "ε_high (DAPO clip-higher, e.g. 0.28); default: clip_eps", minimum=0.0)
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = opt(
        "seq_mean_token_mean", "seq_mean_token_mean (GRPO) | token_mean (DAPO) | seq_mean_token_sum_norm (Dr. GRPO)")
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "divide centred rewards by the group's std, the batch's, or nothing")
    advantage_estimator: Literal["grpo", "rloo"] = opt(
        "grpo", "grpo: group-centred | rloo: r_i minus the mean of the other k−1 (Ahmadian et al. 2024)")
    num_iterations: int = opt(1, "optimizer updates per rollout batch (μ); > 1 computes old log-probs", minimum=1)
    mask_truncated_completions: bool = opt(False, "DAPO: completions that never emitted EOS are left out of the loss")
    importance_sampling_level: Literal["token", "sequence"] = opt(
        "token", "sequence: GSPO, one ratio per completion, its tokens' geometric mean")
    drop_zero_std_groups: bool = opt(
        False, "groups whose rewards all tie (advantage 0) are left out of the loss and its normalisation")


class GRPORecipe:
    """The `Recipe` of the shared loop: `plan_step` samples and scores, `loss` is the clipped surrogate."""

    progress_metrics = ("loss", "reward")  # shown beside the progress bar

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, prompts: list[Any], cfg: GRPOConfig, *,
                 reward_fn: RewardFn | Sequence[RewardFn] | None = None, reward_model: torch.nn.Module | None = None,
                 reference: torch.nn.Module | None = None, gold_fn: RewardFn | None = None,
                 prompt_columns: dict[str, list[Any]] | None = None):
        reward_fns = reward_functions(reward_fn, reward_model, cfg.reward_weights)  # summed with their weights
        if cfg.beta > 0 and reference is None:
            raise ValueError("beta > 0 needs a reference model")
        if cfg.group_size < 2:
            raise ValueError("GRPO needs group_size >= 2 (advantages are relative to the group)")
        self.model = policy
        self.break_even = attention_break_even(policy)  # weighs attention in the row layout (pack_groups)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.reward_fns, self.reward_model, self.reference, self.gold_fn = reward_fns, reward_model, reference, gold_fn
        self.pool = PromptPool(prompts, tokenizer, cfg.max_prompt_tokens, cfg.seed, prompt_columns)
        self.settings = SamplingSettings(cfg.max_new_tokens or 32, cfg.temperature, cfg.top_p, cfg.top_k)
        self.updates_per_step = cfg.num_iterations
        self._checked_mask = False

    def plan_step(self, step: int) -> StepPlan:
        cfg, k = self.cfg, self.cfg.group_size
        prompts, prompt_ids, columns = self.pool.take(cfg.batch_size)
        seeds = step_seeds(cfg.seed, step, len(prompts))
        with timing.phase("sample"):
            rollout = generate(self.model, self.tokenizer, prompts, prompt_ids, k, self.settings, seeds, columns)
        with timing.phase("score"):
            rewards, parts = score(rollout, self.reward_fns, self.reward_model, self.tokenizer.pad_token_id,
                                   cfg.reward_weights)  # [N], and each reward function's [N]
        if cfg.advantage_estimator == "rloo":
            advantages = rloo_advantages(rewards, k)  # [N]
        else:
            advantages = group_advantages(rewards, k, cfg.scale_rewards)  # [N]
        in_loss = torch.ones(len(rewards), dtype=torch.bool)  # [N] completions that count in the loss
        if cfg.mask_truncated_completions:  # DAPO (Yu et al. 2025, sec. 3.4): cut-off text is no evidence
            in_loss &= ~rollout.truncated
        if cfg.drop_zero_std_groups:  # DAPO's filter without the resampling: tied groups only dilute the mean
            in_loss &= (group_reward_std(rewards, k) > 1e-6).repeat_interleave(k)
        plan = plan_micro_batches(list(range(len(prompts))), cfg.grad_accum)  # prompts of each micro-batch
        micro_batches = [self._micro_batch(rollout, groups, advantages, in_loss, with_forwards=mine)
                         for groups, mine in plan]
        if not self._checked_mask:  # logps.mask_mismatch on the run's first micro-batch
            self._checked_mask = True
            stop_on_mask_mismatch(cfg.out, micro_batches[0]["packed"], prompt_groups(rollout, plan[0][0]))
        metrics = {**rollout_metrics(rollout, rewards, self.gold_fn), **reward_metrics(parts)}
        samples = example_completions(rollout, rewards, cfg.log_completions, advantage=advantages)
        num_tokens = sum(mb["packed"].num_tokens for mb in micro_batches)
        return StepPlan([micro_batches] * cfg.num_iterations, metrics, samples, num_tokens)

    @torch.no_grad()
    def _micro_batch(self, rollout: Rollout, groups: list[int], advantages: torch.Tensor, in_loss: torch.Tensor,
                     with_forwards: bool) -> dict[str, Any]:
        """Packed rows of these prompts' groups, their advantages and the fixed log-probs (old, reference).

        Under torchrun another process trains on some micro-batches: for those, only `num_items` is used
        (to normalise the loss), so their forwards are skipped.
        """
        packed = pack(rollout, groups, self.tokenizer.pad_token_id, self.cfg.packed_row_tokens, self.break_even)
        rows = rows_of(groups, rollout.group_size)
        old_logps = ref_logps = None
        if with_forwards and self.cfg.num_iterations > 1:
            with timing.phase("old_logps", self.model, packed.num_tokens):
                old_logps = policy_logps(self.model, packed, self.cfg.temperature)[0]
        if with_forwards and self.cfg.beta > 0:
            with timing.phase("reference", self.reference, packed.num_tokens), adapters_disabled(self.reference):
                ref_logps = policy_logps(self.reference, packed, self.cfg.temperature)[0]
        in_loss = in_loss[rows]  # [n]
        lengths = packed.completion_lengths * in_loss
        num_items = int(lengths.sum()) if self.cfg.loss_agg == "token_mean" else int((lengths > 0).sum())
        return {"packed": packed, "advantages": advantages[rows], "old_logps": old_logps,
                "ref_logps": ref_logps, "in_loss": in_loss, "num_items": num_items}

    def loss(self, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        timing.count_flops(self.model, mb["packed"].num_tokens, backward=True)
        logps, mask, entropy = policy_logps(self.model, mb["packed"], cfg.temperature, with_entropy=True)  # [n, T]
        mask = mask & mb["in_loss"][:, None].to(mask.device)
        old_logps = logps.detach() if mb["old_logps"] is None else mb["old_logps"]
        advantages = mb["advantages"][:, None].expand_as(logps)  # one advantage per completion
        ratio_logps = logps  # whose ratio to old_logps is clipped: each token's, or (GSPO) its sequence's
        if cfg.importance_sampling_level == "sequence":
            ratio_logps = sequence_level_logps(logps, old_logps, mask)
        token_losses, stats = clipped_surrogate(ratio_logps, old_logps, advantages, mask, cfg.clip_eps,
                                                cfg.clip_eps_high)
        metrics = {name: value.item() for name, value in stats.items()}
        if cfg.beta > 0:
            kl = kl_k3(logps, mb["ref_logps"])  # DeepSeekMath eq. 4
            token_losses = token_losses + cfg.beta * kl
            metrics["kl"] = masked_mean(kl.detach(), mask).item()
        metrics["entropy"] = masked_mean(entropy.detach(), mask).item()
        numerator, _ = aggregate(token_losses, mask, cfg.loss_agg, self.settings.max_new_tokens, return_parts=True)
        return numerator, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.pool.sampler.state_dict()}  # sampling is seeded by the step: no state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.sampler.load_state_dict(state["prompts"])


def run_grpo(cfg: GRPOConfig, policy: torch.nn.Module, tokenizer: Any, prompts: list[Any], *,
             reward_fn: RewardFn | Sequence[RewardFn] | None = None, reward_model: torch.nn.Module | None = None,
             reference: torch.nn.Module | None = None, gold_fn: RewardFn | None = None,
             prompt_columns: dict[str, list[Any]] | None = None) -> Path:
    """Train `policy` with GRPO into `cfg.out`; returns the saved model folder.

    `prompt_columns`: the prompt data's other fields ({name: one value per prompt}), for the reward function.
    With LoRA (cfg.lora_r > 0) the reference is `policy` with its adapters off; `reference` is not used (pass None)."""
    out = start_rollout_run(cfg, reward_model, None if cfg.lora_r else reference)
    policy = lora_from_config(policy, cfg)  # after the run's seeding: the adapters' initialisation is the seed's
    if cfg.lora_r:
        reference = policy if cfg.beta > 0 else None
    recipe = GRPORecipe(policy, tokenizer, prompts, cfg, reward_fn=reward_fn, reward_model=reward_model,
                        reference=reference, gold_fn=gold_fn, prompt_columns=prompt_columns)
    train_rollout(cfg, recipe, grpo_monitors(has_gold=gold_fn is not None))
    return save_final_model(policy, tokenizer, out)

"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022; the N+ implementation details of
Huang et al. 2024, as in TRL's former PPOTrainer).

One step = one rollout batch:

    B prompts ─► k samples each ─► score s = r(x, y) at the last token (reward model or reward fn),
                                     minus missing_eos_penalty when the completion has no EOS
      ─► no-grad packed forwards: old log-probs (policy), reference log-probs, values V(s_t)
      ─► per-token reward  r_t = −β · KL_t  (+ s on the last token),   KL_t = k1 = log π_old − log π_ref
      ─► GAE(γ, λ) over the completion tokens ─► advantages (whitened over the batch), returns
      ─► ppo_epochs × num_minibatches optimizer updates, each on a minibatch of prompts:
             loss = token_mean( max(−A ρ, −A clip(ρ, 1 ± ε)) ) + vf_coef · token_mean( ½ max((V−R)², (V_clip−R)²) )
      ─► adaptive KL controller (optional):  β ← β (1 + clip(KL/target − 1, ±0.2) · B·k / horizon)

The policy and the value model are trained together (one optimizer over both, as the loop's `model`);
the reference and the reward model are frozen. With LoRA (`--lora-r`) both the policy and the value model get
adapters (the value model's `score` head trains whole, as OpenRLHF's critic with --lora_rank does): a fully
trained value model would keep a full optimizer state, the memory LoRA is there to save; the reference is the
policy with its adapters off (models/lora.py), not a second model. Minibatches are fixed per rollout batch and visited in a
new order every epoch, so the first update sees exactly the rows its old log-probs were computed on
(ratio 1 to the bit).
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
    RolloutConfig,
    SamplingSettings,
    example_completions,
    generate,
    pack,
    packed_values,
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
from rlhflab.core.advantages import gae, whiten
from rlhflab.core.causal_lm import attention_break_even
from rlhflab.core.kl import get_kl_estimator
from rlhflab.core.packing import completion_mask
from rlhflab.core.policy_loss import aggregate, clipped_surrogate, clipped_value, masked_mean
from rlhflab.diagnostics.rl import ppo_monitors
from rlhflab.models.lora import adapters_disabled, lora_from_config, save_model
from rlhflab.training import timing
from rlhflab.training.checks import stop_on_mask_mismatch
from rlhflab.training.data_order import chunks
from rlhflab.training.loop import StepPlan, save_final_model
from rlhflab.training.sharding import assemble_rows, check_divisible, plan_micro_batches


@dataclass
class PPOConfig(RolloutConfig):
    batch_size: int = 16
    group_size: int = 1
    kl_coef: float = opt(0.05, "β of the per-token KL penalty in the reward (initial value when adaptive)", minimum=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k1", "per-token KL estimator in the reward (core/kl.py)")
    adaptive_kl: bool = opt(False, "adapt β towards target_kl (Ziegler et al. 2019)")
    target_kl: float = opt(6.0, "adaptive controller: target KL per completion (nats)", minimum=0.0)
    kl_horizon: int = opt(10000, "adaptive controller: horizon in completions", minimum=1)
    ppo_epochs: int = opt(4, "passes over each rollout batch", minimum=1)
    num_minibatches: int = opt(1, "optimizer updates per pass", minimum=1)
    clip_value: float = opt(0.2, "value clip around the rollout's values", minimum=0.0)
    vf_coef: float = opt(0.1, "weight of the value loss", minimum=0.0)
    gamma: float = opt(1.0, "GAE discount", minimum=0.0, maximum=1.0)
    lam: float = opt(0.95, "GAE λ", minimum=0.0, maximum=1.0)
    whiten_rewards: bool = opt(False, "whiten per-token rewards (scale only) before GAE")
    missing_eos_penalty: float | None = opt(None, "subtracted from the score of completions without EOS")
    value_init: Literal["reward_model", "policy"] = opt(
        "reward_model", "where the value model's weights come from (policy: also when there is no reward model)")


class KLController:
    """β of the KL penalty: fixed, or adaptive (Ziegler et al. 2019, sec. 2.2):
    e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon), n = completions this step."""

    def __init__(self, value: float, target: float | None = None, horizon: int = 10000):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n / self.horizon


class PPORecipe:
    progress_metrics = ("loss", "reward")  # shown beside the progress bar

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module, reference: torch.nn.Module,
                 tokenizer: Any, prompts: list[Any], cfg: PPOConfig, *,
                 reward_fn: RewardFn | Sequence[RewardFn] | None = None, reward_model: torch.nn.Module | None = None,
                 gold_fn: RewardFn | None = None, prompt_columns: dict[str, list[Any]] | None = None):
        reward_fns = reward_functions(reward_fn, reward_model, cfg.reward_weights)  # summed with their weights
        self.policy, self.value_model, self.reference = policy, value_model, reference
        self.model = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # everything the optimizer trains
        self.tokenizer, self.cfg = tokenizer, cfg
        self.break_even = attention_break_even(policy)  # weighs attention in the row layout (pack_groups)
        self.reward_fns, self.reward_model, self.gold_fn = reward_fns, reward_model, gold_fn
        self.kl_estimator = get_kl_estimator(cfg.kl_estimator)
        self.pool = PromptPool(prompts, tokenizer, cfg.max_prompt_tokens, cfg.seed, prompt_columns)
        self.settings = SamplingSettings(cfg.max_new_tokens or 32, cfg.temperature, cfg.top_p, cfg.top_k)
        self.shuffle = torch.Generator().manual_seed(cfg.seed + 1)  # minibatch order
        self.kl_ctl = KLController(cfg.kl_coef, cfg.target_kl if cfg.adaptive_kl else None, cfg.kl_horizon)
        self.updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
        self._checked_mask = False
        check_divisible(cfg.batch_size, cfg.num_minibatches * cfg.grad_accum,
                        f"each of the {cfg.num_minibatches} minibatches must split into grad_accum ({cfg.grad_accum}) "
                        "equal micro-batches per process")

    def plan_step(self, step: int) -> StepPlan:
        cfg = self.cfg
        prompts, prompt_ids, columns = self.pool.take(cfg.batch_size)
        seeds = step_seeds(cfg.seed, step, len(prompts))  # sampling: seeded by the step, see rollout.generate
        with timing.phase("sample"):
            rollout = generate(self.policy, self.tokenizer, prompts, prompt_ids, cfg.group_size, self.settings,
                               seeds, columns)
        with timing.phase("score"):
            scores, parts = score(rollout, self.reward_fns, self.reward_model, self.tokenizer.pad_token_id,
                                  cfg.reward_weights)  # [N], and each reward function's [N]
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * rollout.truncated.float()
        order = torch.randperm(len(prompts), generator=self.shuffle).tolist()
        plans = [plan_micro_batches(mb_groups, cfg.grad_accum) for mb_groups in chunks(order, cfg.num_minibatches)]
        minibatches = [[self._micro_batch(rollout, groups, with_forwards=mine) for groups, mine in plan]
                       for plan in plans]
        if not self._checked_mask:  # logps.mask_mismatch on the run's first micro-batch
            self._checked_mask = True
            stop_on_mask_mismatch(cfg.out, minibatches[0][0]["packed"], prompt_groups(rollout, plans[0][0][0]))
        metrics = {**rollout_metrics(rollout, scores, self.gold_fn), **reward_metrics(parts)}
        with timing.phase("advantages"):
            metrics.update(self._advantages(minibatches, scores, rollout.lengths().long()))
        updates = []
        for _ in range(cfg.ppo_epochs):
            visit = torch.randperm(len(minibatches), generator=self.shuffle).tolist() if updates else range(len(minibatches))
            updates += [minibatches[i] for i in visit]
        self.kl_ctl.update(metrics["objective/kl"], len(rollout.completions))
        num_tokens = sum(mb["packed"].num_tokens for minibatch in minibatches for mb in minibatch)
        return StepPlan(updates, metrics, example_completions(rollout, scores, cfg.log_completions), num_tokens)

    @torch.no_grad()
    def _micro_batch(self, rollout, groups: list[int], with_forwards: bool) -> dict[str, Any]:
        """Packed rows of these prompts' groups and, if this process trains on them, their no-grad forwards:
        old log-probs, reference log-probs, values, each [n, T]. Under torchrun the other processes compute
        the rest, and `_advantages` sums them all into the whole batch."""
        packed = pack(rollout, groups, self.tokenizer.pad_token_id, self.cfg.packed_row_tokens, self.break_even)
        mask = completion_mask(packed)  # [n, T]
        mb = {"packed": packed, "rows": rows_of(groups, rollout.group_size), "mask": mask, "num_items": int(mask.sum())}
        if with_forwards:
            with timing.phase("old_logps", self.policy, packed.num_tokens):
                mb["old_logps"] = policy_logps(self.policy, packed, self.cfg.temperature)[0]
            # LoRA: the reference is the policy, adapters off
            with timing.phase("reference", self.reference, packed.num_tokens), adapters_disabled(self.reference):
                mb["ref_logps"] = policy_logps(self.reference, packed, self.cfg.temperature)[0]
            with timing.phase("values", self.value_model, packed.num_tokens):
                mb["old_values"] = packed_values(self.value_model, packed)
        return mb

    @torch.no_grad()
    def _advantages(self, minibatches: list[list[dict[str, Any]]], scores: torch.Tensor,
                    lengths: torch.Tensor) -> dict[str, float]:
        """Per-token rewards, GAE and whitening over the whole rollout batch; stores advantages and returns
        in each micro-batch; returns the rollout metrics (`kl`, and TRL PPO's `objective/*`, `value/*`)."""
        micro = [mb for minibatch in minibatches for mb in minibatch]
        n, width = len(scores), int(lengths.max())
        mask = torch.zeros(n, width, dtype=torch.bool)
        for mb in micro:  # each micro-batch's [n_mb, T_mb] rows into the batch's [N, T]
            mask[mb["rows"], : mb["mask"].shape[1]] = mb["mask"]
        # each process ran the forwards of its micro-batches: the whole batch's, summed over processes
        full = {key: assemble_rows(n, width, [(mb["rows"], mb[key]) for mb in micro if key in mb])
                for key in ("old_logps", "ref_logps", "old_values")}
        kl = self.kl_estimator(full["old_logps"], full["ref_logps"]) * mask  # [N, T]
        beta = self.kl_ctl.value
        rewards = -beta * kl
        rewards[torch.arange(n), (lengths - 1).clamp(min=0)] += scores  # the score lands on the last token
        if self.cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, full["old_values"], mask, self.cfg.gamma, self.cfg.lam)
        advantages = whiten(advantages, mask)
        for mb in micro:
            t = mb["mask"].shape[1]
            mb["advantages"], mb["returns"] = advantages[mb["rows"], :t], returns[mb["rows"], :t]
            for key in full:
                mb[key] = full[key][mb["rows"], :t]
        kl_sum = kl.sum(1)
        residual = (returns - full["old_values"])[mask]
        return {
            "kl": masked_mean(kl, mask).item(),  # per token, as GRPO's; the adaptive controller reads objective/kl
            "objective/kl": kl_sum.mean().item(),  # per completion (TRL PPO's)
            "objective/entropy": (-full["old_logps"] * mask).sum(1).mean().item(),  # sampled NLL, TRL's estimate
            "objective/non_score_reward": (-beta * kl_sum).mean().item(),
            "objective/rlhf_reward": (scores - beta * kl_sum).mean().item(),
            "value/explained_var": (1 - residual.var() / returns[mask].var().clamp(min=1e-8)).item(),
            "kl_coef": beta,
        }

    def loss(self, mb: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, mask = self.cfg, mb["mask"]
        timing.count_flops(self.model, mb["packed"].num_tokens, backward=True)  # the policy's and the value model's
        logps, _, entropy = policy_logps(self.policy, mb["packed"], cfg.temperature, with_entropy=True)  # [n, T]
        values = packed_values(self.value_model, mb["packed"])  # [n, T]
        pg, stats = clipped_surrogate(logps, mb["old_logps"], mb["advantages"], mask, cfg.clip_eps)
        vf, vf_stats = clipped_value(values, mb["old_values"], mb["returns"], mask, cfg.clip_value)
        numerator, _ = aggregate(pg + cfg.vf_coef * vf, mask, "token_mean", return_parts=True)
        metrics = {name: value.item() for name, value in {**stats, **vf_stats}.items()}
        metrics["loss/policy"] = aggregate(pg.detach(), mask).item()
        metrics["loss/value"] = aggregate(vf.detach(), mask).item()
        metrics["entropy"] = masked_mean(entropy.detach(), mask).item()
        return numerator, metrics

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.pool.sampler.state_dict(), "shuffle": self.shuffle.get_state(),
                "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.sampler.load_state_dict(state["prompts"])
        self.shuffle.set_state(state["shuffle"])
        self.kl_ctl.value = float(state["kl_coef"])


def run_ppo(cfg: PPOConfig, policy: torch.nn.Module, value_model: torch.nn.Module, reference: torch.nn.Module | None,
            tokenizer: Any, prompts: list[Any], *, reward_fn: RewardFn | Sequence[RewardFn] | None = None,
            reward_model: torch.nn.Module | None = None, gold_fn: RewardFn | None = None,
            prompt_columns: dict[str, list[Any]] | None = None) -> Path:
    """Train `policy` (and `value_model`) with PPO into `cfg.out`; returns the saved policy folder.

    `prompt_columns`: the prompt data's other fields ({name: one value per prompt}), for the reward function.
    With LoRA (cfg.lora_r > 0) the reference is `policy` with its adapters off; `reference` is not used (pass None)."""
    out = start_rollout_run(cfg, reward_model, None if cfg.lora_r else reference)
    policy = lora_from_config(policy, cfg)  # after the run's seeding: the adapters' initialisation is the seed's
    value_model = lora_from_config(value_model, cfg, scalar_head=True)
    if cfg.lora_r:
        reference = policy
    recipe = PPORecipe(policy, value_model, reference, tokenizer, prompts, cfg, reward_fn=reward_fn,
                       reward_model=reward_model, gold_fn=gold_fn, prompt_columns=prompt_columns)
    train_rollout(cfg, recipe, ppo_monitors(has_gold=gold_fn is not None))
    save_model(value_model, out / "value_model")
    return save_final_model(policy, tokenizer, out)

"""Rollouts shared by PPO and GRPO: sample k completions per prompt, score them, and run the policy,
reference and value model over packed (prompt + its k completions) rows.

    prompts ─► sample (prefill each prompt once, k rows share its KV cache) ─► completions, truncated
            ─► reward fn / reward model ─► rewards [N]                        (N = prompts × k)
            ─► pack_groups: one row segment per prompt  [P | c1 | c2 | ... | ck]
            ─► packed_forward (policy, reference) / packed_values (value model): each prompt computed once

Token tensors returned here are [n, T] completion-aligned: column t is completion token t (the first
generated token is column 0), `mask` is True on real tokens, EOS included. That is the frame of
`core.policy_loss` and `core.advantages` with the label shift already applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlhflab.algorithms.rewards import (
    RewardFn,
    as_completion,
    call_reward_fn,
    check_reward_weights,
    reward_names,
)
from rlhflab.config import RunConfig, opt, size_opt
from rlhflab.core.advantages import group_reward_std
from rlhflab.core.packing import (
    PackedBatch,
    check_attention_implementation,
    mask_for,
    pack_groups,
    packed_forward,
    to_padded,
)
from rlhflab.core.sampling import sample
from rlhflab.data.collate import TruncationCounter, tokenize_prompt
from rlhflab.diagnostics.findings import Monitor
from rlhflab.models.loading import decode_completion, stop_token_ids
from rlhflab.models.scoring import reward_model_scores, token_scores
from rlhflab.training import timing
from rlhflab.training.data_order import EpochSampler
from rlhflab.training.loop import console, start_run, train
from rlhflab.training.precision import freeze
from rlhflab.training.sharding import shared_work


@dataclass
class RolloutConfig(RunConfig):
    """Fields PPO and GRPO share: what they sample, from which prompts, and how it is scored."""

    lr: float = 2e-5
    lr_schedule: Literal["cosine", "linear", "constant"] = "constant"
    warmup_ratio: float = 0.0
    max_steps: int = 100
    batch_size: int = opt(8, "prompts per step; completions per step = batch_size × group_size", minimum=1)
    group_size: int = opt(8, "completions sampled per prompt (k)", minimum=1)
    max_new_tokens: int | None = opt(None, "completion budget; default: the task's, else 256", minimum=1)
    max_prompt_tokens: int | None = size_opt("max_prompt_tokens", "longer prompts keep their last tokens")
    temperature: float = opt(1.0, "sampling temperature (log-probs for the ratio use the same)", minimum=0.0)
    top_p: float = opt(1.0, "nucleus sampling mass", minimum=0.0, maximum=1.0)
    top_k: int = opt(0, "sample among the k likeliest tokens; 0: all", minimum=0)
    clip_eps: float = opt(0.2, "ε: policy ratio clipped to [1 − ε, 1 + ε]", minimum=0.0)
    reward_fn: str | None = opt(
        None, "FILE.py:NAME or package.module:NAME, or several comma-separated; default: the reward model")
    reward_weights: list[float] | None = opt(
        None, "one per reward function (their weighted sum is the reward); default: all 1")
    reward_model: str | None = opt(None, "reward model folder; default with --task: the task's reward model")
    num_prompts: int = opt(4000, "built-in tasks: training prompts to generate", minimum=1)
    packed_row_tokens: int = opt(
        512, "longest packed row (a prompt and its k completions share one row segment)", minimum=2)
    log_completions: int = opt(
        8, "completions written to completions.jsonl at each logged step (the first groups); 0: none", minimum=0)


class PromptPool:
    """Prompts tokenized once, visited in a resumable shuffled order (`EpochSampler`).

    `columns`: the prompt data's other fields ({name: one value per prompt}), for reward functions.
    """

    def __init__(self, prompts: list[Any], tokenizer: Any, max_prompt_tokens: int, seed: int,
                 columns: dict[str, list[Any]] | None = None):
        counter = TruncationCounter()
        self.prompts = prompts
        self.ids = [tokenize_prompt(tokenizer, p, max_prompt_tokens, counter=counter).prompt_ids for p in prompts]
        self.columns = columns or {}
        self.truncation_warning = counter.message()
        self.sampler = EpochSampler(len(prompts), seed)

    def take(self, n: int) -> tuple[list[Any], list[list[int]], dict[str, list[Any]]]:
        """The next n prompts: (prompts, token ids, their columns)."""
        indices = self.sampler.take(n)
        columns = {name: [values[i] for i in indices] for name, values in self.columns.items()}
        return [self.prompts[i] for i in indices], [self.ids[i] for i in indices], columns


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """N = P × k completions, grouped: rows g*k .. g*k+k-1 continue prompt g."""

    prompts: list[Any]  # [P] as given in the data (reward functions receive these)
    prompt_ids: list[list[int]]  # [P]
    completions: list[list[int]]  # [N] token ids, EOS included where emitted
    texts: list[str]  # [N] decoded, without EOS
    truncated: torch.Tensor  # [N] bool: never emitted EOS
    group_size: int
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the prompt data's other fields, [P] each

    def row_prompts(self) -> list[Any]:
        return [self.prompts[i // self.group_size] for i in range(len(self.completions))]

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c) for c in self.completions], dtype=torch.float32)


def step_seeds(seed: int, step: int, num_prompts: int) -> list[int]:
    """One sampling seed for each prompt of a step, a function of (run seed, step, prompt position) alone.

    So a resumed run samples what the uninterrupted run sampled, with no generator state to save,
    and a step's prompts sample the same completions whichever process draws them.
    """
    return np.random.SeedSequence([seed, step]).generate_state(num_prompts).tolist()


def generate(policy: torch.nn.Module, tokenizer: Any, prompts: list[Any], prompt_ids: list[list[int]],
             group_size: int, settings: SamplingSettings, seeds: list[int],
             columns: dict[str, list[Any]] | None = None) -> Rollout:
    """k = group_size samples of each prompt with the KV-cached sampler (prompt prefilled once).

    Prompt i's samples are drawn from seeds[i] (see `core.sampling`). Under torchrun each process
    samples its block of the prompts and receives the other blocks, so every process holds the
    whole rollout: the one a single process samples, up to float rounding of the logits.
    """

    stops = stop_token_ids(tokenizer)  # EOS, the chat template's end of turn, generation_config's eos ids

    def sample_rows(mine: list[int]) -> list[tuple[list[int], bool]]:  # (completion, truncated) of each row
        samples = sample(
            policy, [prompt_ids[i] for i in mine], num_samples=group_size, max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id, seeds=[seeds[i] for i in mine],
        )  # fmt: skip
        completions = samples.completions()
        # each prompt is prefilled once for its k rows, then one forward per sampled token
        timing.count_flops(policy, sum(len(prompt_ids[i]) for i in mine) + sum(map(len, completions)))
        return list(zip(completions, samples.truncated.tolist(), strict=True))

    rows = shared_work(len(prompts), sample_rows)  # every process samples its block of prompts
    completions = [completion for completion, _ in rows]
    truncated = torch.tensor([cut for _, cut in rows], dtype=torch.bool)
    texts = [decode_completion(tokenizer, c, stops) for c in completions]
    return Rollout(prompts, prompt_ids, completions, texts, truncated, group_size, columns or {})


def score(rollout: Rollout, reward_fns: list[RewardFn] | None, reward_model: torch.nn.Module | None,
          pad_token_id: int, weights: list[float] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(reward of each completion [N], each reward function's own [N] by name).

    The reward is Σ_i weights[i] · f_i (weights default to 1), or the reward model's score (then no
    parts). Exactly one of `reward_fns` and `reward_model` is given. Under torchrun each process
    scores the rows of the prompts it sampled and receives the others'.
    """
    assert (not reward_fns) != (reward_model is None), "give reward functions or a reward model"
    k = rollout.group_size
    if reward_model is not None:
        def model_scores(mine: list[int]) -> list[float]:
            rows = rows_of(mine, k).tolist()
            row_ids = [rollout.prompt_ids[i // k] for i in rows]
            completions = [rollout.completions[i] for i in rows]
            timing.count_flops(reward_model, sum(map(len, row_ids)) + sum(map(len, completions)))  # unpacked rows
            return reward_model_scores(reward_model, row_ids, completions, pad_token_id).tolist()

        return torch.tensor(shared_work(len(rollout.prompts), model_scores), dtype=torch.float32), {}  # [N]
    parts = {}
    for name, fn in zip(reward_names(reward_fns), reward_fns, strict=True):
        def fn_scores(mine: list[int], fn: RewardFn = fn) -> list[float]:
            rows = rows_of(mine, k).tolist()
            row_prompts = [rollout.prompts[i // k] for i in rows]
            completions = [as_completion(prompt, rollout.texts[i]) for i, prompt in zip(rows, row_prompts, strict=True)]
            columns = {column: [values[i // k] for i in rows] for column, values in rollout.columns.items()}
            completion_ids = [rollout.completions[i] for i in rows]
            return call_reward_fn(fn, row_prompts, completions, columns, completion_ids).tolist()

        parts[name] = torch.tensor(shared_work(len(rollout.prompts), fn_scores), dtype=torch.float32)  # [N]
    weights = check_reward_weights(weights, len(reward_fns))
    return sum(w * part for w, part in zip(weights, parts.values(), strict=True)), parts


def pack(rollout: Rollout, groups: list[int], pad_token_id: int, max_row_tokens: int,
         attention_break_even: int | None = None) -> PackedBatch:
    """Pack the prompts `groups` with their k completions each; sequence order = rollout row order.
    `attention_break_even`: the model's L0, to weigh attention in the row layout (`pack_groups`)."""
    return pack_groups(prompt_groups(rollout, groups), max_row_tokens=max_row_tokens, pad_token_id=pad_token_id,
                       attention_break_even=attention_break_even)


def prompt_groups(rollout: Rollout, groups: list[int]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, its k completions) of each of the prompts `groups`: what `pack` lays out."""
    k = rollout.group_size
    return [(rollout.prompt_ids[g], rollout.completions[g * k : (g + 1) * k]) for g in groups]


def rows_of(groups: list[int], group_size: int) -> torch.Tensor:
    """Rollout row indices of the completions of `groups`, in packing order: [len(groups) * k]."""
    return torch.tensor([g * group_size + j for g in groups for j in range(group_size)], dtype=torch.long)


def policy_logps(model: torch.nn.Module, packed: PackedBatch, temperature: float, with_entropy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logps [n, T], mask [n, T], entropy [n, T] or None) of the packed completions at `temperature`.

    The temperature matches the sampler's, so these are the log-probs of the distribution the tokens
    were drawn from (before top-k / top-p, see `core.sampling`).
    """
    # temperature 0 (greedy) samples are scored at temperature 1, like the sampler's own logps.
    out = packed_forward(model, packed, temperature=temperature if temperature > 0 else 1.0, with_entropy=with_entropy)
    logps, mask = to_padded(out.token_logps, packed)
    entropy = to_padded(out.token_entropy, packed)[0] if out.token_entropy is not None else None
    return logps, mask, entropy


def packed_values(value_model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """V(s_t) for every completion token t: the scalar head at the position that predicts token t
    (the state before the token is chosen, as in TRL's PPO). [n, T]."""
    check_attention_implementation(value_model)
    scores = token_scores(value_model, packed.input_ids, mask_for(value_model, packed), packed.position_ids)  # [R, L]
    return to_padded(scores.flatten()[packed.logit_index], packed)[0]  # float32: token_scores returns it


def example_completions(rollout: Rollout, rewards: torch.Tensor, count: int,
                        **per_row: torch.Tensor) -> list[dict[str, Any]]:
    """The first `count` completions (whole groups first) with their prompt, reward and `per_row` values
    ([N] tensors, e.g. advantages): the lines of completions.jsonl."""
    return [
        {"prompt": rollout.prompts[i // rollout.group_size], "completion": rollout.texts[i],
         "reward": float(rewards[i]), "truncated": bool(rollout.truncated[i]),
         **{name: float(values[i]) for name, values in per_row.items()}}
        for i in range(min(count, len(rollout.completions)))
    ]  # fmt: skip


def start_rollout_run(cfg: RunConfig, *frozen: torch.nn.Module | None) -> Path:
    """`start_run`, and the frozen models (reference, reward model; None where absent) made read-only."""
    out = start_run(cfg)
    for model in frozen:
        if model is not None:
            freeze(model, cfg.precision)
    return out


def train_rollout(cfg: RunConfig, recipe: Any, monitors: list[Monitor]) -> None:
    """`train`, after the one warning about prompts cut to max_prompt_tokens."""
    if recipe.pool.truncation_warning:
        console.print(f"[yellow]warning:[/] {recipe.pool.truncation_warning}")
    train(cfg, recipe, monitors)


def rollout_metrics(rollout: Rollout, rewards: torch.Tensor, gold_fn: RewardFn | None) -> dict[str, float]:
    """The rollout metrics PPO and GRPO share, TRL GRPO's names (one meaning each; docs/notes_rl.md):

    reward                 mean over the batch's completions of the reward their advantages come from
    reward_std             mean over prompts of the rewards' std within the prompt's group (group_size > 1)
    frac_reward_zero_std   share of groups whose rewards all tie (group_size > 1)
    completions/*          `completion_metrics`
    gold/reward            mean gold reward (the task's truth beside the proxy), when there is one
    """
    metrics = {"reward": rewards.mean().item()}
    if rollout.group_size > 1:
        group_std = group_reward_std(rewards, rollout.group_size)  # [B]
        metrics["reward_std"] = group_std.mean().item()
        metrics["frac_reward_zero_std"] = (group_std < 1e-6).float().mean().item()
    metrics.update(completion_metrics(rollout))
    if gold_fn is not None:  # reward.proxy_gold_divergence reads both
        metrics["gold/reward"] = sum(gold_fn(rollout.row_prompts(), rollout.texts)) / len(rollout.texts)
    return metrics


def reward_metrics(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's names: each reward function's mean and std over the batch, `rewards/NAME/mean` and `/std`."""
    metrics = {}
    for name, values in parts.items():
        metrics[f"rewards/{name}/mean"] = values.mean().item()
        metrics[f"rewards/{name}/std"] = values.std().item() if values.numel() > 1 else 0.0
    return metrics


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """TRL's names: mean completion length (tokens, EOS included) and the share that never emitted EOS."""
    lengths = rollout.lengths()
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": rollout.truncated.float().mean().item(),
    }


"""The one evaluation suite: every algorithm's model is judged by exactly this code.

For each temperature: n samples per prompt (fixed seeds, so two models see the same random
stream), then per sample the reward-model score, the gold reward, the KL to the reference, length
and well-formedness; per prompt distinct-1/2 across its samples. Aggregates carry 95% bootstrap
intervals over prompts × samples.

The KL is that of the distributions actually sampled, "KL to the reference at the sampling
temperature": at temperature T the sampler draws y from π_T (softmax of the logits / T, token by
token), so each sample's

    kl(y) = Σ_t log π_T(y_t | x, y_<t) − log π_ref,T(y_t | x, y_<t)      (both models' logits / T)

is an unbiased Monte-Carlo estimate of KL(π_T ‖ π_ref,T) over whole completions (EOS and the
max_new_tokens cut included, as sampled). At T = 1 it is the usual KL(π ‖ π_ref). Greedy decoding
(T = 0) has no such KL: the suite refuses T = 0 when a reference is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlhflab.core.causal_lm import padded_response_logps
from rlhflab.core.sampling import sample
from rlhflab.data.collate import TokenizedExample, collate_sequences, tokenize_prompt
from rlhflab.errors import InputError
from rlhflab.evaluation.stats import summarize
from rlhflab.models.loading import decode_completion, stop_token_ids
from rlhflab.models.scoring import RewardFn, reward_model_scores


@dataclass
class EvalConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.3, 0.7, 1.0])  # sampling temperatures
    samples_per_prompt: int = 8  # fewer makes the mean valence on 16 prompts too noisy to rank methods
    max_new_tokens: int = 32
    seed: int = 1234  # sampling seed: the same for every model, so comparisons are paired
    batch_size: int = 64  # rows per scoring forward
    examples_per_prompt: int = 2  # completions kept in the output for reports


@torch.no_grad()
def _sequence_logps(model: torch.nn.Module, rows: list[TokenizedExample], pad_token_id: int, batch_size: int,
                    temperature: float) -> np.ndarray:
    """log π_T(completion | prompt) of each row: the logits / temperature, as the sampler draws. [N]"""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collate_sequences(rows[start : start + batch_size], pad_token_id)
        scored = padded_response_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                       temperature)  # the LM head only on response positions, in chunks
        out.append(scored.sequence_logps())
    return torch.cat(out).float().numpy()


def _distinct_n(completions: list[list[int]], n: int) -> float:
    grams = [tuple(c[i : i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def evaluate(
    policy: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    cfg: EvalConfig,
    *,
    reward_model: torch.nn.Module | None = None,
    gold_reward: RewardFn | None = None,
    is_wellformed: Callable[[str, str], bool] | None = None,
    reference: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Evaluate `policy` on `prompts`; returns {"temperatures": {"0.7": {"aggregate": ..., "per_prompt": [...]}}}.

    Per-sample "kl" (with a `reference`): KL to the reference at the sampling temperature (module docstring)."""
    if reference is not None and any(t <= 0 for t in cfg.temperatures):
        raise InputError(f"evaluation temperatures {cfg.temperatures}: greedy decoding (temperature 0) has no KL to "
                         "the reference; use a temperature > 0 (e.g. 0.1)", field="temperatures")  # fmt: skip
    prompt_ids = [tokenize_prompt(tokenizer, p, None).prompt_ids for p in prompts]  # the collator's BOS rule
    num_prompts, n = len(prompts), cfg.samples_per_prompt
    stops = stop_token_ids(tokenizer)
    results: dict[str, Any] = {"num_prompts": num_prompts, "samples_per_prompt": n, "temperatures": {}}
    for t_index, temperature in enumerate(cfg.temperatures):
        generator = torch.Generator().manual_seed(cfg.seed + 1000 * t_index)
        samples = sample(
            policy, prompt_ids, num_samples=n, max_new_tokens=cfg.max_new_tokens, temperature=temperature,
            stop_token_ids=stops, pad_token_id=tokenizer.pad_token_id, generator=generator,
        )  # fmt: skip
        completions = samples.completions()  # grouped: the n samples of prompt i are rows i*n .. i*n+n-1
        texts = [decode_completion(tokenizer, c, stops) for c in completions]
        row_prompts = [prompts[i // n] for i in range(len(completions))]
        rows = [TokenizedExample(prompt_ids[i // n], c) for i, c in enumerate(completions)]
        per_sample: dict[str, np.ndarray] = {
            "length": np.array([len(c) for c in completions], dtype=float),
            "truncated": samples.truncated.float().numpy(),
        }
        if gold_reward is not None:
            per_sample["gold"] = np.array(gold_reward(row_prompts, texts), dtype=float)
        if is_wellformed is not None:
            per_sample["malformed"] = np.array([0.0 if is_wellformed(p, c) else 1.0 for p, c in zip(row_prompts, texts, strict=True)])
        if reward_model is not None:
            per_sample["rm_score"] = reward_model_scores(reward_model, [r.prompt_ids for r in rows], completions,
                                                         tokenizer.pad_token_id, cfg.batch_size).numpy()
        if reference is not None:
            logp = _sequence_logps(policy, rows, tokenizer.pad_token_id, cfg.batch_size, temperature)
            ref_logp = _sequence_logps(reference, rows, tokenizer.pad_token_id, cfg.batch_size, temperature)
            per_sample["kl"] = logp - ref_logp  # KL(π_T ‖ π_ref,T), one Monte-Carlo sample each
        grid = {k: v.reshape(num_prompts, n) for k, v in per_sample.items()}  # [P, S]
        per_prompt_distinct = {
            f"distinct_{k}": np.array([_distinct_n(completions[i * n : (i + 1) * n], k) for i in range(num_prompts)])
            for k in (1, 2)
        }
        aggregate = {k: summarize(v, seed=cfg.seed) for k, v in {**grid, **per_prompt_distinct}.items()}
        per_prompt = [
            {
                "prompt": prompts[i],
                **{k: float(v[i].mean()) for k, v in {**grid, **per_prompt_distinct}.items()},
                "examples": texts[i * n : i * n + cfg.examples_per_prompt],
                "values": {k: v[i].tolist() for k, v in grid.items()},
            }
            for i in range(num_prompts)
        ]
        results["temperatures"][f"{temperature:g}"] = {"aggregate": aggregate, "per_prompt": per_prompt}
    return results


def format_table(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(temperature, metric, "mean [low, high]") rows for printing."""
    rows = []
    for temperature, block in results["temperatures"].items():
        for metric, s in block["aggregate"].items():
            rows.append((temperature, metric, f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"))
    return rows

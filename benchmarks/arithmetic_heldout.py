"""Exact match of arithmetic models on 500 held-out prompts (never GRPO training prompts, never eval prompts).

The suite's 16 evaluation prompts cannot resolve a few points of exact match (a prompt's samples are nearly all
right or all wrong, so its interval is about ±0.18); this script measures on 500 prompts, greedy and at T 1.0
(4 samples each), and each later model's paired difference to the first with a bootstrap 95% interval over prompts:

    .venv/bin/python benchmarks/arithmetic_heldout.py SFT_MODEL GRPO_MODEL [...]
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from rlhflab.core.sampling import sample
from rlhflab.data.collate import tokenize_prompt
from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.tasks import get_task


def heldout_prompts(n: int = 500, seed: int = 123) -> list[str]:
    task = get_task("arithmetic")
    excluded = set(task.train_prompts(4000, seed=0)) | set(task.eval_prompts())  # what `rlhflab grpo` samples
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < n:
        prompt = f"{rng.randint(0, 99)}+{rng.randint(0, 99)}="
        if prompt not in excluded:
            prompts.append(prompt)
    return prompts


def exact_match(model_path: str, prompts: list[str]) -> dict[float, np.ndarray]:
    """Per-prompt mean gold reward per temperature: greedy (one sample) and T 1.0 (four samples per prompt)."""
    task = get_task("arithmetic")
    tokenizer, model = load_tokenizer(model_path), load_causal_lm(model_path)
    ids = [tokenize_prompt(tokenizer, p, None).prompt_ids for p in prompts]
    result = {}
    for temperature, k in ((0.0, 1), (1.0, 4)):
        samples = sample(model, ids, num_samples=k, max_new_tokens=task.max_new_tokens, temperature=temperature,
                         stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                         generator=torch.Generator().manual_seed(0))
        texts = [tokenizer.decode([t for t in c if t != tokenizer.eos_token_id]) for c in samples.completions()]
        rewards = task.gold_reward([p for p in prompts for _ in range(k)], texts)
        result[temperature] = np.asarray(rewards).reshape(len(prompts), k).mean(axis=1)
    return result


def paired_interval(diff: np.ndarray, resamples: int = 10000) -> tuple[float, float]:
    """Bootstrap 95% interval of the mean of per-prompt differences."""
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


if __name__ == "__main__":
    torch.set_num_threads(2)
    held_out = heldout_prompts()
    baseline = None
    for path in sys.argv[1:]:
        scores = exact_match(path, held_out)
        line = {t: round(float(v.mean()), 4) for t, v in scores.items()}
        if baseline is not None:
            for t, v in scores.items():
                low, high = paired_interval(v - baseline[t])
                line[f"diff@{t}"] = f"{float((v - baseline[t]).mean()):+.4f} [{low:+.4f}, {high:+.4f}]"
        baseline = baseline or scores
        print(path, line, flush=True)

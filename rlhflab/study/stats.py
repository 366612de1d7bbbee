"""How sure a study is: bootstrap intervals over seeds × prompts × samples, paired differences, ranks with ties.

A study's numbers for one arm and one metric form a [K, P, S] array: K training seeds, P prompts
(the same for every arm), S samples per prompt (drawn with the same sampling seed for every arm).
The bootstrap resamples at all three levels, because samples of one prompt and prompts of one
seed are correlated: treating K·P·S values as independent gives intervals that are too narrow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def as_grid(values: Any) -> np.ndarray:
    """[K, P, S] from [K, P, S], [P, S] (one seed) or [P] (one value per prompt)."""
    grid = np.asarray(values, dtype=float)
    while grid.ndim < 3:
        grid = grid[None] if grid.ndim == 2 else grid[:, None]
    return grid


def bootstrap_means(values: Any, num_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution [R] of the mean of a [K, P, S] array.

    Each resample draws K seeds, then P prompts (the same prompt draw for every seed: prompts are
    crossed with seeds), then S samples within each (seed, prompt) cell, all with replacement.
    """
    grid = as_grid(values)
    k, p, s = grid.shape
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, k, size=(num_resamples, k))  # [R, K]
    prompt_idx = rng.integers(0, p, size=(num_resamples, p))  # [R, P]
    sample_idx = rng.integers(0, s, size=(num_resamples, k, p, s))  # [R, K, P, S]
    resampled = grid[seed_idx[:, :, None, None], prompt_idx[:, None, :, None], sample_idx]  # [R, K, P, S]
    return np.nanmean(resampled.reshape(num_resamples, -1), axis=1)


def summarize(values: Any, num_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """{"mean", "ci_low", "ci_high"}: the mean and its percentile bootstrap interval."""
    grid = as_grid(values)
    if grid.size == 0 or np.all(np.isnan(grid)):
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    means = bootstrap_means(grid, num_resamples, seed)
    alpha = (1 - level) / 2
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return {"mean": float(np.nanmean(grid)), "ci_low": float(low), "ci_high": float(high)}


def paired_difference(values: Any, baseline: Any, num_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Arm minus baseline, paired by (seed, prompt, sample): the same prompts and the same sampling stream.

    Pairing removes the variance the two share (some prompts are easy for every model), so the
    interval of the difference is narrower than the two separate intervals suggest. Returns the
    summary of the differences plus `per_prompt`: the mean difference of each prompt [P].
    """
    diff = as_grid(values) - as_grid(baseline)  # shapes must match: same seeds, prompts and samples
    return {**summarize(diff, num_resamples, seed), "per_prompt": np.nanmean(diff, axis=(0, 2)).tolist()}


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    return a["ci_low"] <= b["ci_high"] and b["ci_low"] <= a["ci_high"]


def rank(summaries: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Arms best first. An arm's rank is 1 + the number of arms clearly better (their interval lies
    wholly above its own); arms whose intervals overlap are listed as tied and may share a rank."""
    order = sorted(summaries, key=lambda name: -summaries[name]["mean"])
    ranking = []
    for name in order:
        s = summaries[name]
        better = sum(1 for other in order if summaries[other]["ci_low"] > s["ci_high"])
        tied = [other for other in order if other != name and overlaps(s, summaries[other])]
        ranking.append({"arm": name, **s, "rank": 1 + better, "tied_with": tied})
    return ranking


def rank_label(entry: dict[str, Any]) -> str:
    """The rank as printed: `2`, or `=2` when tied with an arm whose interval overlaps."""
    return f"={entry['rank']}" if entry["tied_with"] else str(entry["rank"])


def compare_rankings(first: list[dict[str, Any]], second: list[dict[str, Any]], key: str = "algorithm",
                     separated: Callable[[int, str, str], bool] | None = None) -> dict[str, Any]:
    """Did the order change between two rankings (matched by `key`), and is any swap outside the intervals?

    A swapped pair (x, y) is *resolved* in ranking i when `separated(i, x, y)` holds; by default, when
    the two intervals do not overlap there (a study passes the paired difference x − y excluding 0,
    which is sharper). The change is outside the intervals when some swapped pair is resolved in both
    rankings (a real reversal); a swap resolved in only one of them is reported as `partly`.
    """
    a = {e[key]: e for e in first}
    b = {e[key]: e for e in second}
    if separated is None:
        separated = lambda i, x, y: not overlaps((a, b)[i][x], (a, b)[i][y])  # noqa: E731
    order_a = [k for k in a if k in b]
    order_b = [k for k in b if k in a]
    swaps = []
    for i, x in enumerate(order_a):
        for y in order_a[i + 1 :]:
            if order_b.index(y) < order_b.index(x):
                swaps.append({"before": f"{x} > {y}", "after": f"{y} > {x}",
                              "resolved_before": separated(0, x, y), "resolved_after": separated(1, x, y)})  # fmt: skip
    both = any(s["resolved_before"] and s["resolved_after"] for s in swaps)
    one = any(s["resolved_before"] or s["resolved_after"] for s in swaps)
    return {
        "order_before": order_a, "order_after": order_b, "changed": order_a != order_b, "swaps": swaps,
        "outside_intervals": "yes" if both else "partly" if one else "no",
    }  # fmt: skip

"""Bootstrap confidence intervals: how sure a mean over prompts × samples is."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, num_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile CI of a [P, S] array (prompts × samples), resampling prompts, then samples within each.

    Two-level resampling because samples of one prompt are correlated: treating all P·S values as
    independent would give intervals that are too narrow. A 1-D array is treated as [P, 1].
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    values = values[:, ~np.all(np.isnan(values), axis=0)] if values.size else values
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    num_prompts, num_samples = values.shape
    prompt_idx = rng.integers(0, num_prompts, size=(num_resamples, num_prompts))  # [R, P]
    sample_idx = rng.integers(0, num_samples, size=(num_resamples, num_prompts, num_samples))  # [R, P, S]
    resampled = values[prompt_idx[..., None], sample_idx]  # [R, P, S]
    means = np.nanmean(resampled.reshape(num_resamples, -1), axis=1)
    alpha = (1 - level) / 2
    low, high = np.nanquantile(means, [alpha, 1 - alpha])
    return float(np.nanmean(values)), float(low), float(high)


def summarize(values: np.ndarray, num_resamples: int = 1000, seed: int = 0) -> dict[str, float]:
    mean, low, high = bootstrap_ci(values, num_resamples, seed)
    return {"mean": mean, "ci_low": low, "ci_high": high}

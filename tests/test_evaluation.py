"""Bootstrap intervals against closed forms."""

import numpy as np

from rlhflab.evaluation.stats import bootstrap_ci


def test_bootstrap_matches_normal_theory_for_independent_prompts():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 2.0, size=(400, 1))
    mean, low, high = bootstrap_ci(values, num_resamples=4000, seed=1)
    half_width = 1.96 * values.std() / np.sqrt(400)
    assert mean == values.mean()
    assert abs((high - low) / 2 - half_width) / half_width < 0.1


def test_bootstrap_accounts_for_correlated_samples():
    # each prompt has its own offset: samples of a prompt are correlated, so the interval must be
    # about as wide as that of the 16 prompt means, not of 16 x 8 independent values
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1.0, size=(16, 1))
    values = offsets + rng.normal(0, 0.1, size=(16, 8))
    _, low, high = bootstrap_ci(values, num_resamples=4000, seed=1)
    prompt_means = values.mean(axis=1)
    expected = 1.96 * prompt_means.std() / np.sqrt(16)
    assert 0.75 < (high - low) / 2 / expected < 1.25

"""Study statistics against closed forms and brute force: bootstrap levels, paired differences, ranks, phases."""

import numpy as np

from rlhflab.study.stats import (
    bootstrap_means,
    compare_rankings,
    paired_difference,
    rank,
    rank_label,
    summarize,
)


def half_width(s):
    return (s["ci_high"] - s["ci_low"]) / 2


def test_one_level_matches_normal_theory():
    values = np.random.default_rng(0).normal(1.0, 2.0, size=(1, 400, 1))
    s = summarize(values, num_resamples=4000, seed=1)
    assert s["mean"] == values.mean()
    expected = 1.96 * values.std() / np.sqrt(400)
    assert abs(half_width(s) - expected) / expected < 0.1


def test_seed_level_variance_is_counted():
    # each seed has its own offset that every prompt and sample shares: the interval must be as wide as
    # that of the 40 seed means, not of 40 x 16 x 4 independent values
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1.0, size=(40, 1, 1))
    values = offsets + rng.normal(0, 0.05, size=(40, 16, 4))
    s = summarize(values, num_resamples=3000, seed=2)
    expected = 1.96 * values.mean(axis=(1, 2)).std() / np.sqrt(40)
    assert 0.8 < half_width(s) / expected < 1.2


def test_bootstrap_mean_of_a_constant_is_the_constant():
    means = bootstrap_means(np.full((3, 16, 8), 0.25), num_resamples=50)
    assert np.allclose(means, 0.25)


def test_paired_difference_matches_brute_force():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2, 16, 4))
    arm = base + rng.normal(0.3, 0.5, size=(2, 16, 4))
    d = paired_difference(arm, base, num_resamples=500)
    per_prompt = [np.mean([arm[k, p, s] - base[k, p, s] for k in range(2) for s in range(4)]) for p in range(16)]
    assert np.allclose(d["per_prompt"], per_prompt)
    assert np.isclose(d["mean"], arm.mean() - base.mean())


def test_paired_interval_matches_direct_computation_and_beats_unpaired():
    # prompt difficulty is shared by both models (sd 2) and cancels in the paired difference (sd 0.3)
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 2.0, size=(1, 300, 1))
    base = difficulty + rng.normal(0, 0.2, size=(1, 300, 1))
    arm = difficulty + 0.5 + rng.normal(0, 0.2, size=(1, 300, 1))
    d = paired_difference(arm, base, num_resamples=4000, seed=5)
    diffs = (arm - base).ravel()
    direct = 1.96 * diffs.std() / np.sqrt(300)
    assert abs(half_width(d) - direct) / direct < 0.1
    assert d["ci_low"] > 0.4 and d["ci_high"] < 0.6
    unpaired = half_width(summarize(arm, 1000)) + half_width(summarize(base, 1000))
    assert half_width(d) < unpaired / 5


def _s(mean, low, high):
    return {"mean": mean, "ci_low": low, "ci_high": high}


def test_rank_marks_ties_where_intervals_overlap():
    ranking = rank({"c": _s(0.5, 0.4, 0.6), "a": _s(1.0, 0.9, 1.1), "b": _s(0.95, 0.85, 1.05), "d": _s(0.55, 0.3, 0.86)})
    assert [e["arm"] for e in ranking] == ["a", "b", "d", "c"]
    assert [e["rank"] for e in ranking] == [1, 1, 2, 3]  # d lies below a only; c below a and b
    assert ranking[0]["tied_with"] == ["b"]
    assert ranking[2]["tied_with"] == ["b", "c"]
    assert [rank_label(e) for e in ranking] == ["=1", "=1", "=2", "=3"]


def test_rank_without_overlap_is_strict():
    ranking = rank({"x": _s(1, 0.9, 1.1), "y": _s(2, 1.9, 2.1), "z": _s(3, 2.9, 3.1)})
    assert [(e["arm"], rank_label(e)) for e in ranking] == [("z", "1"), ("y", "2"), ("x", "3")]


def _ranking(entries):
    return [{"algorithm": name, **_s(*values)} for name, values in entries]


def test_compare_rankings_reversal_outside_and_inside_intervals():
    before = _ranking([("ppo", (4.0, 3.8, 4.2)), ("dpo", (2.4, 2.2, 2.6)), ("grpo", (-0.1, -0.3, 0.1))])
    resolved = _ranking([("dpo", (4.2, 4.1, 4.3)), ("ppo", (3.5, 3.4, 3.6)), ("grpo", (3.3, 3.2, 3.4))])
    c = compare_rankings(before, resolved)
    assert c["changed"] and c["outside_intervals"] == "yes"
    assert [s["before"] for s in c["swaps"]] == ["ppo > dpo"]
    noisy = _ranking([("dpo", (4.2, 3.0, 5.0)), ("ppo", (3.5, 2.5, 4.5)), ("grpo", (-0.1, -0.3, 0.1))])
    c = compare_rankings(before, noisy)
    assert c["changed"] and c["outside_intervals"] == "partly"  # separated before, overlapping after
    same = compare_rankings(before, before)
    assert not same["changed"] and same["swaps"] == [] and same["outside_intervals"] == "no"

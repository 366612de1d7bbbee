"""From run folders to study numbers: synthetic eval.json files with known offsets, checked by brute force."""

import json

import numpy as np
import pytest

from rlhflab.study.results import metric_grid, read_eval, summarize_arms

PROMPTS = [f"prompt {i}" for i in range(16)]


def fake_eval(offset: float, seed: int, temperatures=("0.7", "0.3"), samples: int = 4) -> dict:
    """An eval.json whose gold reward is prompt difficulty + offset + noise (difficulty shared by every arm)."""
    rng = np.random.default_rng(seed)
    difficulty = np.linspace(-1, 1, 16)[:, None]
    out = {"num_prompts": 16, "samples_per_prompt": samples, "temperatures": {}}
    for t in temperatures:
        gold = difficulty + offset + rng.normal(0, 0.1, size=(16, samples))
        values = {"gold": gold, "rm_score": gold * 2, "kl": np.abs(gold) * 0 + max(offset, 0) * 3,
                  "length": np.full((16, samples), 8.0), "malformed": np.zeros((16, samples))}
        per_prompt = [{"prompt": p, **{k: float(v[i].mean()) for k, v in values.items()}, "distinct_1": 0.5,
                       "distinct_2": 0.8, "examples": [f"{p} sample a", f"{p} sample b"],
                       "values": {k: v[i].tolist() for k, v in values.items()}} for i, p in enumerate(PROMPTS)]
        aggregate = {k: {"mean": float(v.mean()), "ci_low": float(v.mean()) - 0.1, "ci_high": float(v.mean()) + 0.1}
                     for k, v in values.items()}
        out["temperatures"][t] = {"aggregate": aggregate, "per_prompt": per_prompt}
    return out


ARMS = {"sft": ("sft", "", 0.0), "dpo-p1": ("dpo", "p1", 0.6), "ppo-p1": ("ppo", "p1", 1.2),
        "dpo-p2": ("dpo", "p2", 1.2), "ppo-p2": ("ppo", "p2", 0.62)}


def write_runs(root, seeds=(0, 1)):
    arms = []
    for name, (algorithm, group, offset) in ARMS.items():
        runs = []
        for seed in seeds:
            folder = root / "runs" / name / f"seed-{seed}"
            folder.mkdir(parents=True)
            # the same sampling seed for every arm at seed S: the noise is shared, as in a real study
            (folder / "eval.json").write_text(json.dumps(fake_eval(offset, seed)))
            runs.append({"seed": seed, "dir": str(folder)})
        arms.append({"name": name, "algorithm": algorithm, "group": group, "params": {}, "runs": runs})
    return arms


def test_metric_grid_stacks_seeds_prompts_samples(tmp_path):
    arms = write_runs(tmp_path)
    evals = [read_eval(r["dir"]) for r in arms[1]["runs"]]
    grid = metric_grid(evals, "0.7", "gold")
    assert grid.shape == (2, 16, 4)
    assert grid[1, 3, 2] == evals[1]["temperatures"]["0.7"]["per_prompt"][3]["values"]["gold"][2]
    assert metric_grid(evals, "0.7", "distinct_2").shape == (2, 16, 1)
    assert metric_grid(evals, "1.0", "gold") is None


def test_summary_paired_rankings_and_phases(tmp_path):
    arms = write_runs(tmp_path)
    study = summarize_arms(arms, "sft", "gold", resamples=300)
    assert list(study["temperatures"]) == ["0.7", "0.3"] and study["prompts"] == PROMPTS
    block = study["temperatures"]["0.7"]
    for name, (_, _, offset) in ARMS.items():
        assert block["summary"][name]["gold"]["mean"] == pytest.approx(offset, abs=0.05)
    # paired per-prompt difference, brute force from the files
    arm = [read_eval(r["dir"])["temperatures"]["0.7"]["per_prompt"] for r in arms[1]["runs"]]
    sft = [read_eval(r["dir"])["temperatures"]["0.7"]["per_prompt"] for r in arms[0]["runs"]]
    expected = [np.mean([a[p]["values"]["gold"][s] - b[p]["values"]["gold"][s]
                         for a, b in zip(arm, sft, strict=True) for s in range(4)]) for p in range(16)]
    assert np.allclose(block["paired"]["dpo-p1"]["gold"]["per_prompt"], expected)
    assert "sft" not in block["paired"]
    # the noise is shared by every arm at a seed, so the paired interval is tight around the offset
    assert block["paired"]["dpo-p1"]["gold"]["ci_high"] - block["paired"]["dpo-p1"]["gold"]["ci_low"] < 0.1
    # rankings within each group, the baseline joins both
    assert [e["arm"] for e in block["ranking"]["p1"]] == ["ppo-p1", "dpo-p1", "sft"]
    assert [e["arm"] for e in block["ranking"]["p2"]] == ["dpo-p2", "ppo-p2", "sft"]
    assert block["ranking"]["p2"][1]["rank"] == 2 and "sft" not in block["ranking"]["p2"][1]["tied_with"]
    (phase,) = study["phases"]
    c = phase["temperatures"]["0.7"]
    assert c["changed"] and c["order_before"] == ["ppo", "dpo", "sft"] and c["order_after"] == ["dpo", "ppo", "sft"]
    assert c["outside_intervals"] == "yes"
    assert c["change"]["dpo"]["mean"] == pytest.approx(0.6, abs=0.01)
    assert c["change"]["ppo"]["mean"] == pytest.approx(-0.58, abs=0.01)
    assert "sft" not in c["change"]  # the same arm in both phases


def test_without_a_baseline_there_are_no_paired_differences(tmp_path):
    arms = write_runs(tmp_path, seeds=(0,))
    study = summarize_arms(arms[1:3], None, "gold", resamples=100)
    assert study["temperatures"]["0.7"]["paired"] == {}
    assert list(study["temperatures"]["0.7"]["ranking"]) == ["p1"]
    assert study["phases"] == []

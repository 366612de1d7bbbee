"""Golden trajectories: four steps of each trainer (pretrain, sft, rm, dpo, ppo, grpo) reproduce recorded metrics.

Each run is built by one function in tests/helpers.py (`GOLDEN_RUNS`) on a tiny model and in-test data; its first
steps' key metrics, its end-of-run held-out metrics and a fingerprint of its final weights are compared with
tests/golden/NAME.json, recorded on the commit, machine and torch version named in that file. They guard silent
changes to sampling, packing, masks, advantages, losses, schedules and the loop: a refactor that claims "behaviour
unchanged" must leave them passing.

Re-record (only for an intended change of behaviour, and say why in the commit message):

    RLHFLAB_RECORD_GOLDEN=1 pytest tests/test_golden.py          # all six
    RLHFLAB_RECORD_GOLDEN=1 pytest tests/test_golden.py -k dpo   # one

In record mode each test rewrites its file instead of comparing, and passes.

Tolerance (TOLERANCE below): on the recording machine and torch version a rerun is bit-identical. Refactors may
still reorder float sums (a masked mean written once instead of three times, a loss computed in one call instead
of two), which moves float32 results by a few ulps per step. Measured on the recording machine: the same six runs
with the eager attention kernel instead of sdpa (same maths, other summation order) moved every recorded value by
at most 1e-5 relative (PPO's policy/approx_kl, DPO's held-out rewards) and 5e-5 absolute (the weights'
projection, a sum of 21,376 terms); with 2 torch threads instead of 1, at most 6e-6 relative (PPO). TOLERANCE
sits ten times above that and far below a real change of behaviour (a changed hyper-parameter, mask, schedule or
loss term moves these metrics by 1e-3 or more). On another CPU or torch version the kernels differ, and PPO/GRPO
may sample another token at a near-tie: if only this test fails there, re-record on that machine and compare the
two files.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from helpers import GOLDEN_RUNS, weights_fingerprint

GOLDEN_DIR = Path(__file__).parent / "golden"
RECORD = os.environ.get("RLHFLAB_RECORD_GOLDEN") == "1"
TOLERANCE = {"rel": 1e-4, "abs": 1e-6}  # pytest.approx: |got − recorded| ≤ max(rel·|recorded|, abs)

# The metrics each trajectory records per step, under their names at the recording commit (2dfa8b2).
KEYS = {
    "pretrain": ["loss", "grad_norm", "mean_token_accuracy", "lr"],
    "sft": ["loss", "grad_norm", "mean_token_accuracy", "lr"],
    "rm": ["loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "grad_norm", "lr"],
    "dpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "lr"],
    "ppo": ["loss", "objective/scores", "objective/kl", "objective/entropy", "entropy", "loss/policy", "loss/value",
            "policy/approx_kl", "policy/clip_frac", "value/explained_var", "completions/mean_length", "grad_norm"],
    "grpo": ["loss", "reward", "reward_std", "kl", "entropy", "clip_ratio/region", "completions/mean_length",
             "grad_norm"],
}


# A metric renamed since the recording: {(trainer, recorded name): name now}. The values must not change, so the
# files keep the names they were recorded under (e.g. PPO's objective/kl -> kl, objective/scores -> reward).
RENAMED: dict[tuple[str, str], str] = {
    ("ppo", "objective/scores"): "reward", ("ppo", "policy/approx_kl"): "approx_kl",
    ("ppo", "policy/clip_frac"): "clip_ratio/region",
}
# Recorded values no longer logged, and why: {(trainer, recorded name): reason}.
DROPPED: dict[tuple[str, str], str] = {
    ("rm", "eval/num_pairs"): "a count of held-out pairs, not a metric: the end-of-run evaluate() logs metrics only",
}


def _trajectory(name: str, tmp_path: Path) -> dict:
    run = GOLDEN_RUNS[name](tmp_path)
    now = {key: RENAMED.get((name, key), key) for key in KEYS[name]}
    return {
        "steps": [{"step": m["step"], **{k: m[now[k]] for k in KEYS[name] if now[k] in m}} for m in run.metrics],
        "final": run.final,
        "weights": weights_fingerprint(run.model),
    }


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{platform.machine()} {names[0] if names else platform.processor()}".strip()


def _provenance(name: str) -> dict:
    root = Path(__file__).parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run([*git, "status", "--porcelain", "rlhflab"], capture_output=True, text=True).stdout
    return {
        "commit": commit + (" (rlhflab/ modified)" if changed.strip() else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": _cpu_name(),
        "made_by": f"RLHFLAB_RECORD_GOLDEN=1 pytest tests/test_golden.py -k {name} (tests/helpers.py: GOLDEN_RUNS)",
    }


def _compare(name: str, got: dict, want: dict, where: str) -> list[str]:
    """Every recorded value, as 'where: got x, recorded y' for each outside the tolerance."""
    errors = []
    for key, value in want.items():
        if (name, key) in DROPPED:
            continue
        if key not in got:
            errors.append(f"{where}: {key} missing")
        elif got[key] != pytest.approx(value, **TOLERANCE):
            errors.append(f"{where}: {key} = {got[key]!r}, recorded {value!r}")
    return errors


@pytest.mark.parametrize("name", list(GOLDEN_RUNS))
def test_golden_trajectory(name, tmp_path):
    path = GOLDEN_DIR / f"{name}.json"
    got = _trajectory(name, tmp_path)
    if RECORD:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps({**_provenance(name), **got}, indent=1) + "\n")
        return
    want = json.loads(path.read_text())
    assert [s["step"] for s in got["steps"]] == [s["step"] for s in want["steps"]]
    errors = [e for g, w in zip(got["steps"], want["steps"], strict=True) for e in _compare(name, g, w, f"step {w['step']}")]
    errors += _compare(name, got["final"], want["final"], "end of run")
    errors += _compare(name, got["weights"], want["weights"], "final weights")
    context = f"recorded at {want['commit']} with torch {want['torch']}; running torch {torch.__version__}"
    assert not errors, f"{name} left its golden trajectory ({context}):\n" + "\n".join(errors)

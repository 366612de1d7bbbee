"""DPO monitors on synthetic metric streams: each fires on its failure and stays silent on a healthy run."""

from __future__ import annotations

import io
import math

import pytest
import torch

from rlhflab.diagnostics.dpo import (
    ChosenLogpsFallingMonitor,
    MarginExplosionMonitor,
    OverfitMonitor,
    StartCheckMonitor,
)


def _run(monitor, stream):
    return [f for step, metrics in enumerate(stream) for f in monitor.observe(step, metrics)]


def _healthy(steps: int = 200):
    """Loss falls from ln 2 to ~0.45, accuracy to ~0.75, margin to ~1.5, chosen log-probs steady."""
    out = []
    for t in range(steps):
        x = t / steps
        out.append({
            "loss": math.log(2) - 0.25 * x, "dpo_loss": math.log(2) - 0.25 * x,
            "rewards/accuracies": 0.0 if t == 0 else 0.5 + 0.25 * x, "rewards/margins": 1.5 * x,
            "logps/chosen": -40.0 + 0.5 * math.sin(t), "logps/rejected": -42.0 - 3 * x,
            "eval/rewards/accuracies": 0.7 if t % 25 == 0 and t else None,
        })  # fmt: skip
        out[-1] = {k: v for k, v in out[-1].items() if v is not None}
    return out


def test_start_check_passes_and_fails():
    ok = StartCheckMonitor().observe(
        0, {"loss": math.log(2), "rewards/accuracies": 0.0, "rewards/margins": 0.0}
    )
    assert [(f.code, f.severity) for f in ok] == [("dpo.start_not_ln2", "info")]
    bad = StartCheckMonitor().observe(0, {"loss": 0.70, "rewards/accuracies": 0.0, "rewards/margins": 0.0})
    assert [(f.code, f.severity) for f in bad] == [("dpo.start_not_ln2", "error")]
    ties_won = StartCheckMonitor().observe(
        0, {"loss": math.log(2), "rewards/accuracies": 0.5, "rewards/margins": 0}
    )
    assert ties_won[0].severity == "error"
    hinge = StartCheckMonitor(expected_loss=1.0).observe(
        0, {"loss": 1.0, "rewards/accuracies": 0, "rewards/margins": 0}
    )
    assert hinge[0].severity == "info"
    assert StartCheckMonitor().observe(5, {"loss": 3.0}) == []  # only step 0 (a resumed run skips it)


def test_healthy_stream_is_silent():
    for monitor in (MarginExplosionMonitor(), ChosenLogpsFallingMonitor(), OverfitMonitor()):
        assert _run(monitor, _healthy()) == [], type(monitor).__name__


def test_margin_explosion_fires_once():
    # batch 1: accuracy is 0 or 1 per step; margins run away while the loss vanishes
    stream = [
        {"loss": 1e-4, "rewards/accuracies": 1.0 if t % 20 else 0.0, "rewards/margins": 5.0 + 0.5 * t}
        for t in range(120)
    ]
    findings = _run(MarginExplosionMonitor(), stream)
    assert [f.code for f in findings] == ["dpo.margin_explosion"]
    assert "raise beta" in findings[0].advice.lower()
    # large margins while the loss is still high (hard pairs) are not an explosion
    assert _run(MarginExplosionMonitor(), [{**row, "loss": 0.4} for row in stream]) == []
    # configurable threshold
    assert _run(MarginExplosionMonitor(max_margin=100.0), stream) == []


def test_chosen_logps_falling_fires():
    stream = [
        {"logps/chosen": -40.0 - 0.2 * t, "rewards/margins": 0.05 * t, "rewards/accuracies": 0.8, "loss": 0.4}
        for t in range(100)
    ]
    findings = _run(ChosenLogpsFallingMonitor(), stream)
    assert [f.code for f in findings] == ["dpo.chosen_logps_falling"]
    # chosen falling but the margin shrinking is a different failure: stay silent
    shrinking = [{**row, "rewards/margins": -0.05 * t} for t, row in enumerate(stream)]
    assert _run(ChosenLogpsFallingMonitor(), shrinking) == []


def test_overfit_fires_on_gap():
    stream = [{"rewards/accuracies": 1.0} for _ in range(30)] + [
        {"rewards/accuracies": 1.0, "eval/rewards/accuracies": 0.55}
    ]
    assert [f.code for f in _run(OverfitMonitor(), stream)] == ["dpo.overfit"]
    close = stream[:-1] + [{"rewards/accuracies": 1.0, "eval/rewards/accuracies": 0.85}]
    assert _run(OverfitMonitor(), close) == []


def _exploding(steps: int = 120):
    return [{"loss": 1e-4, "rewards/accuracies": 1.0, "rewards/margins": 5.0 + 0.5 * t} for t in range(steps)]


def _displacing(steps: int = 100):
    return [{"logps/chosen": -40.0 - 0.2 * t, "rewards/margins": 0.05 * t, "rewards/accuracies": 0.8, "loss": 0.4}
            for t in range(steps)]  # fmt: skip


def _overfitting(steps: int = 13):
    return [{"rewards/accuracies": 1.0, **({"eval/rewards/accuracies": 0.5} if t == steps - 1 else {})}
            for t in range(steps)]  # fmt: skip


def _restored(monitor: type, state: dict):
    """A fresh monitor loaded from `state` as a resumed run loads it: through torch.save and a weights-only load."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = monitor()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize(("monitor", "stream", "cut"), [
    (MarginExplosionMonitor, _exploding(), 8),  # mid-window: the window's first steps come from the checkpoint
    (MarginExplosionMonitor, _exploding() + [{**r, "rewards/margins": 1.0} for r in _exploding(15)] + _exploding(),
     60),  # fired before the checkpoint: it must not fire again until the margin is back in range, then re-arms
    (ChosenLogpsFallingMonitor, _displacing(), 30),  # the first window is complete, the recent one is not
    (OverfitMonitor, _overfitting(), 5),  # the train-accuracy window spans the checkpoint
    (OverfitMonitor, _overfitting() + _overfitting(40), 18),  # fired once before the checkpoint, never again
])  # fmt: skip
def test_a_restored_monitor_finds_what_the_uninterrupted_one_finds(monitor, stream, cut):
    whole = [(f.step, f.code, f.message) for f in _run(monitor(), stream)]
    assert whole  # each stream makes its monitor fire, so a state lost on the way changes the findings
    first = monitor()
    before = [(f.step, f.code, f.message) for s, m in enumerate(stream[:cut]) for f in first.observe(s, m)]
    resumed = _restored(monitor, first.state_dict())
    after = [(f.step, f.code, f.message) for s, m in enumerate(stream[cut:], cut) for f in resumed.observe(s, m)]
    assert before + after == whole
    fresh = monitor()  # and a fresh monitor without the state would not: the state is what carries it
    assert before + [(f.step, f.code, f.message) for s, m in enumerate(stream[cut:], cut)
                     for f in fresh.observe(s, m)] != whole  # fmt: skip

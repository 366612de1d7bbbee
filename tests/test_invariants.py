"""Gradient-accumulation invariance of each trainer, on the golden runs' set-ups (tests/helpers.py).

TRL's invariant: a step of N examples trains the same whether it is one micro-batch of N, N micro-batches of one, or
micro-batches of unequal size, because every loss is normalised over the whole step, not per micro-batch. Checked
through each algorithm's run function: the same logged loss at every step and the same final weights, to float32
rounding (micro-batches pad and pack their rows differently, so sums run in another order). PPO's is in test_ppo.py,
the loop's own on a least-squares toy in test_training.py.

Measured on these set-ups: the splits agree to 5e-7 (relative) in the loss and 1e-5 in any weight (Adam divides
each gradient by its own running scale, so a weight whose gradient is near zero moves by rounding noise). A loss
normalised per micro-batch instead (the bug this guards against) moves the loss by 3e-3 to 0.8 (relative) and
some weight by 8e-3 or more, in the uneven split; with pairs or prompts (RM, DPO, GRPO) an even split cannot show it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GOLDEN_RUNS

# name: (examples per step: sequences, pairs or prompts; an accumulation that splits them unevenly)
SPLITS = {"sft": (5, 2), "rm": (5, 2), "dpo": (5, 2), "grpo": (3, 2)}


@pytest.mark.parametrize("name", list(SPLITS))
def test_accumulation_matches_full_batch(name, tmp_path):
    batch_size, uneven = SPLITS[name]
    whole = GOLDEN_RUNS[name](tmp_path / "whole", batch_size=batch_size)
    for grad_accum in (batch_size, uneven):  # batch 1 × accumulation N; micro-batches of 3 and 2 (2 and 1)
        split = GOLDEN_RUNS[name](tmp_path / f"accum-{grad_accum}", batch_size=batch_size, grad_accum=grad_accum)
        assert len(split.metrics) == len(whole.metrics)
        for a, b in zip(whole.metrics, split.metrics, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (grad_accum, a["step"])
        for (key, p), q in zip(whole.model.state_dict().items(), split.model.state_dict().values(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-4, msg=lambda m, k=key, g=grad_accum: f"{k}, {g}: {m}")


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_gradient_checkpointing_matches_the_plain_backward(name, tmp_path):
    """--gradient-checkpointing recomputes each decoder layer in the backward: the same losses, gradient norms
    and final weights as keeping every activation (recomputation repeats the same ops, so float32 rounding
    alone may differ). It must also be on: a recomputed layer runs its forward twice per step."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    plain = GOLDEN_RUNS[name](tmp_path / "plain")
    calls = []
    original = GradientCheckpointingLayer.__call__

    def counting(self, *args, **kwargs):
        calls.append(self.gradient_checkpointing and self.training)
        return original(self, *args, **kwargs)

    GradientCheckpointingLayer.__call__ = counting
    try:
        checkpointed = GOLDEN_RUNS[name](tmp_path / "checkpointed", gradient_checkpointing=True)
    finally:
        GradientCheckpointingLayer.__call__ = original
    assert any(calls), "no decoder layer ran with checkpointing on"
    for a, b in zip(plain.metrics, checkpointed.metrics, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (key, a["step"])
    for (key, p), q in zip(plain.model.state_dict().items(), checkpointed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")

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

"""Self-checks a recipe runs on the first micro-batch of a run: a failure is recorded in diagnostics.jsonl
and stops the run (exit 3) before any update."""

from __future__ import annotations

from rlhflab.core.packing import PackedBatch
from rlhflab.diagnostics.checks import check_packed_mask
from rlhflab.training.loop import TrainingStopped, emit_finding


def stop_on_mask_mismatch(out: str, packed: PackedBatch, groups: list[tuple[list[int], list[list[int]]]]) -> None:
    """`logps.mask_mismatch` on packed rows (`diagnostics.checks.check_packed_mask`); raises TrainingStopped."""
    finding = check_packed_mask(packed, groups)
    if finding is not None:
        emit_finding(out, finding)
        raise TrainingStopped(f"{finding.code}: {finding.message}", 3)

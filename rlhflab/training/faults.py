"""Fault injection for the reliability tests; inert unless RLHFLAB_FAULTS is set.

RLHFLAB_FAULTS is a comma-separated list of POINT@STEP:

    sigterm@3              send SIGTERM to this process as step 3 starts (sigint@3 likewise)
    nan@3                  the loss of every micro-batch of step 3 becomes NaN
    kill@5                 SIGKILL this process right after step 5's metrics line is written
    kill_in_checkpoint@4   SIGKILL while checkpoint step-000004 is half written (weights and state
                           written, manifest not yet, folder not yet renamed)
    disk_full@4            writing checkpoint step-000004 fails with OSError(ENOSPC) at that point

Steps count from 0 as in metrics.jsonl; checkpoints are named by the number of steps done.
`kill` is a module attribute so that in-process tests can replace it with an exception.
"""

from __future__ import annotations

import errno
import os
import signal

import torch


def at(point: str, step: int) -> bool:
    spec = os.environ.get("RLHFLAB_FAULTS")
    return bool(spec) and f"{point}@{step}" in spec.replace(" ", "").split(",")


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_step(step: int) -> None:
    for point, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        if at(point, step):
            os.kill(os.getpid(), sig)


def poison(loss: torch.Tensor, step: int) -> torch.Tensor:
    return loss * float("nan") if at("nan", step) else loss


def after_step(step: int) -> None:
    if at("kill", step):
        kill()


def in_checkpoint(step: int) -> None:
    if at("disk_full", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if at("kill_in_checkpoint", step):
        kill()

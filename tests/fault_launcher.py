"""Fault injection for the reliability tests, through the run's hooks (rlhflab/training/hooks.py).

A fault spec is a comma-separated list of POINT@STEP:

    sigterm@3              send SIGTERM to this process as step 3 starts (sigint@3 likewise)
    nan@3                  the loss of every micro-batch of step 3 becomes NaN
    kill@5                 SIGKILL this process right after step 5's metrics line is written
    kill_in_checkpoint@4   SIGKILL while checkpoint step-000004 is half written (weights and state
                           written, manifest not yet, folder not yet renamed)
    disk_full@4            writing checkpoint step-000004 fails with OSError(ENOSPC) at that point

Steps count from 0 as in metrics.jsonl; checkpoints are named by the number of steps done.
In-process tests install `Faults(spec, kill=...)` around a CLI call (a kill becomes an exception);
a real process is started as

    python tests/fault_launcher.py SPEC rlhflab-args...

which installs `Faults(SPEC)` and runs `rlhflab.cli.main()` with the remaining arguments.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

import torch

from rlhflab.training.hooks import RunHooks, installed


def sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults(RunHooks):
    def __init__(self, spec: str, kill: Callable[[], None] = sigkill_self):
        self.points = set(spec.replace(" ", "").split(",")) - {""}
        self.kill = kill

    def at(self, point: str, step: int) -> bool:
        return f"{point}@{step}" in self.points

    def before_step(self, step: int) -> None:
        for point, sig in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
            if self.at(point, step):
                os.kill(os.getpid(), sig)

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if self.at("nan", step) else loss

    def after_step(self, step: int) -> None:
        if self.at("kill", step):
            self.kill()

    def in_checkpoint(self, step: int) -> None:
        if self.at("disk_full", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.at("kill_in_checkpoint", step):
            self.kill()


if __name__ == "__main__":
    from rlhflab.cli import main

    spec, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    with installed(Faults(spec)):
        main()

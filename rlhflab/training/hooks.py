"""Points where a test can act on a training run; a production run installs nothing here.

    with hooks.installed(my_hooks):   # for this block, in this thread (a ContextVar)
        train(cfg, recipe)            # or rlhflab.cli.main(): the loop and the checkpoint writer call them

The reliability tests inject their faults (signals, NaN losses, kills, a full disk) through these
points: tests/fault_launcher.py. Outside `installed()` the hooks are NO_HOOKS, which do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch


class RunHooks:
    """Every point a test may act on, each doing nothing; a test overrides the ones it needs."""

    def before_step(self, step: int) -> None:
        """As step `step` (counted from 0, as in metrics.jsonl) starts."""

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Each micro-batch's normalised loss of step `step`, before its backward: what to backpropagate."""
        return loss

    def after_step(self, step: int) -> None:
        """Once step `step`'s metrics line and findings are written, before any checkpoint."""

    def in_checkpoint(self, step: int) -> None:
        """While checkpoint `step` is half written: weights and state on disk, manifest not yet, not renamed."""


NO_HOOKS = RunHooks()
_installed: ContextVar[RunHooks] = ContextVar("rlhflab_run_hooks", default=NO_HOOKS)


def current() -> RunHooks:
    """The hooks installed around this call, or ones that do nothing."""
    return _installed.get()


@contextmanager
def installed(hooks: RunHooks) -> Iterator[RunHooks]:
    """Runs inside this block call `hooks`; leaving it restores what was installed before."""
    token = _installed.set(hooks)
    try:
        yield hooks
    finally:
        _installed.reset(token)

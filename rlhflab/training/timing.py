"""Where a step's time goes: wall seconds per phase (`timing/*`) and model FLOPs (`perf/*`), without a profiler.

The loop opens one `StepTimer` for a run and makes it current; code anywhere below it marks its phases and
counts the FLOPs of its forwards:

    with timing.phase("sample"):                        # wall seconds of this phase, this step
        rollout = generate(...)
    with timing.phase("reference", reference, tokens):  # ... and the FLOPs of a no-grad forward of `reference`
        ref_logps = ...                                 #     over `tokens` real tokens
    timing.count_flops(model, tokens, backward=True)    # a forward + backward (the loss of an update)

Outside a training loop (a test calling `plan_step`, the evaluation suite) both do nothing. At the end of
every step the loop takes `timer.lap()`: the step's phases and FLOPs, and starts the next step's window.

Phase times are exclusive (a profiler's "self time"): a phase opened inside another is subtracted from the
outer one, so the phases of a step never overlap and their sum is at most `timing/step`. The window of
`timing/step` runs from the previous step's lap to this one's, so the steps' times add up to the line's
`time`; what falls between two laps outside every phase (monitors, logging, the signal check) is the
difference `timing/step − Σ phases`. On CUDA, kernels run asynchronously: each phase boundary synchronizes
the device, so a kernel's time lands in the phase that launched it.

Model FLOPs (PaLM, Chowdhery et al. 2022, appendix B; nanoGPT's `estimate_mfu`): per real token, a forward
costs 2N (one multiply-add per weight), a backward 2N for the activations' gradients plus 2N_trainable for
the weights' gradients, so a full fine-tuning step costs the familiar 6N per token and a LoRA step about
4N. N counts the weights that multiply activations (`matmul_params`). The attention scores' own FLOPs
(PaLM's 12·layers·hidden·context per trained token) are left out: packed rows attend over block-diagonal
contexts of varying length; for SmolLM2-135M at 200-token contexts they would add about 5%. Padding,
activation recomputation (gradient checkpointing) and the sampler's finished rows are not model FLOPs
either, so MFU is a lower bound of the hardware's utilisation.

    perf/tflops = step FLOPs / timing/step / 1e12         achieved model TFLOP/s
    perf/mfu    = step FLOPs / timing/step / peak          model FLOPs utilisation, a fraction (0-1)

Under torchrun each process counts its own FLOPs over its own wall time; rank 0 logs its own numbers
(the other processes' are not gathered: each holds an equal share of every step).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from rlhflab.core.causal_lm import matmul_params

# bf16 dense tensor-core peaks in TFLOP/s (vendor data sheets), matched against torch.cuda.get_device_name in
# this order: the first fragment the name contains wins. MFU is reported against the bf16 peak, also for fp32
# runs (as verl does): the fraction of what the device could do.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass
class StepTiming:
    """One step's measurements, as `StepTimer.lap` hands them to the loop."""

    seconds: float  # wall time of the step (since the previous lap)
    phases: dict[str, float]  # exclusive wall seconds of each phase opened in the step
    flops: float  # model FLOPs counted in the step

    def metrics(self, peak_flops: float | None) -> dict[str, float]:
        """`timing/step`, `timing/PHASE`, and `perf/tflops`, `perf/mfu` (where FLOPs were counted; mfu where the
        device's peak FLOP/s is known)."""
        metrics = {"timing/step": self.seconds, **{f"timing/{name}": s for name, s in self.phases.items()}}
        if self.flops > 0 and self.seconds > 0:
            metrics["perf/tflops"] = self.flops / self.seconds / 1e12
            if peak_flops:
                metrics["perf/mfu"] = self.flops / self.seconds / peak_flops
        return metrics


class StepTimer:
    """Exclusive wall time per named phase and a FLOP count, from one `lap` to the next."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 synchronize: Callable[[], None] = _synchronize):  # fmt: skip
        self.clock, self.synchronize = clock, synchronize
        self.started = clock()
        self.phases: dict[str, float] = {}
        self.flops = 0.0
        self._nested: list[float] = []  # per open phase: seconds spent in phases opened inside it

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.synchronize()  # work launched before the phase is not the phase's
        start = self.clock()
        self._nested.append(0.0)
        try:
            yield
        finally:
            self.synchronize()
            elapsed = self.clock() - start
            inner = self._nested.pop()
            self.phases[name] = self.phases.get(name, 0.0) + elapsed - inner
            if self._nested:
                self._nested[-1] += elapsed

    def lap(self) -> StepTiming:
        """This step's measurements; the next step's window starts now."""
        assert not self._nested, "lap() inside a phase"
        self.synchronize()
        now = self.clock()
        timing = StepTiming(now - self.started, self.phases, self.flops)
        self.started, self.phases, self.flops = now, {}, 0.0
        return timing


_current: StepTimer | None = None  # the timer of the training loop that is running, if any


@contextmanager
def measuring(timer: StepTimer) -> Iterator[StepTimer]:
    """Make `timer` the one `phase` and `count_flops` report to, for the duration of the block."""
    global _current
    previous, _current = _current, timer
    try:
        yield timer
    finally:
        _current = previous


def phase(name: str, model: torch.nn.Module | None = None, tokens: int = 0) -> Any:
    """A context manager timing the block as phase `name` of the current step (nothing outside a loop); with a
    `model`, the block is a no-grad forward of it over `tokens` real tokens, counted as `count_flops` does."""
    if _current is None:
        return nullcontext()
    if model is not None:
        count_flops(model, tokens)
    return _current.phase(name)


def count_flops(model: torch.nn.Module, tokens: int, backward: bool = False) -> None:
    """Count a forward of `model` over `tokens` real tokens (and its backward) into the current step."""
    if _current is not None and tokens:
        _current.flops += flops_per_token(model, backward) * tokens


def flops_per_token(model: torch.nn.Module, backward: bool = False) -> float:
    """2N for a forward; 2N + 2N + 2N_trainable with the backward (6N for full fine-tuning)."""
    total, trainable = matmul_params(model)
    return 2.0 * total + ((2.0 * total + 2.0 * trainable) if backward else 0.0)


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """The device's peak FLOP/s: `peak_tflops` when given (> 0), else a known CUDA device's bf16 dense peak
    (`PEAK_TFLOPS`), else None (a CPU, or an unknown accelerator: no perf/mfu)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in PEAK_TFLOPS if fragment in name), None)

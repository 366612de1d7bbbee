"""The one training loop shared by every stage. It knows nothing about any algorithm.

An algorithm hands it a `Recipe`:

    plan = recipe.plan_step(step)         # what this step trains on: a list of optimizer updates,
                                          # each a list of micro-batches, plus step-level metrics
    numerator, metrics = recipe.loss(mb)  # one micro-batch's summed loss

Each micro-batch carries `num_items` (tokens, pairs or sequences, known before the forward). The
loop divides every micro-batch's loss by the total `num_items` of its update, so one update of
B examples gives the same gradient whether it arrives as 1 micro-batch or as 8 (gradient
accumulation normalised over the whole accumulated batch).

    step ─► plan_step ─► for update: for mb: (loss(mb) / Σ num_items).backward()
                                     clip ─► finite? ─► optimizer.step ─► scheduler.step
         ─► metrics.jsonl / TensorBoard ─► monitors ─► checkpoint

With `precision: bf16`, plan_step (sampling, reference forwards) and every loss forward run under
bf16 autocast; backward, optimizer, weights and checkpoints stay fp32 (mixed precision).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.console import Console
from transformers import get_scheduler

from rlhflab.config import RunConfig
from rlhflab.diagnostics.findings import Finding, FindingsLog, Monitor, NonFiniteMonitor
from rlhflab.errors import InputError
from rlhflab.training import distributed, faults
from rlhflab.training.checkpoint import (
    CheckpointWriteError,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rlhflab.training.metrics import MetricsWriter, truncate_jsonl
from rlhflab.training.precision import bf16_is_emulated, mixed_precision

console = Console(stderr=True)


@dataclass
class StepPlan:
    updates: list[list[Any]]  # optimizer updates; each is a list of micro-batches with a `num_items` key
    metrics: dict[str, float] = field(default_factory=dict)  # step-level metrics (e.g. rollout rewards)
    samples: list[dict[str, Any]] = field(default_factory=list)  # example rollouts, logged to completions.jsonl
    num_tokens: int = 0  # real tokens the step trains on (the loop logs their running total, TRL's `num_tokens`)


class Recipe(Protocol):
    model: torch.nn.Module  # every trainable parameter (policy, or policy + value head)
    updates_per_step: int  # optimizer updates in each StepPlan (for the LR schedule)

    def plan_step(self, step: int) -> StepPlan: ...

    def loss(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingStopped(Exception):
    """The run stopped early (signal, non-finite values or an error finding); `exit_code` says how."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads if threads > 0 else distributed.default_threads(os.cpu_count() or 1))
    # Denormal floats (e.g. tiny updates to a zero-initialised value head) can make CPU matmuls many times slower.
    torch.set_flush_denormal(True)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


class _StopSignal:
    """SIGTERM/SIGINT: finish the current step, write a checkpoint, exit non-zero."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        console.print("[yellow]stop requested: finishing this step and writing a checkpoint[/]")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    cfg: RunConfig,
    recipe: Recipe,
    monitors: list[Monitor] | None = None,
    on_first_step: Callable[[int], None] | None = None,
) -> FindingsLog:
    """Run `cfg.max_steps` steps of `recipe` into `cfg.out`; resumable; returns the findings.

    Inside `distributed.data_parallel()` under torchrun the steps are data-parallel (see
    training/distributed.py) and processes other than rank 0 end when training is done
    (`distributed.RunContinuesOnMain`).
    """
    world = distributed.world_size()
    if world > 1 and cfg.batch_size % (cfg.grad_accum * world):  # one process keeps uneven micro-batches
        raise InputError(
            f"with {world} processes the batch must split into grad_accum ({cfg.grad_accum}) equal micro-batches "
            f"per process: make it a multiple of {cfg.grad_accum * world}",
            field="batch_size",
        )
    main = distributed.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = recipe.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (a Python loop of per-tensor ops cost 0.14 s a step at 30M)
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, cfg.adam_beta2), fused=True
    )
    total_updates = cfg.max_steps * recipe.updates_per_step
    schedule = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_updates),
        num_training_steps=total_updates,
        scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio} if schedule == "cosine_with_min_lr" else None,
    )
    monitors = [NonFiniteMonitor(), *(monitors or [])]
    findings = FindingsLog(out / "diagnostics.jsonl", console)
    if cfg.precision == "bf16" and main and bf16_is_emulated(next(model.parameters()).device):
        console.print("[yellow]warning:[/] this CPU has no bf16 instructions (avx512_bf16, AMX): bf16 autocast is "
                      "emulated and usually slower than --precision fp32")  # fmt: skip

    start_step = 0
    if cfg.resume:
        checkpoint = find_resume_checkpoint(out, cfg.resume, warn=lambda m: console.print(f"[yellow]{m}[/]"))
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, model)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            recipe.load_state_dict(state["recipe"])
            for monitor, monitor_state in zip(monitors, state["monitors"], strict=True):
                monitor.load_state_dict(monitor_state)
            _set_rng_state(state["rng"])
            start_step = state["step"]
            if main:
                console.print(f"resuming from {checkpoint} at step {start_step}")
    metrics_writer = MetricsWriter(out, keep_until_step=start_step if cfg.resume else None, enabled=main)
    if main and not cfg.resume:
        (out / "diagnostics.jsonl").write_text("")
    elif main:
        truncate_jsonl(out / "diagnostics.jsonl", start_step)

    def checkpoint_now(step: int) -> None:
        error = None
        if main:  # every process holds the same state: rank 0 writes it
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "recipe": recipe.state_dict(),
                "monitors": [m.state_dict() for m in monitors],
                "rng": _rng_state(),
            }
            try:
                save_checkpoint(out, step, model, state, keep=cfg.keep_checkpoints)
            except CheckpointWriteError as exc:
                error = exc
        # every process learns whether the write worked, and none runs on while it is written
        if not distributed.all_true(error is None):
            message = error or "rank 0 could not write a checkpoint"
            raise TrainingStopped(f"{message}. The previous checkpoint is intact; free space and resume.", 1) from error

    consecutive_bad = 0
    started = time.perf_counter()
    progress = _progress(cfg, start_step)
    with distributed.process_group(agreed=(TrainingStopped,)):
        loss_fn = distributed.wrap_loss(recipe)
        with _StopSignal() as stop, progress:
            task = progress.add_task(Path(cfg.out).name, total=cfg.max_steps, completed=start_step)
            for step in range(start_step, cfg.max_steps):
                model.train()
                faults.before_step(step)
                with mixed_precision(cfg.precision, model):
                    plan = recipe.plan_step(step)
                # a step of several updates (PPO epochs, GRPO iterations) may go bad after some were applied:
                # in skip mode the whole step is undone, so keep a copy of the state it started from
                before = _snapshot(model, optimizer, scheduler) if cfg.on_nonfinite == "skip" and len(plan.updates) > 1 else None
                metrics, applied = _run_updates(
                    plan, loss_fn, optimizer, scheduler, trainable, cfg.max_grad_norm, step,
                    forward_context=lambda: mixed_precision(cfg.precision, model),
                )  # fmt: skip
                if not applied and before is not None:
                    model.load_state_dict(before["model"])
                    optimizer.load_state_dict(before["optimizer"])
                    scheduler.load_state_dict(before["scheduler"])
                metrics = {**plan.metrics, **metrics, "lr": scheduler.get_last_lr()[0]}
                if step == start_step and on_first_step is not None:
                    on_first_step(step)
                new_findings = [f for m in monitors for f in m.observe(step, metrics)]
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1 or not applied:
                    metrics_writer.write(step, metrics, time.perf_counter() - started)
                    metrics_writer.write_samples(step, plan.samples)
                if main:
                    findings.emit(new_findings)
                faults.after_step(step)
                progress.update(task, completed=step + 1, description=_describe(metrics))
                if not applied:
                    consecutive_bad += 1
                    if cfg.on_nonfinite == "stop" or consecutive_bad > cfg.max_nonfinite_skips:
                        metrics_writer.close()
                        raise TrainingStopped(
                            f"non-finite loss or gradients at step {step} (train.nonfinite); the last good "
                            f"checkpoint is kept in {out / 'checkpoints'}",
                            3,
                        )
                else:
                    consecutive_bad = 0
                errors = [f for f in new_findings if f.severity == "error" and f.code != "train.nonfinite"]
                if errors:
                    metrics_writer.close()
                    raise TrainingStopped(f"{errors[0].code}: {errors[0].message}", 3)
                done = step + 1
                received = int(distributed.all_reduce([float(stop.received or 0)], op="max")[0])  # any process's
                if received:
                    checkpoint_now(done)
                    metrics_writer.close()
                    raise TrainingStopped(
                        f"stopped by signal {received} after step {done}; resume with the same command plus "
                        f"--resume auto (out: {out})",
                        130,
                    )
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                    checkpoint_now(done)
        checkpoint_now(cfg.max_steps)
    metrics_writer.close()
    distributed.leave_unless_main()
    return findings


def _run_updates(plan: StepPlan, loss_fn, optimizer, scheduler, trainable, max_grad_norm: float, step: int,
                 forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):  # fmt: skip
    """Apply each update of the plan; return (metrics averaged by num_items, every update applied?).

    `loss_fn` is `recipe.loss` (through DDP under torchrun, where each process runs its share of
    every update's micro-batches and the loss and metrics are summed over processes).
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    applied = True
    loss_total, grad_norms = 0.0, []
    for micro_batches in plan.updates:
        # the whole update's, on every process; an update of no items (all masked) gives a zero gradient, not 0/0
        total_items = max(float(sum(mb["num_items"] for mb in micro_batches)), 1.0)
        update_loss = 0.0
        mine = distributed.share(micro_batches)
        for i, mb in enumerate(mine):
            with distributed.gradient_sync(last=i == len(mine) - 1):
                with forward_context():  # backward runs outside autocast, as torch recommends
                    numerator, mb_metrics = loss_fn(mb)
                loss = faults.poison(numerator / total_items, step)
                distributed.backward(loss)
            update_loss += loss.item()
            for key, value in mb_metrics.items():
                sums[key] = sums.get(key, 0.0) + value * mb["num_items"]
                weights[key] = weights.get(key, 0.0) + mb["num_items"]
        update_loss = distributed.all_reduce([update_loss])[0]  # each process summed its share's part
        if max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm).item()
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in trainable if p.grad is not None])
            ).item()
        if math.isfinite(update_loss) and math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
        else:
            applied = False  # keep the weights and optimizer state of the last good update
        optimizer.zero_grad(set_to_none=True)
        loss_total += update_loss
        grad_norms.append(grad_norm)
        if not applied:
            break  # the step is rejected as a whole: later updates of it would build on a bad one
    keys = list(sums)  # the same keys in the same order on every process: one recipe, same micro-batch kinds
    totals = distributed.all_reduce([sums[k] for k in keys] + [weights[k] for k in keys])
    weight_of = dict(zip(keys, totals[len(keys) :], strict=True))
    # a metric of no items (every token masked, e.g. all completions cut off) is undefined: NaN, not 0/0
    metrics = {k: totals[i] / weight_of[k] if weight_of[k] else math.nan for i, k in enumerate(keys)}
    metrics["loss"] = loss_total / len(grad_norms)
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics, applied


def _snapshot(model: torch.nn.Module, optimizer, scheduler) -> dict[str, Any]:
    import copy

    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict())}


def _describe(metrics: dict[str, float]) -> str:
    shown = {k: metrics[k] for k in ("loss", "rewards/accuracies", "reward", "objective/scores") if k in metrics}
    return " ".join(f"{k}={v:.3f}" for k, v in shown.items())


def _progress(cfg: RunConfig, start_step: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not cfg.progress or not distributed.is_main(),
        transient=True,
    )


def emit_finding(out: Path, finding: Finding) -> None:
    """Record a finding raised outside the loop (e.g. a set-up check) in the run's diagnostics.jsonl."""
    if distributed.is_main():
        FindingsLog(Path(out) / "diagnostics.jsonl", console).emit([finding])


def start_run(cfg: RunConfig) -> Path:
    """Create the run folder, write the resolved config, set threads and seeds."""
    from rlhflab.config import save_config

    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            save_config(cfg, out / "config.yaml")
    except OSError as exc:
        raise InputError(f"cannot write the run folder: {exc.strerror or exc}", file=str(out), field="out") from None
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    return out


def save_final_model(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """The run's model as a transformers save_pretrained folder (safetensors) under OUT/model."""
    target = Path(out) / "model"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target

"""The one training loop shared by every stage. It knows nothing about any algorithm.

An algorithm hands it a `Recipe`:

    plan = recipe.plan_step(step)         # what this step trains on: a list of optimizer updates,
                                          # each a list of micro-batches, plus step-level metrics
    numerator, metrics = recipe.loss(mb)  # one micro-batch's summed loss

Each micro-batch carries `num_items` (tokens, pairs or sequences, known before the forward). The
loop divides every micro-batch's loss by the total `num_items` of its update, so one update of
B examples gives the same gradient whether it arrives as 1 micro-batch or as 8 (gradient
accumulation normalised over the whole accumulated batch).

    train: set up ─► resume ─► for step: one step ─► stop on a signal? ─► checkpoint on schedule
           ─► final checkpoint
    one step: plan_step ─► for update: for mb: (loss(mb) / Σ num_items).backward()
                                       clip ─► finite? ─► optimizer.step ─► scheduler.step
              ─► metrics (+ recipe.evaluate() at eval_every and the last step) ─► monitors
              ─► metrics.jsonl / TensorBoard ─► stop on a non-finite step or an error finding

Every metrics line also holds the loop's `num_tokens` (cumulative over the run, kept in checkpoints)
and `perf/tokens_per_second` (since this process's first step), from each StepPlan's `num_tokens`, and
where the step's time went (training/timing.py): `timing/step` (wall seconds since the previous step's
line), the loop's own phases `timing/plan` (plan_step, less the phases the recipe marks inside it:
`timing/sample`, `timing/score`, `timing/reference`, ...), `timing/update` (forward, backward and
optimizer of every update), `timing/evaluate`, `timing/checkpoint` (written after the previous step),
and `perf/tflops`, `perf/mfu` from the FLOPs the recipe counts. Every `timing/` and `perf/` key is
wall-clock (`training.metrics.is_wall_clock`). Under torchrun each process times its own steps and
counts its own FLOPs; rank 0's numbers are the ones written (the others' are not gathered).

With `precision: bf16`, plan_step (sampling, reference forwards), evaluate() and every loss forward run
under bf16 autocast; backward, optimizer, weights and checkpoints stay fp32 (mixed precision).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.console import Console
from transformers import get_scheduler

from rlhflab.config import RunConfig
from rlhflab.diagnostics.findings import Finding, FindingsLog, Monitor, NonFiniteMonitor
from rlhflab.errors import InputError
from rlhflab.models.lora import save_model
from rlhflab.training import distributed, hooks, random_state, timing
from rlhflab.training.activations import enable_gradient_checkpointing
from rlhflab.training.checkpoint import (
    CheckpointWriteError,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rlhflab.training.distributed import TrainingGroup
from rlhflab.training.metrics import MetricsWriter, truncate_jsonl
from rlhflab.training.precision import bf16_is_emulated, mixed_precision
from rlhflab.training.sharding import check_divisible

console = Console(stderr=True)


@dataclass
class StepPlan:
    updates: list[list[Any]]  # optimizer updates; each is a list of micro-batches with a `num_items` key
    metrics: dict[str, float] = field(default_factory=dict)  # step-level metrics (e.g. rollout rewards)
    samples: list[dict[str, Any]] = field(default_factory=list)  # example rollouts, logged to completions.jsonl
    num_tokens: int = 0  # real tokens the step trains on (the loop logs their running total, TRL's `num_tokens`)


class Recipe(Protocol):
    """What an algorithm gives the loop. It may also have:

        evaluate(self) -> dict[str, float]   held-out metrics (keys `eval/...`), called at steps where
                                             step % cfg.eval_every == 0 and after the last step
        progress_metrics: tuple[str, ...]    metrics the progress bar shows (default: ("loss",))
    """

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


@dataclass
class _Run:
    """What one call of `train` carries from step to step."""

    cfg: RunConfig
    recipe: Recipe
    out: Path
    main: bool  # rank 0: the one process that writes files
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    monitors: list[Monitor]
    findings: FindingsLog
    hooks: hooks.RunHooks  # nothing, unless a test installed some (training/hooks.py)
    writer: MetricsWriter | None = None  # opened once the resume point is known
    start_step: int = 0
    num_tokens: int = 0  # real tokens trained on since step 0 of the run (kept in checkpoints)
    started: float = 0.0  # perf_counter as this process's first step starts
    tokens_at_start: int = 0
    consecutive_bad: int = 0  # non-finite steps in a row
    evaluation: dict[str, float] = field(default_factory=dict)  # the latest recipe.evaluate()
    peak_flops: float | None = None  # the device's peak FLOP/s, for perf/mfu (None: unknown)
    timer: timing.StepTimer | None = None  # this process's phase timer, from its first step


def train(cfg: RunConfig, recipe: Recipe, monitors: list[Monitor] | None = None) -> dict[str, float]:
    """Run `cfg.max_steps` steps of `recipe` into `cfg.out`; resumable; returns the final `recipe.evaluate()`
    metrics ({} for a recipe without one).

    Inside `distributed.data_parallel()` under torchrun the steps are data-parallel (see
    training/distributed.py) and processes other than rank 0 end when training is done
    (`distributed.RunContinuesOnMain`).
    """
    # one process keeps uneven micro-batches; data-parallel processes each take grad_accum equal ones
    check_divisible(cfg.batch_size, cfg.grad_accum,
                    f"the batch must split into grad_accum ({cfg.grad_accum}) equal micro-batches per process")
    run = _set_up(cfg, recipe, monitors)
    _resume(run)
    run.writer = _open_logs(run)
    try:
        with distributed.process_group(recipe, agreed=(TrainingStopped,)) as group:
            _train_steps(run, group)
            if run.start_step >= cfg.max_steps:  # a finished run resumed: no step evaluated the final weights
                run.evaluation = _evaluate(run)
            _checkpoint(run, cfg.max_steps)
    except TrainingStopped:
        run.writer.close()
        raise
    run.writer.close()
    distributed.leave_unless_main()
    return run.evaluation


def _set_up(cfg: RunConfig, recipe: Recipe, monitors: list[Monitor] | None) -> _Run:
    """Run folder, optimizer, LR schedule, monitors and findings log."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = recipe.model
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
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
    main = distributed.is_main()
    if cfg.precision == "bf16" and main and bf16_is_emulated(next(model.parameters()).device):
        console.print("[yellow]warning:[/] this CPU has no bf16 instructions (avx512_bf16, AMX): bf16 autocast is "
                      "emulated and usually slower than --precision fp32")  # fmt: skip
    return _Run(
        cfg, recipe, out, main, trainable, optimizer, scheduler,
        monitors=[NonFiniteMonitor(), *(monitors or [])],
        findings=FindingsLog(out / "diagnostics.jsonl", console),
        hooks=hooks.current(),
        peak_flops=timing.peak_flops(next(model.parameters()).device, cfg.peak_tflops),
    )  # fmt: skip


def _resume(run: _Run) -> None:
    """With `--resume`, load the newest valid checkpoint (or the one named): weights, every state, the step."""
    if not run.cfg.resume:
        return
    checkpoint = find_resume_checkpoint(run.out, run.cfg.resume, warn=lambda m: console.print(f"[yellow]{m}[/]"))
    if checkpoint is None:
        return
    state = load_checkpoint(checkpoint, run.recipe.model)
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.recipe.load_state_dict(state["recipe"])
    for monitor, monitor_state in zip(run.monitors, state["monitors"], strict=True):
        monitor.load_state_dict(monitor_state)
    random_state.restore(state["rng"])
    run.start_step = state["step"]
    run.num_tokens = state.get("num_tokens", 0)  # absent from checkpoints written before the loop counted tokens
    if run.main:
        console.print(f"resuming from {checkpoint} at step {run.start_step}")


def _open_logs(run: _Run) -> MetricsWriter:
    """metrics.jsonl and diagnostics.jsonl: fresh, or on resume cut back to the steps before the resume point."""
    writer = MetricsWriter(run.out, keep_until_step=run.start_step if run.cfg.resume else None, enabled=run.main)
    if run.main and not run.cfg.resume:
        (run.out / "diagnostics.jsonl").write_text("")
    elif run.main:
        truncate_jsonl(run.out / "diagnostics.jsonl", run.start_step)
    return writer


def _train_steps(run: _Run, group: TrainingGroup) -> None:
    """Steps from the resume point to the end, under a progress bar; a signal stops after its step."""
    cfg = run.cfg
    with _StopSignal() as stop, _progress(cfg) as progress:
        bar = progress.add_task(run.out.name, total=cfg.max_steps, completed=run.start_step)
        run.started, run.tokens_at_start = time.perf_counter(), run.num_tokens
        run.timer = timing.StepTimer(clock=time.perf_counter)  # the loop's clock: tests replace it
        with timing.measuring(run.timer):
            for step in range(run.start_step, cfg.max_steps):
                metrics = _step(run, group, step)
                progress.update(bar, completed=step + 1, description=_describe(metrics, run.recipe))
                done = step + 1
                _stop_on_signal(run, stop, done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                    with timing.phase("checkpoint"):  # timed in the next step's line
                        _checkpoint(run, done)


def _step(run: _Run, group: TrainingGroup, step: int) -> dict[str, float]:
    """One step: plan, updates, metrics (and evaluation), monitors, logs. Raises TrainingStopped on a bad step."""
    cfg, model = run.cfg, run.recipe.model
    run.hooks.before_step(step)
    model.train()
    with timing.phase("plan"), mixed_precision(cfg.precision, model):
        plan = run.recipe.plan_step(step)
    with timing.phase("update"):
        # a step of several updates (PPO epochs, GRPO iterations) may go bad after some were applied:
        # in skip mode the whole step is undone, so keep a copy of the state it started from
        before = _snapshot(run) if cfg.on_nonfinite == "skip" and len(plan.updates) > 1 else None
        metrics, applied = _run_updates(run, group, plan, step)
        if not applied and before is not None:
            _restore(run, before)
    run.num_tokens += plan.num_tokens
    metrics = {**plan.metrics, **metrics, "lr": run.scheduler.get_last_lr()[0], **_throughput(run)}
    evaluates = step == cfg.max_steps - 1 or (cfg.eval_every > 0 and step % cfg.eval_every == 0)
    if evaluates:
        run.evaluation = _evaluate(run)
        metrics |= run.evaluation
    if run.timer is not None:  # set by _train_steps, which runs every step
        metrics |= run.timer.lap().metrics(run.peak_flops)
    new_findings = [f for m in run.monitors for f in m.observe(step, metrics)]
    if step % cfg.log_every == 0 or step == cfg.max_steps - 1 or not applied or evaluates:
        run.writer.write(step, metrics, time.perf_counter() - run.started)
        run.writer.write_samples(step, plan.samples)
    if run.main:
        run.findings.emit(new_findings)
    run.hooks.after_step(step)
    _stop_on_bad_step(run, step, applied, new_findings)
    return metrics


def _run_updates(run: _Run, group: TrainingGroup, plan: StepPlan, step: int) -> tuple[dict[str, float], bool]:
    """Apply each update of the plan; return (metrics averaged by num_items, every update applied?).

    Under torchrun each process runs its share of every update's micro-batches and the loss and
    metrics are summed over processes.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    applied = True
    loss_total, grad_norms = 0.0, []
    for micro_batches in plan.updates:
        update_loss = _backward_update(run, group, micro_batches, step, sums, weights)
        grad_norm = _clip_gradients(run.trainable, run.cfg.max_grad_norm)
        applied = math.isfinite(update_loss) and math.isfinite(grad_norm)
        if applied:
            run.optimizer.step()
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)  # a bad update keeps the weights and optimizer state of the last good one
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


def _backward_update(run: _Run, group: TrainingGroup, micro_batches: list[Any], step: int,
                     sums: dict[str, float], weights: dict[str, float]) -> float:  # fmt: skip
    """Backward of this process's share of one update's micro-batches; adds their metrics to `sums`
    (weighted by num_items); returns the update's loss summed over processes."""
    # the whole update's, on every process; an update of no items (all masked) gives a zero gradient, not 0/0
    total_items = max(float(sum(mb["num_items"] for mb in micro_batches)), 1.0)
    update_loss = 0.0
    mine = distributed.share(micro_batches)
    for i, mb in enumerate(mine):
        with group.gradient_sync(last=i == len(mine) - 1):
            with mixed_precision(run.cfg.precision, run.recipe.model):  # backward runs outside autocast, as torch recommends
                numerator, mb_metrics = group.loss(mb)
            loss = run.hooks.on_loss(numerator / total_items, step)
            group.backward(loss)
        update_loss += loss.item()
        for key, value in mb_metrics.items():
            sums[key] = sums.get(key, 0.0) + value * mb["num_items"]
            weights[key] = weights.get(key, 0.0) + mb["num_items"]
    return distributed.all_reduce([update_loss])[0]  # each process summed its share's part


def _clip_gradients(trainable: list[torch.nn.Parameter], max_grad_norm: float) -> float:
    """The global gradient norm before clipping (clipped to `max_grad_norm` unless it is 0)."""
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm).item()
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])).item()


def _throughput(run: _Run) -> dict[str, float]:
    """The run's token count so far, and tokens per second of wall time since this process's first step."""
    elapsed = time.perf_counter() - run.started
    done = run.num_tokens - run.tokens_at_start
    return {"num_tokens": float(run.num_tokens), "perf/tokens_per_second": done / elapsed if elapsed > 0 else 0.0}


def _evaluate(run: _Run) -> dict[str, float]:
    evaluate = getattr(run.recipe, "evaluate", None)
    if evaluate is None:
        return {}
    with timing.phase("evaluate"), mixed_precision(run.cfg.precision, run.recipe.model):
        return dict(evaluate())


def _stop_on_bad_step(run: _Run, step: int, applied: bool, new_findings: list[Finding]) -> None:
    """Non-finite steps past what `on_nonfinite` allows, or an error finding, end the run (exit 3)."""
    cfg = run.cfg
    run.consecutive_bad = 0 if applied else run.consecutive_bad + 1
    if run.consecutive_bad and (cfg.on_nonfinite == "stop" or run.consecutive_bad > cfg.max_nonfinite_skips):
        raise TrainingStopped(
            f"non-finite loss or gradients at step {step} (train.nonfinite); the last good checkpoint is kept in "
            f"{run.out / 'checkpoints'}",
            3,
        )
    errors = [f for f in new_findings if f.severity == "error" and f.code != "train.nonfinite"]
    if errors:
        raise TrainingStopped(f"{errors[0].code}: {errors[0].message}", 3)


def _stop_on_signal(run: _Run, stop: _StopSignal, done: int) -> None:
    """A SIGTERM/SIGINT received by any process: every process checkpoints after this step and stops (exit 130)."""
    received = int(distributed.all_reduce([float(stop.received or 0)], op="max")[0])
    if received:
        _checkpoint(run, done)
        raise TrainingStopped(
            f"stopped by signal {received} after step {done}; resume with the same command plus "
            f"--resume auto (out: {run.out})",
            130,
        )


def _checkpoint(run: _Run, step: int) -> None:
    """Checkpoint `step` (steps done), written by rank 0: every process holds the same state."""
    error = None
    if run.main:
        state = {
            "step": step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "recipe": run.recipe.state_dict(),
            "monitors": [m.state_dict() for m in run.monitors],
            "rng": random_state.capture(),
            "num_tokens": run.num_tokens,
        }
        try:
            save_checkpoint(run.out, step, run.recipe.model, state, keep=run.cfg.keep_checkpoints)
        except CheckpointWriteError as exc:
            error = exc
    # every process learns whether the write worked, and none runs on while it is written
    if not distributed.all_true(error is None):
        message = error or "rank 0 could not write a checkpoint"
        raise TrainingStopped(f"{message}. The previous checkpoint is intact; free space and resume.", 1) from error


def _snapshot(run: _Run) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in run.recipe.model.state_dict().items()},
            "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "scheduler": copy.deepcopy(run.scheduler.state_dict())}  # fmt: skip


def _restore(run: _Run, snapshot: dict[str, Any]) -> None:
    run.recipe.model.load_state_dict(snapshot["model"])
    run.optimizer.load_state_dict(snapshot["optimizer"])
    run.scheduler.load_state_dict(snapshot["scheduler"])


def _describe(metrics: dict[str, float], recipe: Recipe) -> str:
    """The progress bar's text: the metrics the recipe names in `progress_metrics` (default: the loss)."""
    names = getattr(recipe, "progress_metrics", ("loss",))
    return " ".join(f"{name}={metrics[name]:.3f}" for name in names if name in metrics)


def _progress(cfg: RunConfig):
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


# ── used by the algorithms around a call of train() ──────────────────────────────────────────────────


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads if threads > 0 else distributed.default_threads(os.cpu_count() or 1))
    # Denormal floats (e.g. tiny updates to a zero-initialised value head) can make CPU matmuls many times slower.
    torch.set_flush_denormal(True)


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
    random_state.seed_everything(cfg.seed)
    return out


def save_final_model(model: torch.nn.Module, tokenizer: Any, out: Path) -> Path:
    """The run's model as a transformers save_pretrained folder (safetensors) under OUT/model; with LoRA the
    adapter folder (models/lora.py)."""
    target = save_model(model, Path(out) / "model")
    tokenizer.save_pretrained(target)
    return target

"""Data parallelism under torchrun: every process plans the whole step and trains on its share of it.

    torchrun --nproc-per-node N rlhflab sft ...      (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)

    plan_step, on every process alike (same seed, data order and weights)
        └─► N × grad_accum micro-batches ─► process r trains on block r (grad_accum micro-batches)
    each micro-batch's loss ÷ Σ num_items of the WHOLE step (every process planned it, so knows it)
    backward of world size × that loss; DDP averages the gradients over processes ─► their sum, the
    gradient one process gets from the whole batch ─► clip, step: the weights stay equal everywhere

PPO and GRPO plan the same way, but share out their sampling: each process samples its block of
the step's prompts and all of them receive the whole rollout (`algorithms.rollout.generate`).

Every process keeps the same recipe state (data position, reference cache, RNG), so rank 0's
checkpoint is the run's. Rank 0 alone writes metrics, diagnostics, checkpoints and the final
model; metrics are sums over processes before they are logged. The price of planning everywhere:
collation, packing and any DPO reference log-probs not yet cached are repeated on each process.

Only training inside `data_parallel()` is distributed: the CLI's stages wrap the command's own
training in it, so prerequisites a `--task` run builds first are built by one process (the others
wait on the artefact's file lock). Without torchrun every function here is a no-op.

Where the state lives. Algorithm code asks `world_size()`, `share(...)`, `all_gather(...)` deep
inside a recipe, so the world (its size and this process's rank) is not passed down: `data_parallel()`
puts an immutable `World` in a ContextVar for the duration of its block and restores the one outside
it on leaving, so nothing outlives the block and a test can enter a world of its own (a thread started
inside the block would see one process: nothing in rlhflab starts one). What belongs to
one training run, the process group and the DDP wrapper, is a `TrainingGroup` that `process_group()`
makes and the loop holds: no module variable keeps either alive after the run.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """The processes a call runs among: one, or torchrun's WORLD_SIZE inside `data_parallel()`."""

    size: int = 1
    rank: int = 0


ONE_PROCESS = World()
_world: ContextVar[World] = ContextVar("rlhflab_world", default=ONE_PROCESS)


class RunContinuesOnMain(SystemExit):
    """Raised by `train()` on processes other than rank 0 once training is done: what follows a run
    (the final model, the stage's end-of-run evaluation and eval.json) is rank 0's. Uncaught, it ends the process with
    exit code 0; a script that trains twice catches it."""

    def __init__(self) -> None:
        super().__init__(0)


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def data_parallel() -> Iterator[None]:
    """Training runs inside this block are data-parallel over all processes when launched by torchrun.

    Meant for recipes whose plan is a function of the seed, the data and the weights. PPO and GRPO
    sample inside plan_step: each process samples its block of the step's prompts, and all of them
    receive the whole rollout (`all_gather`), which is the one a single process would sample because
    every prompt's samples come from a seed of its own (`algorithms.rollout.generate`)."""
    world = World(int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])) if launched() else ONE_PROCESS
    token = _world.set(world)
    try:
        yield
    finally:
        _world.reset(token)


def world_size() -> int:
    return _world.get().size


def rank() -> int:
    return _world.get().rank


def is_main() -> bool:
    return rank() == 0


def default_threads(cores: int) -> int:
    """Torch threads per process when --threads is 0: the cores shared among the processes."""
    return max(1, cores // world_size())


def share(items: list[T]) -> list[T]:
    """This process's contiguous block of a step's micro-batches (all of them in one process)."""
    world = world_size()
    if world == 1:
        return items
    if len(items) % world:
        raise ValueError(f"{len(items)} micro-batches cannot be shared equally by {world} processes")
    size = len(items) // world
    return items[rank() * size : (rank() + 1) * size]


def share_indices(count: int) -> list[int]:
    """The indices 0 .. count-1 of this process's block: which of `count` items `share` gives it."""
    return share(list(range(count)))


def leave_unless_main() -> None:
    """After training: processes other than rank 0 stop here (see RunContinuesOnMain)."""
    if not is_main():
        raise RunContinuesOnMain


class TrainingGroup:
    """One training run's part in data parallelism: its loss (through DDP under torchrun), the backward
    of it and when gradients are exchanged. In one process: `recipe.loss`, a plain backward, no exchange.

    DDP synchronises gradients only for backward passes of outputs of its own forward. Recipes call
    parts of their model directly (DPO runs the backbone and the LM head separately, PPO trains a
    ModuleDict that has no forward), so DDP wraps the recipe's loss (`_RecipeLoss`), which owns every
    trainable parameter through `recipe.model`.
    """

    def __init__(self, recipe: Any, size: int) -> None:
        self.size = size
        self._recipe_loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]] = recipe.loss
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        if size > 1:
            module = _RecipeLoss(recipe)
            device = next(module.parameters()).device
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None
            )

    def loss(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if self.size == 1:
            return self._recipe_loss(micro_batch)
        assert self.ddp is not None, "the process group of this training was torn down"
        return self.ddp(micro_batch)

    def gradient_sync(self, last: bool) -> AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: gradients are exchanged on a process's last one only."""
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`. Each process's loss is its share of the step's mean (÷ the global item count),
        so gradients must add up over processes; DDP averages them, hence the factor of the world size."""
        if self.size == 1:
            loss.backward()
        else:
            (loss * self.size).backward()


class _RecipeLoss(torch.nn.Module):
    """`recipe.loss` as a module's forward, for DDP."""

    def __init__(self, recipe: Any):
        super().__init__()
        self.model = recipe.model
        self.recipe_loss = recipe.loss

    def forward(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.recipe_loss(micro_batch)


@contextmanager
def process_group(recipe: Any, agreed: tuple[type[BaseException], ...] = ()) -> Iterator[TrainingGroup]:
    """The process group of one training run of `recipe`, and the run's `TrainingGroup`.

    On leaving normally or with one of `agreed` (exceptions every process raises at the same step),
    all processes meet at a barrier and destroy the group, after dropping the DDP wrapper, which holds
    it: gloo processes that exit with a live wrapper abort now and then (docs/notes_reliability.md).
    Any other exception is one process failing alone: a barrier would wait forever for processes
    stuck in a collective, so it is skipped and torchrun ends the others.
    """
    if world_size() == 1:
        yield TrainingGroup(recipe, 1)
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # gloo for CPU tensors (the models here train on CPU; metric reductions always do), nccl for CUDA ones
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=_store_for_new_group(), rank=rank(), world_size=world_size())
    group = TrainingGroup(recipe, world_size())
    try:
        yield group
    except agreed:
        _teardown(group)
        raise
    _teardown(group)


def _store_for_new_group() -> dist.Store:
    """torchrun's key-value store, under keys that no earlier group of this job used.

    A second group under the first one's keys finds the first group's (closed) addresses there and
    cannot connect. Every process makes its groups in the same order, so the count of groups this
    rank has made (kept in the store itself) names the same fresh keys on every process.
    """
    store = next(dist.rendezvous("env://"))[0]
    made = store.add(f"rlhflab-groups-made-by-rank-{rank()}", 1)
    return dist.PrefixStore(f"rlhflab-training-{made}", store)


def _teardown(group: TrainingGroup) -> None:
    group.ddp = None
    gc.collect()  # DDP's hooks refer back to it: only the collector frees it, and with it the group
    dist.barrier()
    dist.destroy_process_group()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Element-wise sum (or max) of `values` over processes; in one process `values` itself."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `tensor` over processes, in place (CPU tensors over gloo); in one process unchanged."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(items: list[T]) -> list[T]:
    """Every process's `items`, concatenated in rank order (picklable objects); in one process `items`."""
    if world_size() == 1:
        return items
    gathered: list[list[T]] = [[] for _ in range(world_size())]
    dist.all_gather_object(gathered, items)
    return [item for block in gathered for item in block]


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every process; also a point that no process passes alone."""
    return all_reduce([0.0 if flag else 1.0], op="max")[0] == 0.0

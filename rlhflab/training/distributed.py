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
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_enabled = False  # inside data_parallel() under torchrun
_store: dist.Store | None = None  # torchrun's key-value store, connected to once per process
_runs = 0  # data-parallel trainings so far in this process
_ddp: torch.nn.parallel.DistributedDataParallel | None = None  # the training's DDP wrapper, while it runs


class RunContinuesOnMain(SystemExit):
    """Raised by `train()` on processes other than rank 0 once training is done: what follows a run
    (held-out evaluation, eval.json, the final model) is rank 0's. Uncaught, it ends the process with
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
    global _enabled
    previous, _enabled = _enabled, launched()
    try:
        yield
    finally:
        _enabled = previous


def world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if _enabled else 1


def rank() -> int:
    return int(os.environ["RANK"]) if _enabled else 0


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


@contextmanager
def process_group(agreed: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """The process group, for one training run.

    On leaving normally or with one of `agreed` (exceptions every process raises at the same step),
    all processes meet at a barrier and destroy the group (after dropping the DDP wrapper, which holds
    it): gloo processes that exit otherwise abort now and then ("terminate called without an active
    exception": 5 of 20 runs with a live DDP wrapper, 0 of 20 without). Any other exception is one
    process failing alone: a barrier would wait forever for processes stuck in a collective, so it
    is skipped and torchrun ends the others.
    """
    if world_size() == 1:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    global _store, _runs
    if _store is None:
        _store = next(dist.rendezvous("env://"))[0]
    # A process that trains twice needs fresh keys: a second group under the first one's keys finds the
    # first group's (closed) addresses there and cannot connect.
    _runs += 1
    store = dist.PrefixStore(f"rlhflab-training-{_runs}", _store)
    # gloo for CPU tensors (the models here train on CPU; metric reductions always do), nccl for CUDA ones
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size())
    try:
        yield
    except agreed:
        _teardown()
        raise
    _teardown()


def _teardown() -> None:
    global _ddp
    _ddp = None
    gc.collect()  # DDP's hooks refer back to it: only the collector frees it, and with it the group
    dist.barrier()
    dist.destroy_process_group()


def leave_unless_main() -> None:
    """After training: processes other than rank 0 stop here (see RunContinuesOnMain)."""
    if not is_main():
        raise RunContinuesOnMain


class _RecipeLoss(torch.nn.Module):
    """`recipe.loss` as a module's forward, for DDP.

    DDP synchronises gradients only for backward passes of outputs of its own forward. Recipes
    call parts of their model directly (DPO runs the backbone and the LM head separately, PPO
    trains a ModuleDict that has no forward), so DDP wraps the recipe's loss, which owns every
    trainable parameter through `recipe.model`.
    """

    def __init__(self, recipe: Any):
        super().__init__()
        self.model = recipe.model
        self.recipe_loss = recipe.loss

    def forward(self, micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.recipe_loss(micro_batch)


def wrap_loss(recipe: Any) -> Callable[[Any], tuple[torch.Tensor, dict[str, float]]]:
    """`recipe.loss`, or under torchrun the same through DDP (call inside `process_group()`).

    The DDP wrapper stays here, not with the caller, so that the group's teardown can free it first.
    """
    if world_size() == 1:
        return recipe.loss
    global _ddp
    module = _RecipeLoss(recipe)
    device = next(module.parameters()).device
    _ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return _loss_through_ddp


def _loss_through_ddp(micro_batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    assert _ddp is not None, "the process group of this training was torn down"
    return _ddp(micro_batch)


def gradient_sync(last: bool) -> AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: gradients are exchanged on a process's last one only."""
    return _ddp.no_sync() if _ddp is not None and not last else nullcontext()


def backward(loss: torch.Tensor) -> None:
    """`loss.backward()`. Each process's loss is its share of the step's mean (÷ the global item count), so
    gradients must add up over processes; DDP averages them, hence the factor of the world size."""
    if world_size() == 1:
        loss.backward()
    else:
        (loss * world_size()).backward()


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

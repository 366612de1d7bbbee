"""How a step's work is shared out between data-parallel processes, for recipes that plan it themselves
(PPO, GRPO). Built only on `training.distributed`'s public functions; in one process each is the plain
single-process computation.

    shared_work(n, f)          every process computes f on its block of range(n), all receive f(range(n))
    plan_micro_batches(x, g)   the step's micro-batches, each marked with whether this process trains on it
    assemble_rows(n, T, parts) rows filled by the processes that computed them, summed into the whole batch
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from rlhflab.errors import InputError
from rlhflab.training import distributed
from rlhflab.training.data_order import split_micro_batches

T = TypeVar("T")


def shared_work(count: int, compute: Callable[[list[int]], list[T]]) -> list[T]:
    """`compute(indices)` on this process's block of 0 .. count-1; the lists of all processes concatenated in
    rank order (blocks are contiguous, so index order): every process holds what compute(range(count)) gives
    when compute's list follows its indices' order."""
    return distributed.all_gather(compute(distributed.share_indices(count)))


def plan_micro_batches(items: list[Any], grad_accum: int) -> list[tuple[list[Any], bool]]:
    """The step's micro-batches of `items` (`split_micro_batches`), each with whether this process trains on it
    (all of them, alone). The others' are planned too: their sizes normalise the loss."""
    micro_batches = split_micro_batches(items, grad_accum)
    mine = set(distributed.share_indices(len(micro_batches)))
    return [(chunk, i in mine) for i, chunk in enumerate(micro_batches)]


def assemble_rows(num_rows: int, width: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A [num_rows, width] float tensor from (row indices [n], values [n, t ≤ width]) parts, zeros elsewhere.

    Each process passes the parts it computed; the sum over processes is the whole batch (every row is
    computed by exactly one process)."""
    full = torch.zeros(num_rows, width)
    for rows, values in parts:
        full[rows, : values.shape[1]] = values
    return distributed.all_reduce_tensor(full)


def check_divisible(batch_size: int, parts_per_process: int, what: str) -> None:
    """InputError unless `batch_size` splits into `parts_per_process` equal parts on every process.

    `what` says what the parts are, e.g. "each of the 2 minibatches must split into grad_accum (2) equal
    micro-batches per process"."""
    world = distributed.world_size()
    if world > 1 and batch_size % (parts_per_process * world):
        raise InputError(f"with {world} processes {what}: make batch_size a multiple of {parts_per_process * world}",
                         field="batch_size")

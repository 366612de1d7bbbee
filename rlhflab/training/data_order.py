"""The order in which a stage visits its examples: shuffled per epoch, resumable exactly.

The permutation of epoch e is a function of (seed, e), so the whole data position is two
integers (epoch, index) and a resumed run draws exactly the batches the unbroken run would have.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhflab.training import distributed


class EpochSampler:
    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("no examples to train on")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def take(self, count: int) -> list[int]:
        """The next `count` example indices, crossing into the next epoch (reshuffled) when needed."""
        indices = []
        while len(indices) < count:
            if self.index == self.num_examples:
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(indices), self.num_examples - self.index)
            indices.extend(self._order[self.index : self.index + take])
            self.index += take
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)


def chunks(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` in at most `parts` contiguous, nearly equal pieces (the last may be shorter)."""
    size = -(-len(items) // max(parts, 1))
    return [items[i : i + size] for i in range(0, len(items), size)]


def split_micro_batches(items: list[Any], grad_accum: int) -> list[list[Any]]:
    """Split one optimizer step's examples into `grad_accum` nearly equal micro-batches per process.

    In a data-parallel run every process plans the whole step, so this gives grad_accum × processes
    micro-batches and the loop trains each process on its block of them (training/distributed.py).
    """
    return chunks(items, max(grad_accum, 1) * distributed.world_size())

"""The shape every built-in task has: generated data, 16 fixed evaluation prompts and an exact gold reward.

A task generates its data in code, deterministically from a seed, with no downloads. Its gold reward is exact, so a
learned reward model can be compared with the truth (reward hacking and over-optimisation are measured, not guessed).

Text conventions (they matter for the tokenizer, whose Metaspace pre-tokenizer uses prepend_scheme="never", so
ids(prompt) + ids(completion) == ids(prompt + completion)): a completion starts with a space exactly when it starts
a new word (`"the acting was"` + `" great ."`; `"37+48="` + `"85"`). End of completion is the model's EOS token,
added by the collator, never part of the string.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from rlhflab.errors import InputError

N_EVAL_PROMPTS = 16


@runtime_checkable
class Task(Protocol):
    """A built-in task. Every method is deterministic in its arguments; none touches the network or the disk."""

    name: str
    """Registry name, e.g. "reviews"."""
    max_new_tokens: int
    """Completion-length budget in tokens (≈ words and punctuation for reviews, characters for arithmetic)."""

    def pretrain_corpus(self, n: int, seed: int) -> list[str]:
        """`n` full documents (prompt + continuation) for language-model pretraining."""
        ...

    def sft_examples(self, n: int, seed: int) -> list[dict]:
        """`n` supervised examples `{"prompt": str, "completion": str}`."""
        ...

    def train_prompts(self, n: int, seed: int) -> list[str]:
        """`n` prompts for RL or for sampling preference pairs (never one of `eval_prompts()`)."""
        ...

    def eval_prompts(self) -> list[str]:
        """Exactly 16 fixed prompts, never produced by any of the generators above."""
        ...

    def gold_reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        """The exact reward of each completion given its prompt. Never raises on arbitrary strings."""
        ...

    def is_wellformed(self, prompt: str, completion: str) -> bool:
        """Whether the task's format accepts the completion (never raises)."""
        ...

    def constructed_pairs(self, n: int, seed: int) -> list[dict]:
        """`n` preference pairs `{"prompt", "chosen", "rejected"}` with gold(chosen) > gold(rejected), built without a model."""
        ...


def check_same_length(prompts: list[str], completions: list[str]) -> None:
    """Reward functions score prompts and completions pairwise; a length mismatch is a caller's bug."""
    if len(prompts) != len(completions):
        raise InputError(
            f"got {len(prompts)} prompts but {len(completions)} completions; they are scored pairwise"
        )

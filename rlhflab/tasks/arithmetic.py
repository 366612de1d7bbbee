"""`arithmetic`: prompts like "37+48=", completion the decimal answer ("85"); reward 1.0 for the exact answer, else 0.0.

The verifiable-reward setting where GRPO lives. Operands are whole numbers below 100 (both 2-digit at most), sized so
a ~1M-parameter Llama trained from scratch for about a minute on a 2-core CPU is partly right, which leaves room
for RL (measurements in docs/notes_tasks.md, script in benchmarks/arithmetic_sizing.py).

The 16 evaluation prompts are specific (a, b) pairs that no generator ever produces.
"""

from __future__ import annotations

import random
import re

from rlhflab.tasks.base import check_same_length

MAX_OPERAND = 99
EVAL_PAIRS: tuple[tuple[int, int], ...] = (
    # Hand-picked to cover no carry, a carry into the tens, a carry into the hundreds, 1-digit operands and zero.
    (37, 48),
    (12, 45),
    (99, 1),
    (50, 50),
    (7, 86),
    (64, 9),
    (0, 73),
    (25, 38),
    (81, 19),
    (43, 56),
    (68, 77),
    (5, 4),
    (90, 24),
    (16, 89),
    (33, 0),
    (72, 65),
)
_EVAL_SET = frozenset(EVAL_PAIRS)
_PROMPT = re.compile(r"\s*([0-9]{1,18})\s*\+\s*([0-9]{1,18})\s*=\s*")  # bounded: int() refuses huge strings


def _prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def _sample_pair(rng: random.Random) -> tuple[int, int]:
    """A uniformly random (a, b), never an evaluation pair."""
    while True:
        pair = (rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND))
        if pair not in _EVAL_SET:
            return pair


def answer(prompt: str) -> str | None:
    """The exact answer to an "a+b=" prompt (spaces tolerated), or None when the prompt is not one."""
    if not isinstance(prompt, str):
        return None
    match = _PROMPT.fullmatch(prompt)
    return str(int(match.group(1)) + int(match.group(2))) if match else None


def arithmetic_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Gold reward: 1.0 when the completion, all whitespace removed, is exactly the answer; else 0.0 ("085" is wrong)."""
    check_same_length(prompts, completions)
    rewards = []
    for prompt, completion in zip(prompts, completions, strict=True):
        expected = answer(prompt)
        correct = (
            expected is not None and isinstance(completion, str) and "".join(completion.split()) == expected
        )
        rewards.append(1.0 if correct else 0.0)
    return rewards


class ArithmeticTask:
    """Addition of two numbers in [0, 99]; gold reward = exact match of the decimal answer."""

    name = "arithmetic"
    max_new_tokens = 6  # the longest answer is 3 characters; the rest is slack for EOS and stray spaces

    def pretrain_corpus(self, n: int, seed: int) -> list[str]:
        """Documents like "37+48=85"."""
        rng = random.Random(f"arithmetic/pretrain/{seed}")
        return [_prompt(a, b) + str(a + b) for a, b in (_sample_pair(rng) for _ in range(n))]

    def sft_examples(self, n: int, seed: int) -> list[dict]:
        """{"prompt": "37+48=", "completion": "85"}."""
        rng = random.Random(f"arithmetic/sft/{seed}")
        return [
            {"prompt": _prompt(a, b), "completion": str(a + b)}
            for a, b in (_sample_pair(rng) for _ in range(n))
        ]

    def train_prompts(self, n: int, seed: int) -> list[str]:
        rng = random.Random(f"arithmetic/prompts/{seed}")
        return [_prompt(a, b) for a, b in (_sample_pair(rng) for _ in range(n))]

    def eval_prompts(self) -> list[str]:
        """The 16 held-out pairs in EVAL_PAIRS."""
        return [_prompt(a, b) for a, b in EVAL_PAIRS]

    def gold_reward(self, prompts: list[str], completions: list[str]) -> list[float]:
        return arithmetic_reward(prompts, completions)

    def is_wellformed(self, prompt: str, completion: str) -> bool:
        """ASCII digits only, at least one; whitespace anywhere is ignored, as in the reward."""
        digits = "".join(completion.split()) if isinstance(completion, str) else ""
        return digits.isascii() and digits.isdigit()

    def constructed_pairs(self, n: int, seed: int) -> list[dict]:
        """Chosen: the correct answer. Rejected: a near miss (off by one or ten, digits swapped, carry dropped)."""
        rng = random.Random(f"arithmetic/pairs/{seed}")
        pairs = []
        for a, b in (_sample_pair(rng) for _ in range(n)):
            pairs.append(
                {"prompt": _prompt(a, b), "chosen": str(a + b), "rejected": _wrong_answer(rng, a, b)}
            )
        return pairs


def _wrong_answer(rng: random.Random, a: int, b: int) -> str:
    """A plausible wrong answer: what a model that has half-learned addition gets wrong."""
    right = a + b
    no_carry = int(str(a % 10 + b % 10)[-1]) + 10 * ((a // 10 + b // 10) % 10) + 100 * (right >= 100)
    swapped = int(str(right)[::-1])
    candidates = [
        right + 1,
        right - 1,
        right + 10,
        right - 10,
        no_carry,
        swapped,
        rng.randint(0, 2 * MAX_OPERAND),
    ]
    wrong = [c for c in candidates if c != right and c >= 0]
    return str(rng.choice(wrong))

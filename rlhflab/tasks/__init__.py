"""Built-in tasks: data generated in code from a seed, 16 fixed evaluation prompts, an exact gold reward.

    task = get_task("reviews")
    task.sft_examples(1000, seed=0)                 # [{"prompt": "the acting was", "completion": " great ."}, ...]
    task.gold_reward(prompts, completions)          # list[float]

`reviews_reward` and `arithmetic_reward` are plain reward functions `f(prompts, completions) -> list[float]`, usable
as `--reward-fn rlhflab.tasks:reviews_reward`.
"""

from __future__ import annotations

from rlhflab.errors import InputError
from rlhflab.tasks.arithmetic import ArithmeticTask, arithmetic_reward
from rlhflab.tasks.base import Task
from rlhflab.tasks.reviews import ReviewsTask, reviews_reward

TASKS: dict[str, Task] = {"reviews": ReviewsTask(), "arithmetic": ArithmeticTask()}
"""Task name -> task instance (tasks hold no state, so one instance each is shared)."""


def get_task(name: str) -> Task:
    """The built-in task called `name`; an unknown name is an InputError that lists the valid ones."""
    if name not in TASKS:
        raise InputError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}", field="task")
    return TASKS[name]


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "ReviewsTask",
    "Task",
    "arithmetic_reward",
    "get_task",
    "reviews_reward",
]

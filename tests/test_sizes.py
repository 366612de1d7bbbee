"""Token budgets left unset follow what the run trains (config.SIZES): the tiny tasks' sizes with --task or when no
model is named, a pretrained chat model's with --model and no --task; a value given is kept."""

from __future__ import annotations

import pytest

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.algorithms.reward_model import RewardModelConfig
from rlhflab.algorithms.sft import SFTConfig
from rlhflab.config import load_config
from rlhflab.stages.evaluate import completion_budget
from rlhflab.tasks import get_task


@pytest.mark.parametrize("cls", [SFTConfig, RewardModelConfig, DPOConfig, GRPOConfig])
def test_unset_budgets_follow_the_model(cls):
    own = load_config(cls, overrides={"model": "some/chat-model"})
    task = load_config(cls, overrides={"model": "some/chat-model", "task": "reviews"})
    unnamed = cls()  # API callers that pass model objects, as the tests do
    assert own.max_prompt_tokens == 512 and task.max_prompt_tokens == unnamed.max_prompt_tokens == 64
    if hasattr(cls, "max_row_tokens"):
        assert (own.max_completion_tokens, own.max_row_tokens) == (512, 1536)
        assert (task.max_completion_tokens, task.max_row_tokens) == (64, 256)
    given = load_config(cls, overrides={"model": "some/chat-model", "max_prompt_tokens": "64"})
    assert given.max_prompt_tokens == 64  # a value given equal to the task default is still the user's


def test_generation_budget_without_a_task_suits_a_chat_model():
    assert completion_budget(None) == 256
    assert completion_budget(get_task("arithmetic")) == get_task("arithmetic").max_new_tokens

"""What each command runs, and the one table of the training and evaluation commands.

`COMMANDS` maps a command name to its config class (whose fields are the command's options), the
function it runs and a one-line summary. The CLI (`rlhflab NAME`) and the study runner (an arm's
`algorithm: NAME`) both read it, so a study arm trains exactly as the command would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.algorithms.ppo import PPOConfig
from rlhflab.algorithms.pretrain import PretrainConfig
from rlhflab.algorithms.reward_model import RewardModelConfig
from rlhflab.algorithms.sft import SFTConfig
from rlhflab.stages.evaluate import EvalCommandConfig, evaluate_model
from rlhflab.stages.train import dpo, grpo, ppo, pretrain, sft, train_reward_model


@dataclass(frozen=True)
class Command:
    config: type  # the config dataclass: its fields are the command's options
    run: Callable[[Any], Any]  # `run(config)`; training commands return the final model folder
    summary: str
    data: Literal["documents", "examples", "preferences", "prompts"] | None = None  # what --data holds
    examples_per_step: tuple[str, ...] = ("batch_size",)  # config fields whose product is examples per step


COMMANDS: dict[str, Command] = {
    "pretrain": Command(PretrainConfig, pretrain, "train a tiny model from scratch on a task corpus", "documents"),
    "sft": Command(SFTConfig, sft, "supervised fine-tuning (completion-only loss)", "examples"),
    "rm": Command(RewardModelConfig, train_reward_model, "Bradley-Terry reward model on preference pairs",
                  "preferences"),
    "dpo": Command(DPOConfig, dpo, "DPO on preference pairs (packed pairs, cached reference)", "preferences"),
    "ppo": Command(PPOConfig, ppo, "PPO with a value model and a KL-penalised reward", "prompts",
                   ("batch_size", "group_size")),
    "grpo": Command(GRPOConfig, grpo, "GRPO: group-relative advantages, k samples per prompt", "prompts",
                    ("batch_size", "group_size")),
    "eval": Command(EvalCommandConfig, evaluate_model, "the shared evaluation suite on a model"),
}
# Commands whose training runs data-parallel under torchrun (every command but eval, which trains nothing); any
# other would run N copies into one folder.
DATA_PARALLEL_COMMANDS = tuple(name for name in COMMANDS if name != "eval")

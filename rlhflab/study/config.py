"""A study's YAML: a task (or your model and data), arms, seeds, budgets and evaluation settings.

    task: reviews                 # shared artefacts (base, SFT, reward model) are built once
    seeds: [0, 1, 2]
    max_steps: 60                 # default step budget of every arm
    temperatures: [0.7, 0.3]
    arms:
      - {algorithm: sft}                                      # the baseline: the SFT model, untrained
      - {algorithm: dpo, params: {beta: 0.1}, grid: {lr: [1e-5, 1e-4]}}   # two arms: dpo-lr1e-05, dpo-lr0.0001
      - {name: grpo-k8, algorithm: grpo, group: tuned, params: {group_size: 8}, max_samples: 2048}

Your own model instead of a task: `task: null`, `model` (the SFT model every arm starts from), `prompt_data` /
`preference_data`, `eval_prompts`, and `reward_fn` (FILE.py:NAME): the PPO/GRPO reward and the gold reward of
the evaluation, applied to every arm's samples (arms are ranked by it).

Unknown keys are errors (in the study and in each arm's `params`, checked against the algorithm's
config class), like every other config of rlhflab.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from rlhflab.config import TaskConfig, TaskName, build_config, load_config, opt
from rlhflab.errors import InputError
from rlhflab.stages import COMMANDS, Command

BUILTIN_DIR = Path(__file__).parent / "builtin"
RESERVED_PARAMS = ("out", "seed", "max_steps", "task", "task_size", "cache_dir", "model", "data", "resume")
BASELINE = "sft"  # the algorithm of the baseline arm: the SFT model every arm starts from, evaluated untrained
# What an arm can train: the commands that start from the SFT model. Tests pass tables with stub commands.
ARM_COMMANDS: dict[str, Command] = {name: COMMANDS[name] for name in ("dpo", "ppo", "grpo")}


@dataclass
class ArmConfig:
    algorithm: str = opt(BASELINE, "sft (the baseline: evaluate the SFT model) | dpo | ppo | grpo")
    name: str = opt("", "folder under runs/ (default: the algorithm, then the group); grid values are appended")
    group: str = opt("", "e.g. a phase: rankings are made within a group; arms without a group join every group")
    params: dict[str, Any] = opt({}, "fields of the algorithm's config (beta, lr, batch_size…)")
    grid: dict[str, list[Any]] = opt({}, "every combination of these values becomes one arm")
    max_steps: int | None = opt(None, "step budget (default: the study's max_steps)", minimum=0)
    max_samples: int | None = opt(None, "or a budget in training examples (DPO pairs, RL completions) → steps",
                                  minimum=1)


@dataclass
class StudyConfig(TaskConfig):
    task: TaskName | None = opt("reviews", "built-in task: its SFT model, reward model, pairs, prompts and gold reward")
    name: str = opt("study", "title of the report")
    out: str = opt("runs/study", "study folder: runs/ARM/seed-S/, study.json, plots/, report.html, report.md")
    model: str | None = opt(None, "your SFT model (the start and the reference of every arm) instead of the task's")
    reward_model: str | None = opt(None, "your reward model (PPO/GRPO reward and the evaluation's RM score)")
    reward_fn: str | None = opt(
        None, "FILE.py:NAME reward function for PPO/GRPO instead of a reward model; without a task also the gold "
              "reward of the evaluation (your model, data and verifier)")
    reward_weights: list[float] | None = opt(None, "one per reward function (the reward is their weighted sum)")
    preference_data: str | None = opt(None, "TRL preference data for DPO arms")
    prompt_data: str | None = opt(None, "prompt-only data for PPO/GRPO arms")
    eval_prompts: str | None = opt(None, "prompt-only evaluation file (default: the task's 16 prompts)")
    arms: list[dict[str, Any]] = opt([], "the arms: algorithm, name, group, params, grid, max_steps, max_samples")
    seeds: list[int] = opt([0], "training seeds; each arm runs once per seed", minimum=0)
    max_steps: int = opt(50, "default step budget per arm", minimum=0)
    temperatures: list[float] = opt([0.7], "evaluation temperatures; the first leads", minimum=0.0)
    samples_per_prompt: int = opt(8, "evaluation samples per prompt and temperature", minimum=1)
    max_new_tokens: int | None = opt(None, "evaluation completion budget (default: the task's)", minimum=1)
    eval_seed: int = opt(1234, "sampling seed of the evaluation; seed S of every arm samples with eval_seed + S",
                         minimum=0)
    baseline: str = opt(BASELINE, "arm that paired differences are taken against (added as an sft arm if missing); "
                                  "empty: none")
    metric: Literal["gold", "rm_score"] = opt("gold", "ranking metric: gold (the task's exact reward) | rm_score "
                                                      "(the proxy)")
    resume: Literal["auto"] | None = opt(None, "auto: continue partial runs from their newest checkpoint; "
                                               "default: restart them", flag_value="auto")
    checkpoint_every: int = opt(0, "training checkpoints every N steps (what --resume continues from)", minimum=0)
    bootstrap_resamples: int = opt(1000, "bootstrap resamples of every interval", minimum=1)
    report: bool = opt(True, "write report.html and report.md at the end")
    threads: int = opt(0, "torch threads; 0: all cores", minimum=0)
    progress: bool = opt(True, "rich progress bar")


def arm_command(arm: ArmConfig, commands: dict[str, Command]) -> Command | None:
    """The command an arm trains with; None for the baseline (nothing is trained)."""
    if arm.algorithm == BASELINE:
        return None
    if arm.algorithm not in commands:
        known = ", ".join(sorted([BASELINE, *commands]))
        raise InputError(f"unknown algorithm '{arm.algorithm}' (known: {known})", field="algorithm")
    return commands[arm.algorithm]


def _suffix(key: str, value: Any) -> str:
    return f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"


def expand_arms(cfg: StudyConfig, source: str = "<study>", commands: dict[str, Command] = ARM_COMMANDS) -> list[ArmConfig]:
    """Parse `cfg.arms` into ArmConfigs, expand grids, add the baseline, check names and params."""
    arms: list[ArmConfig] = []
    for i, raw in enumerate(cfg.arms):
        if not isinstance(raw, dict):
            raise InputError("each arm is a mapping (algorithm, params, grid, …)", file=source, field=f"arms[{i}]")
        arm = build_config(ArmConfig, raw, source=f"{source}: arms[{i}]")
        base = arm.name or "-".join(p for p in (arm.algorithm, arm.group) if p)
        keys = list(arm.grid)
        for combo in itertools.product(*(list(arm.grid[k]) for k in keys)):
            name = "-".join([base, *(_suffix(k, v) for k, v in zip(keys, combo, strict=True))])
            params = {**arm.params, **dict(zip(keys, combo, strict=True))}
            arms.append(replace(arm, name=name, params=params, grid={}))
    if cfg.baseline and cfg.baseline not in [a.name for a in arms]:
        arms.insert(0, ArmConfig(algorithm=BASELINE, name=cfg.baseline))
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"arm names must be unique; repeated: {', '.join(duplicates)} (give each a name)", file=source)
    for arm in arms:
        check_arm(arm, source, commands)
    return arms


def check_arm(arm: ArmConfig, source: str, commands: dict[str, Command] = ARM_COMMANDS) -> None:
    """Unknown algorithms, reserved or unknown params are errors before anything trains."""
    command = arm_command(arm, commands)
    where = f"{source}: arm {arm.name}"
    reserved = [k for k in arm.params if k.replace("-", "_") in RESERVED_PARAMS]
    if reserved:
        raise InputError(f"{', '.join(reserved)} is set by the study, not in params", file=where, field="params")
    if command is None:
        if arm.params:
            raise InputError("the sft baseline trains nothing and takes no params", file=where, field="params")
        return
    build_config(command.config, arm.params, source=where)


def arm_steps(arm: ArmConfig, cfg: StudyConfig, commands: dict[str, Command] = ARM_COMMANDS) -> int:
    """The arm's step budget: max_samples / (examples per step), else max_steps, else the study's."""
    if arm.max_samples is None:
        return arm.max_steps or cfg.max_steps
    command = arm_command(arm, commands)
    if command is None:
        return 0
    defaults = build_config(command.config, arm.params)
    per_step = math.prod(int(getattr(defaults, k)) for k in command.examples_per_step)
    return max(1, math.ceil(arm.max_samples / per_step))


def builtin_path(name: str) -> Path:
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
        raise InputError(f"no built-in study '{name}' (built-in: {known})", field="builtin")
    return path


def load_study(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    return load_config(StudyConfig, config_file, overrides)

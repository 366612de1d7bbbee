"""A study's YAML: a task (or your model and data), arms, seeds, budgets and evaluation settings.

    task: reviews                 # shared artefacts (base, SFT, reward model) are built once
    seeds: [0, 1, 2]
    max_steps: 60                 # default step budget of every arm
    temperatures: [0.7, 0.3]
    arms:
      - {algorithm: sft}                                      # the baseline: the SFT model, untrained
      - {algorithm: dpo, params: {beta: 0.1}, grid: {lr: [1e-5, 1e-4]}}   # two arms: dpo-lr1e-05, dpo-lr0.0001
      - {name: grpo-k8, algorithm: grpo, group: tuned, params: {group_size: 8}, max_samples: 2048}

Unknown keys are errors (in the study and in each arm's `params`, checked against the algorithm's
config class), like every other config of rlhflab.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlhflab.config import build_config, load_config
from rlhflab.errors import InputError
from rlhflab.study.registry import config_class, get_algorithm

BUILTIN_DIR = Path(__file__).parent / "builtin"
RESERVED_PARAMS = ("out", "seed", "max_steps", "task", "task_size", "cache_dir", "model", "data", "resume")


@dataclass
class ArmConfig:
    algorithm: str = "sft"  # sft (the baseline: evaluate the SFT model) | dpo | ppo | grpo
    name: str = ""  # folder under runs/ (default: the algorithm, then the group); grid values are appended
    group: str = ""  # e.g. a phase: rankings are made within a group; arms without a group join every group
    params: dict[str, Any] = field(default_factory=dict)  # fields of the algorithm's config (beta, lr, batch_size…)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # every combination of these values becomes one arm
    max_steps: int | None = None  # step budget (default: the study's max_steps)
    max_samples: int | None = None  # or a budget in training examples (DPO pairs, RL completions) → steps


@dataclass
class StudyConfig:
    name: str = "study"  # title of the report
    out: str = "runs/study"  # study folder: runs/ARM/seed-S/, study.json, plots/, report.html, report.md
    task: str | None = "reviews"  # built-in task: its SFT model, reward model, pairs, prompts and gold reward
    task_size: str = "small"  # small | tiny: which cached task artefacts the arms share
    cache_dir: str | None = None  # task artefact cache (default $RLHFLAB_CACHE or ~/.cache/rlhflab)
    model: str | None = None  # your SFT model (the start and the reference of every arm) instead of the task's
    reward_model: str | None = None  # your reward model (PPO/GRPO reward and the evaluation's RM score)
    reward_fn: str | None = None  # FILE.py:NAME reward function for PPO/GRPO instead of a reward model
    preference_data: str | None = None  # TRL preference data for DPO arms
    prompt_data: str | None = None  # prompt-only data for PPO/GRPO arms
    eval_prompts: str | None = None  # prompt-only evaluation file (default: the task's 16 prompts)
    arms: list[dict[str, Any]] = field(default_factory=list)  # see ArmConfig
    seeds: list[int] = field(default_factory=lambda: [0])  # training seeds; each arm runs once per seed
    max_steps: int = 50  # default step budget per arm
    temperatures: list[float] = field(default_factory=lambda: [0.7])  # evaluation temperatures; the first leads
    samples_per_prompt: int = 8  # evaluation samples per prompt and temperature
    max_new_tokens: int | None = None  # evaluation completion budget (default: the task's)
    eval_seed: int = 1234  # sampling seed of the evaluation; seed S of every arm samples with eval_seed + S
    baseline: str = "sft"  # arm that paired differences are taken against (added as an sft arm if missing); "": none
    metric: str = "gold"  # ranking metric: gold (the task's exact reward) | rm_score (the proxy)
    resume: str | None = None  # "auto": continue partial runs from their newest checkpoint; default: restart them
    checkpoint_every: int = 0  # training checkpoints every N steps (what --resume auto continues from)
    bootstrap_resamples: int = 1000
    report: bool = True  # write report.html and report.md at the end
    threads: int = 0  # torch threads; 0: all cores
    progress: bool = True


def _suffix(key: str, value: Any) -> str:
    return f"{key}{value:g}" if isinstance(value, float) else f"{key}{value}"


def expand_arms(cfg: StudyConfig, source: str = "<study>") -> list[ArmConfig]:
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
        arms.insert(0, ArmConfig(algorithm="sft", name=cfg.baseline))
    names = [a.name for a in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"arm names must be unique; repeated: {', '.join(duplicates)} (give each a name)", file=source)
    for arm in arms:
        check_arm(arm, source)
    return arms


def check_arm(arm: ArmConfig, source: str) -> None:
    """Unknown algorithms, reserved or unknown params are errors before anything trains."""
    algorithm = get_algorithm(arm.algorithm)
    where = f"{source}: arm {arm.name}"
    reserved = [k for k in arm.params if k.replace("-", "_") in RESERVED_PARAMS]
    if reserved:
        raise InputError(f"{', '.join(reserved)} is set by the study, not in params", file=where, field="params")
    if algorithm.config is None:
        if arm.params:
            raise InputError("the sft baseline trains nothing and takes no params", file=where, field="params")
        return
    build_config(config_class(algorithm), arm.params, source=where)


def arm_steps(arm: ArmConfig, cfg: StudyConfig) -> int:
    """The arm's step budget: max_samples / (examples per step), else max_steps, else the study's."""
    if arm.max_samples is None:
        return arm.max_steps or cfg.max_steps
    algorithm = get_algorithm(arm.algorithm)
    defaults = build_config(config_class(algorithm), arm.params)
    per_step = math.prod(int(getattr(defaults, k)) for k in algorithm.examples_per_step)
    return max(1, math.ceil(arm.max_samples / per_step))


def builtin_path(name: str) -> Path:
    path = BUILTIN_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")))
        raise InputError(f"no built-in study '{name}' (built-in: {known})", field="builtin")
    return path


def load_study(config_file: str | None = None, overrides: dict[str, Any] | None = None) -> StudyConfig:
    return load_config(StudyConfig, config_file, overrides)


def study_cli_args(args: list[str]) -> list[str]:
    """`rlhflab study FILE.yaml …` and `--builtin NAME` both become `--config PATH …` for the CLI parser."""
    args = list(args)
    if args and not args[0].startswith("-"):
        args = ["--config", args[0], *args[1:]]
    for i, arg in enumerate(args):
        if arg.startswith("--builtin"):
            _, eq, value = arg.partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise InputError("--builtin needs a name: demo | phases | frontier", field="builtin")
                value = args.pop(i + 1)
            args[i : i + 1] = ["--config", str(builtin_path(value))]
            break
    return args

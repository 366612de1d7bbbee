"""Which algorithms a study can run: name → (config class, stage function), imported only when used.

The stage function is the one a CLI command calls (`rlhflab.stages.dpo` for `rlhflab dpo`), so a
study arm trains exactly as the command would. `sft` is the baseline: no training, the SFT model is
evaluated as it is. Tests register stub algorithms with `register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhflab.errors import InputError


@dataclass(frozen=True)
class Algorithm:
    config: str | type | None  # the config dataclass or its dotted path; None: nothing is trained (the baseline)
    stage: str | Callable[[Any], Any] | None  # `stage(cfg) -> model folder`, or its dotted path
    data: str | None = None  # which study input feeds the stage's `data`: "preferences" | "prompts" | None
    examples_per_step: tuple[str, ...] = ("batch_size",)  # config fields whose product is examples per step
    defaults: tuple[tuple[str, Any], ...] = ()  # config values a study sets unless the arm's params do


ALGORITHMS: dict[str, Algorithm] = {
    "sft": Algorithm(config=None, stage=None),
    # the study evaluates every arm itself, so DPO's own end-of-run suite is skipped
    "dpo": Algorithm("rlhflab.algorithms.dpo.DPOConfig", "rlhflab.stages.dpo", data="preferences",
                     defaults=(("eval_temperatures", []),)),
    "ppo": Algorithm("rlhflab.algorithms.ppo.PPOConfig", "rlhflab.stages.ppo", data="prompts",
                     examples_per_step=("batch_size", "group_size")),
    "grpo": Algorithm("rlhflab.algorithms.grpo.GRPOConfig", "rlhflab.stages.grpo", data="prompts",
                      examples_per_step=("batch_size", "group_size")),
}  # fmt: skip


def register(name: str, algorithm: Algorithm) -> None:
    ALGORITHMS[name] = algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise InputError(f"unknown algorithm '{name}' (known: {', '.join(sorted(ALGORITHMS))})", field="algorithm")
    return ALGORITHMS[name]


def load_object(path: str) -> Any:
    """`package.module.attr` → the attribute; a missing module is an InputError naming it."""
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import {module_name}: {exc}", field="algorithm") from None
    if not hasattr(module, attr):
        raise InputError(f"{module_name} has no {attr} (not implemented yet?)", field="algorithm")
    return module.__getattribute__(attr)


def config_class(algorithm: Algorithm) -> type:
    assert algorithm.config is not None
    return load_object(algorithm.config) if isinstance(algorithm.config, str) else algorithm.config


def stage_function(algorithm: Algorithm) -> Callable[[Any], Any]:
    assert algorithm.stage is not None
    return load_object(algorithm.stage) if isinstance(algorithm.stage, str) else algorithm.stage

"""`rlhflab demo`: the built-in demo study (SFT baseline, DPO, PPO and GRPO from the same SFT model and
reward model, evaluated on the task's 16 prompts). Any built-in study or study file runs the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import TaskConfig, TaskName, opt
from rlhflab.study.config import builtin_path, load_study
from rlhflab.study.runner import run_study


@dataclass
class DemoConfig(TaskConfig):
    task: TaskName = opt("reviews", "built-in task of the study")
    out: str = opt("runs/demo", "study folder of the demo: runs/, study.json, report.html, report.md")
    threads: int = opt(0, "torch threads; 0: all cores", minimum=0)
    progress: bool = opt(True, "rich progress bar")
    study: str = opt("demo", "a built-in study (demo | phases | frontier) or a study YAML file")
    seeds: list[int] = opt([0], "training seeds of every arm", minimum=0)


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo study with this command's settings; returns study.json's path."""
    source = cfg.study if cfg.study.endswith((".yaml", ".yml")) else str(builtin_path(cfg.study))
    overrides = {"out": cfg.out, "task": cfg.task, "task_size": cfg.task_size, "cache_dir": cfg.cache_dir,
                 "threads": cfg.threads, "progress": cfg.progress, "seeds": cfg.seeds}  # fmt: skip
    return run_study(load_study(source, overrides))

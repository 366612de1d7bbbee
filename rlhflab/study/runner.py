"""`rlhflab study`: every arm × seed trained from the same shared artefacts, evaluated by the one suite.

    OUT/study.yaml                 the resolved study config
    OUT/runs/ARM/seed-S/           a run folder (config.yaml, metrics.jsonl, diagnostics.jsonl, model/)
                       eval.json   the evaluation suite on the final model, sampled with eval_seed + S
    OUT/study.json                 every number: intervals, paired differences, rankings, phase comparisons,
                               and what the gold reward is ("gold": the task's, or without a task the
                               study's reward function, applied to every arm's samples)
    OUT/report.html, report.md     the report, written by the CLI after the study (rlhflab report OUT rebuilds it)

A run with model/ (for arms that train) whose config.yaml matches the arm's settings, and an eval.json
made with the study's evaluation settings, is finished and skipped on a rerun; a changed param retrains. A partial run restarts, or continues from its newest checkpoint
with `--resume auto`. Arm × seed S of every arm samples its evaluation with the same seed, so the
differences to the baseline are paired prompt by prompt and sample by sample.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhflab.config import build_config, field_names, save_config, to_dict
from rlhflab.stages import Command, artefacts
from rlhflab.stages.evaluate import EvalCommandConfig, evaluate_model, gold_source
from rlhflab.stages.train import final_metrics
from rlhflab.study.config import (
    ARM_COMMANDS,
    BASELINE,
    ArmConfig,
    StudyConfig,
    arm_command,
    arm_steps,
    expand_arms,
)
from rlhflab.study.results import summarize_arms

console = Console(stderr=True)


def run_dir(cfg: StudyConfig, arm: ArmConfig, seed: int) -> Path:
    return Path(cfg.out) / "runs" / arm.name / f"seed-{seed}"


def gold_reward_fn(cfg: StudyConfig) -> str | None:
    """The study's reward function(s) when they are the gold reward: without a task, whose gold comes first."""
    return None if cfg.task else cfg.reward_fn


def eval_settings(cfg: StudyConfig, seed: int) -> dict[str, Any]:
    """What makes an evaluation this study's: a change of any of these re-evaluates (but does not retrain)."""
    settings = {"temperatures": cfg.temperatures, "samples_per_prompt": cfg.samples_per_prompt,
                "max_new_tokens": cfg.max_new_tokens, "seed": cfg.eval_seed + seed, "eval_prompts": cfg.eval_prompts}  # fmt: skip
    if gold_reward_fn(cfg):  # (only then: a task's study keeps the settings its evaluations were made with)
        settings["gold"] = {"reward_fn": cfg.reward_fn, "reward_weights": cfg.reward_weights}
    return settings


def is_evaluated(folder: Path, settings: dict[str, Any]) -> bool:
    path = folder / "eval.json"
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("study_eval", {}).get("settings") == settings


def training_config(cfg: StudyConfig, arm: ArmConfig, seed: int, resume: bool, command: Command) -> Any:
    """The arm's config: its params over the study's defaults, then what the study fixes."""
    data = {"preferences": cfg.preference_data, "prompts": cfg.prompt_data}.get(command.data or "")
    study_values = {
        "out": str(run_dir(cfg, arm, seed)), "seed": seed, "max_steps": arm_steps(arm, cfg, {arm.algorithm: command}),
        "task": cfg.task, "task_size": cfg.task_size, "cache_dir": cfg.cache_dir, "model": cfg.model, "data": data,
        "reward_model": cfg.reward_model, "reward_fn": cfg.reward_fn, "reward_weights": cfg.reward_weights,
        "threads": cfg.threads,
        "progress": cfg.progress, "checkpoint_every": cfg.checkpoint_every, "resume": "auto" if resume else None,
    }  # fmt: skip
    valid = field_names(command.config)
    values: dict[str, Any] = {"eval_temperatures": []} if "eval_temperatures" in valid else {}  # evaluated below
    values.update(arm.params)
    values.update({k: v for k, v in study_values.items() if k in valid})
    return build_config(command.config, values, source=f"arm {arm.name}")


def is_trained(cfg: StudyConfig, arm: ArmConfig, seed: int, commands: dict[str, Command] = ARM_COMMANDS) -> bool:
    """The run has its final model and was trained with exactly this arm's settings (a changed param retrains)."""
    folder = run_dir(cfg, arm, seed)
    command = arm_command(arm, commands)
    if command is None:
        return True
    if not (folder / "model").is_dir() or not (folder / "config.yaml").is_file():
        return False
    import yaml

    saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    # compare what the arm sets (a stage may fill in other fields, e.g. a task's completion budget)
    expected = {**arm.params, "max_steps": arm_steps(arm, cfg, commands), "seed": seed}
    resolved = to_dict(build_config(command.config, expected, source=f"arm {arm.name}"))
    return all(saved.get(k) == resolved[k] for k in expected)


def train_arm(cfg: StudyConfig, arm: ArmConfig, seed: int, commands: dict[str, Command] = ARM_COMMANDS) -> float:
    """Train one arm × seed unless it is trained as configured; returns the wall seconds spent (0 if skipped)."""
    command = arm_command(arm, commands)
    folder = run_dir(cfg, arm, seed)
    if command is None or is_trained(cfg, arm, seed, commands):
        return 0.0
    resume = cfg.resume == "auto" and folder.is_dir() and not (folder / "model").is_dir()
    if folder.is_dir() and not resume:
        shutil.rmtree(folder)  # a partial run restarts cleanly: no stale metrics or findings
    console.print(f"[bold]{arm.name}[/] seed {seed}: training ({arm.algorithm}, {arm_steps(arm, cfg, commands)} steps)")
    started = time.perf_counter()
    command.run(training_config(cfg, arm, seed, resume, command))
    return time.perf_counter() - started


def evaluate_arm(cfg: StudyConfig, arm: ArmConfig, seed: int, train_seconds: float) -> None:
    folder = run_dir(cfg, arm, seed)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "eval.json").is_file():  # a run's own end-of-run results are kept beside ours
        (folder / "eval.json").replace(folder / "train_eval.json")
    trained = arm.algorithm != BASELINE
    started = time.perf_counter()
    evaluate_model(EvalCommandConfig(
        out=str(folder), task=cfg.task, task_size=cfg.task_size, cache_dir=cfg.cache_dir,
        model=str(folder / "model") if trained else cfg.model, reference=cfg.model, reward_model=cfg.reward_model,
        reward_fn=gold_reward_fn(cfg), reward_weights=cfg.reward_weights, data=cfg.eval_prompts, temperatures=cfg.temperatures, samples_per_prompt=cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens, seed=cfg.eval_seed + seed, threads=cfg.threads, progress=cfg.progress,
    ))  # fmt: skip
    results = json.loads((folder / "eval.json").read_text())
    results["study_eval"] = {"settings": eval_settings(cfg, seed), "train_seconds": round(train_seconds, 1),
                             "eval_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    (folder / "eval.json").write_text(json.dumps(results, indent=1))


def build_shared_artefacts(cfg: StudyConfig) -> dict[str, Any]:
    """Base, SFT and reward model (and the preference pairs) of the task, built once before any arm."""
    if not cfg.task or cfg.model:
        return {"sft_model": cfg.model, "reward_model": cfg.reward_model}
    cached = artefacts.TaskArtefacts.of(cfg)
    shared: dict[str, Any] = {"sft_model": str(artefacts.sft_model(cached)),
                              "reward_model": str(artefacts.reward_model(cached))}  # fmt: skip
    shared["rm_heldout_accuracy"] = final_metrics(Path(shared["reward_model"]).parent).get("eval/accuracy")
    console.print(f"shared artefacts: SFT {shared['sft_model']}, reward model {shared['reward_model']}")
    return shared


def arm_record(cfg: StudyConfig, arm: ArmConfig, commands: dict[str, Command] = ARM_COMMANDS) -> dict[str, Any]:
    """The arm as study.json lists it: its settings and its run folders (relative to the study folder)."""
    trained = arm.algorithm != BASELINE
    return {"name": arm.name, "algorithm": arm.algorithm, "group": arm.group, "params": arm.params,
            "max_steps": arm_steps(arm, cfg, commands) if trained else 0,
            "runs": [{"seed": s, "dir": str(run_dir(cfg, arm, s).relative_to(cfg.out))} for s in cfg.seeds]}  # fmt: skip


def write_study_json(cfg: StudyConfig, arms: list[ArmConfig], wall_seconds: float,
                     shared: dict[str, Any] | None = None, commands: dict[str, Command] = ARM_COMMANDS) -> Path:
    out = Path(cfg.out)
    records = [arm_record(cfg, arm, commands) for arm in arms]
    absolute = [{**r, "runs": [{**run, "dir": str(out / run["dir"])} for run in r["runs"]]} for r in records]
    numbers = summarize_arms(absolute, cfg.baseline or None, cfg.metric, cfg.bootstrap_resamples)
    timings = {}
    for record in absolute:
        for run in record["runs"]:
            path = Path(run["dir"]) / "eval.json"
            if path.is_file():
                timings[f"{record['name']}/seed-{run['seed']}"] = json.loads(path.read_text()).get("study_eval", {})
    study = {"name": cfg.name, "kind": "study", "config": to_dict(cfg), "baseline": cfg.baseline or None,
             "gold": gold_source(cfg.task, gold_reward_fn(cfg)), "shared": shared or {}, "arms": records, "wall_seconds": round(wall_seconds, 1), "runs": timings,
             **numbers}  # fmt: skip
    (out / "study.json").write_text(json.dumps(study, indent=1))
    return out / "study.json"


def run_study(cfg: StudyConfig, commands: dict[str, Command] = ARM_COMMANDS) -> Path:
    """Run every arm × seed (skipping finished ones) and write study.json; returns its path (the CLI writes
    the report from it). A run stopped by a diagnostic is listed as failed (and retried on the next
    invocation); the other runs go on."""
    from rlhflab.training.loop import TrainingStopped, set_threads

    set_threads(cfg.threads)
    started = time.perf_counter()
    arms = expand_arms(cfg, source=cfg.name, commands=commands)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "study.yaml")
    shared = build_shared_artefacts(cfg)
    failed: dict[str, str] = {}
    for arm in arms:
        for seed in cfg.seeds:
            if is_evaluated(run_dir(cfg, arm, seed), eval_settings(cfg, seed)) and is_trained(cfg, arm, seed, commands):
                console.print(f"[dim]{arm.name} seed {seed}: finished, skipped[/]")
                continue
            try:
                seconds = train_arm(cfg, arm, seed, commands)
            except TrainingStopped as exc:  # a diagnostic stopped this run: the others still say something
                if exc.exit_code == 130:  # a stop signal stops the study, not just this arm
                    raise
                console.print(f"[bold red]{arm.name} seed {seed} stopped:[/] {exc}")
                failed[f"{arm.name}/seed-{seed}"] = str(exc)
                continue
            evaluate_arm(cfg, arm, seed, seconds)
    path = write_study_json(cfg, arms, time.perf_counter() - started, {**shared, "failed": failed}, commands)
    console.print(f"study: {path}")
    return path

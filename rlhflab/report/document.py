"""`rlhflab report RUN_OR_STUDY_DIR`: report.html (self-contained) and report.md for a study or one run.

A study folder has study.json (written by `rlhflab study`); a run folder of any command has
eval.json and/or metrics.jsonl and diagnostics.jsonl, and is reported as a study of one arm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhflab.config import opt
from rlhflab.errors import InputError
from rlhflab.report import html, markdown
from rlhflab.report.content import build_sections
from rlhflab.report.plots import draw_all
from rlhflab.study.results import read_eval, summarize_arms


@dataclass
class ReportConfig:
    path: str = opt("runs/demo", "a study folder (study.json) or a run folder (eval.json, metrics.jsonl)")
    out: str | None = opt(None, "folder for report.html, report.md and plots/ (default: the folder itself)")


def guess_algorithm(run: Path) -> str:
    """A run folder's algorithm from the fields of its config.yaml (each algorithm has its own)."""
    path = run / "config.yaml"
    keys = set(yaml.safe_load(path.read_text()) or {}) if path.is_file() else set()
    for algorithm, marker in (("dpo", "loss_type"), ("ppo", "value_init"), ("grpo", "scale_rewards")):
        if marker in keys:
            return algorithm
    return "run"


def run_as_study(run: Path) -> dict[str, Any]:
    """A single run folder as a one-arm study (no baseline, so no paired differences)."""
    name = run.resolve().name
    if name.startswith("seed-"):  # a study's run folder: ARM/seed-S
        name = f"{run.resolve().parent.name}/{name}"
    arm = {"name": name, "algorithm": guess_algorithm(run), "group": "", "params": {},
           "runs": [{"seed": 0, "dir": "."}]}  # fmt: skip
    config = run / "config.yaml"
    if config.is_file():
        values = yaml.safe_load(config.read_text()) or {}
        arm["runs"][0]["seed"] = values.get("seed", 0)
        arm["max_steps"] = values.get("max_steps", "–")
    numbers = summarize_arms([{**arm, "runs": [{"seed": 0, "dir": str(run)}]}], None, "gold")
    gold = (read_eval(run) or {}).get("gold")  # what the gold column is (eval.json names it)
    return {"name": f"run {arm['name']}", "kind": "run", "baseline": None, "gold": gold, "arms": [arm], **numbers}


def load_study(folder: Path) -> dict[str, Any]:
    if (folder / "study.json").is_file():
        return json.loads((folder / "study.json").read_text())
    if any((folder / name).is_file() for name in ("eval.json", "metrics.jsonl", "diagnostics.jsonl")):
        return run_as_study(folder)
    raise InputError("not a study folder (study.json) or a run folder (eval.json, metrics.jsonl)", file=str(folder))


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Draw the plots and write report.html and report.md; returns the HTML path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found", file=str(folder))
    out = Path(out or folder)
    out.mkdir(parents=True, exist_ok=True)
    study = load_study(folder)
    figures = draw_all(study, folder) if out == folder else _draw_elsewhere(study, folder, out)
    sections = build_sections(study, folder, figures)
    title = f"rlhflab report: {study['name']}"
    (out / "report.md").write_text(markdown.render(title, sections, out), encoding="utf-8")
    page = out / "report.html"
    page.write_text(html.render(title, sections), encoding="utf-8")
    return page


def _draw_elsewhere(study: dict[str, Any], folder: Path, out: Path) -> dict[str, Path]:
    """Plots into OUT/plots/ while run folders stay relative to the study folder."""
    arms = [{**a, "runs": [{**r, "dir": str((folder / r["dir"]).resolve())} for r in a["runs"]]} for a in study["arms"]]
    figures = draw_all({**study, "arms": arms}, out)
    return figures


def report(cfg: ReportConfig) -> Path:
    from rich.console import Console

    page = write_report(Path(cfg.path), Path(cfg.out) if cfg.out else None)
    Console().print(f"report: {page}")
    return page

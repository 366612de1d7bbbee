"""The study's figures (matplotlib, Agg, PNG). Each returns its path, or None when its data is absent.

Inputs are a study.json dict and the study folder (run folders are relative to it), so the same
code draws a multi-seed study and a single run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rlhflab.report.content import column_title  # noqa: E402
from rlhflab.study.results import metric_grid, read_eval  # noqa: E402
from rlhflab.training.metrics import read_metrics  # noqa: E402

CURVES = {  # panel → metric names to look for, first found wins (TRL's names)
    "loss": ("loss",),
    "reward": ("reward", "rewards/chosen"),
    "KL to reference per token": ("kl",),  # PPO and GRPO log the same per-token kl
    "margin": ("rewards/margins",),
}
COLORS = {"sft": "#7f7f7f", "dpo": "#1f77b4", "ppo": "#d62728", "grpo": "#2ca02c"}


def color_of(algorithm: str, index: int) -> str:
    return COLORS.get(algorithm, f"C{(index + 4) % 10}")


def arm_color(study: dict[str, Any], name: str) -> str:
    """An arm's colour: its algorithm's when that algorithm has one arm, else one of ten by arm order."""
    names = [a["name"] for a in study["arms"]]
    algorithm = study["arms"][names.index(name)]["algorithm"]
    if sum(a["algorithm"] == algorithm for a in study["arms"]) == 1:
        return color_of(algorithm, names.index(name))
    return f"C{names.index(name) % 10}"


def _line(ax: Any, steps: list[float], values: list[float], color: str, label: str | None) -> None:
    """A curve; short ones get markers so a one-step run still shows."""
    ax.plot(steps, values, color=color, lw=1.2, label=label, marker="o" if len(steps) < 10 else None, ms=3)


def headline(study: dict[str, Any]) -> str | None:
    """The first evaluation temperature: the one tables and heatmaps show."""
    return next(iter(study.get("temperatures", {})), None)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _run_metrics(study: dict[str, Any], root: Path) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    return [(arm, read_metrics(root / run["dir"])) for arm in study["arms"] for run in arm["runs"]]


def training_curves(study: dict[str, Any], root: Path, out: Path) -> Path | None:
    """Loss, reward, KL and margin over steps: one line per arm × seed, one colour per arm."""
    runs = [(arm, rows) for arm, rows in _run_metrics(study, root) if rows]
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (title, keys) in zip(axes, CURVES.items(), strict=True):
        labelled = set()
        for arm, rows in runs:
            key = next((k for k in keys if _series(rows, k)[0]), None)
            if key is None:
                continue
            label = None if arm["name"] in labelled else f"{arm['name']} ({key})"
            labelled.add(arm["name"])
            _line(ax, *_series(rows, key), arm_color(study, arm["name"]), label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if labelled:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return _save(fig, out / "training_curves.png")


def _run_points(study: dict[str, Any], root: Path, temperature: str, metric: str) -> list[tuple[dict, float, float]]:
    """(arm, KL, metric) of every evaluated arm × seed at `temperature`."""
    points = []
    for arm in study["arms"]:
        for run in arm["runs"]:
            results = read_eval(root / run["dir"])
            kl = metric_grid([results], temperature, "kl") if results else None
            value = metric_grid([results], temperature, metric) if results else None
            if kl is not None and value is not None:
                points.append((arm, float(np.nanmean(kl)), float(np.nanmean(value))))
    return points


def frontier(study: dict[str, Any], root: Path, out: Path) -> Path | None:
    """Gold and proxy (RM) reward against KL to the reference: a point per arm × seed, an error bar per arm
    (its interval), and per algorithm a line through its arms in order of KL (the DPO paper's Figure 2)."""
    temperature = headline(study)
    panels = [m for m in ("gold", "rm_score") if temperature and _run_points(study, root, temperature, m)]
    if not panels:
        return None
    summary = study["temperatures"][temperature]["summary"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    algorithms = list(dict.fromkeys(a["algorithm"] for a in study["arms"]))
    for ax, metric in zip(axes[0], panels, strict=True):
        for arm, kl, value in _run_points(study, root, temperature, metric):
            ax.scatter(kl, value, s=14, alpha=0.5, color=color_of(arm["algorithm"], algorithms.index(arm["algorithm"])))
        for index, algorithm in enumerate(algorithms):
            arms = [a["name"] for a in study["arms"] if a["algorithm"] == algorithm and metric in summary.get(a["name"], {})]
            arms = [a for a in arms if "kl" in summary[a]]
            arms.sort(key=lambda a: summary[a]["kl"]["mean"])
            if not arms:
                continue
            x = [summary[a]["kl"]["mean"] for a in arms]
            y = [summary[a][metric]["mean"] for a in arms]
            yerr = [[v - summary[a][metric]["ci_low"] for a, v in zip(arms, y, strict=True)],
                    [summary[a][metric]["ci_high"] - v for a, v in zip(arms, y, strict=True)]]  # fmt: skip
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, color=color_of(algorithm, index), label=algorithm)
        ax.set_xlabel(f"KL to reference (nats, T={temperature})")
        ax.set_ylabel(column_title(study, metric) if metric == "gold" else "reward-model score")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, out / "frontier.png")


def delta_heatmap(study: dict[str, Any], out: Path) -> Path | None:
    """Arms × prompts: the arm's mean reward on the prompt minus the baseline's (paired, same samples' seeds)."""
    temperature = headline(study)
    metric = study.get("metric", "gold")
    paired = study["temperatures"][temperature]["paired"] if temperature else {}
    rows = [(arm, p[metric]["per_prompt"]) for arm, p in paired.items() if metric in p]
    if not rows:
        return None
    grid = np.array([values for _, values in rows])
    limit = float(np.nanmax(np.abs(grid))) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * grid.shape[1] + 3), 0.45 * len(rows) + 1.8))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(len(rows)), [arm for arm, _ in rows], fontsize=8)
    ax.set_xticks(range(grid.shape[1]), [str(i) for i in range(grid.shape[1])], fontsize=7)
    ax.set_xlabel("evaluation prompt")
    ax.set_title(f"{metric} minus {study.get('baseline')}'s, per prompt (T={temperature})", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _save(fig, out / "delta_heatmap.png")


def temperature_curves(study: dict[str, Any], out: Path) -> Path | None:
    """The ranking metric against evaluation temperature, per arm, with intervals."""
    temperatures = sorted(study.get("temperatures", {}), key=float)
    metric = study.get("metric", "gold")
    if len(temperatures) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in study["arms"]:
        blocks = [study["temperatures"][t]["summary"].get(arm["name"], {}).get(metric) for t in temperatures]
        if any(b is None for b in blocks):
            continue
        means = [b["mean"] for b in blocks]
        yerr = [[m - b["ci_low"] for m, b in zip(means, blocks, strict=True)],
                [b["ci_high"] - m for m, b in zip(means, blocks, strict=True)]]  # fmt: skip
        ax.errorbar([float(t) for t in temperatures], means, yerr=yerr, marker="o", capsize=3, label=arm["name"],
                    color=arm_color(study, arm["name"]))  # fmt: skip
    ax.set_xlabel("evaluation temperature")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, out / "temperature.png")


def zero_std_and_margin(study: dict[str, Any], root: Path, out: Path) -> Path | None:
    """GRPO's fraction of groups with zero reward spread (no learning signal) and DPO's margin, over steps."""
    panels = {"GRPO frac_reward_zero_std": "frac_reward_zero_std", "DPO rewards/margins": "rewards/margins"}
    runs = _run_metrics(study, root)
    present = {title: key for title, key in panels.items() if any(_series(rows, key)[0] for _, rows in runs)}
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 3.2), squeeze=False)
    for ax, (title, key) in zip(axes[0], present.items(), strict=True):
        labelled = set()
        for arm, rows in runs:
            steps, values = _series(rows, key)
            if steps:
                _line(ax, steps, values, arm_color(study, arm["name"]), None if arm["name"] in labelled else arm["name"])
                labelled.add(arm["name"])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, out / "zero_std_and_margin.png")


def draw_all(study: dict[str, Any], root: Path) -> dict[str, Path]:
    """Every figure whose data exists, into ROOT/plots/; {title: path}."""
    out = root / "plots"
    figures = {
        "Reward–KL frontier": frontier(study, root, out),
        "Per-prompt difference to the baseline": delta_heatmap(study, out),
        "Reward against evaluation temperature": temperature_curves(study, out),
        "Training curves": training_curves(study, root, out),
        "GRPO zero-std groups and DPO margin": zero_std_and_margin(study, root, out),
    }
    return {title: path for title, path in figures.items() if path is not None}

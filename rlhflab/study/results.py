"""From run folders to a study's numbers: read each run's eval.json, stack seeds, summarize, pair, rank.

Used by the study runner (writing study.json) and by the report of a single run folder, so both
describe runs with the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rlhflab.study.stats import compare_rankings, paired_difference, rank, summarize

METRICS = ("gold", "rm_score", "kl", "length", "distinct_1", "distinct_2", "malformed", "truncated")
PAIRED_METRICS = ("gold", "rm_score", "kl", "malformed")


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """The evaluation-suite results of a run folder (eval.json; `{"suite": ...}` is the layout DPO run folders
    written before the stages took over the end-of-run evaluation still have)."""
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    if "temperatures" not in results and isinstance(results.get("suite"), dict):
        results = results["suite"]
    return results if "temperatures" in results else None


def metric_grid(evals: list[dict[str, Any]], temperature: str, metric: str) -> np.ndarray | None:
    """[K, P, S] values of `metric` at `temperature` over the K evaluations (seeds); None if any lacks it."""
    grids = []
    for results in evals:
        block = results["temperatures"].get(temperature)
        if block is None:
            return None
        rows = []
        for prompt in block["per_prompt"]:
            if metric in prompt.get("values", {}):
                rows.append(prompt["values"][metric])
            elif metric in prompt:
                rows.append([prompt[metric]])  # per-prompt metrics (distinct-n) have one value
            else:
                return None
        grids.append(rows)
    shapes = {np.shape(g) for g in grids}
    return np.array(grids, dtype=float) if grids and len(shapes) == 1 else None


def primary_metric(preferred: str, available: list[str]) -> str:
    for metric in (preferred, "gold", "rm_score"):
        if metric in available:
            return metric
    return available[0] if available else preferred


def summarize_arms(arms: list[dict[str, Any]], baseline: str | None, metric: str, resamples: int = 1000) -> dict[str, Any]:
    """arms: [{name, algorithm, group, runs: [{seed, dir}]}] → per temperature: summary, paired, ranking."""
    evals = {a["name"]: [e for e in (read_eval(Path(r["dir"])) for r in a["runs"]) if e is not None] for a in arms}
    evaluated = [a for a in arms if evals[a["name"]]]
    temperatures = [t for t in (evals[evaluated[0]["name"]][0]["temperatures"] if evaluated else {})]
    out: dict[str, Any] = {"temperatures": {}, "prompts": [], "metric": metric}
    if evaluated:
        first_block = evals[evaluated[0]["name"]][0]["temperatures"][temperatures[0]]
        out["prompts"] = [p["prompt"] for p in first_block["per_prompt"]]
    all_grids = {}
    for t_index, temperature in enumerate(temperatures):
        all_grids[temperature] = grids = {
            a["name"]: {m: g for m in METRICS if (g := metric_grid(evals[a["name"]], temperature, m)) is not None}
            for a in evaluated
        }
        summary = {name: {m: summarize(g, resamples, seed=t_index) for m, g in by_metric.items()} for name, by_metric in grids.items()}
        available = sorted({m for by_metric in grids.values() for m in by_metric})
        out["metric"] = metric = primary_metric(metric, available)
        paired = _paired(grids, baseline, resamples, t_index)
        out["temperatures"][temperature] = {
            "summary": summary, "paired": paired, "ranking": _rankings(evaluated, summary, metric),
            "examples": {a["name"]: _examples(evals[a["name"]][0], temperature) for a in evaluated},
        }  # fmt: skip
    out["phases"] = _phase_comparisons(evaluated, out["temperatures"], all_grids, out["metric"], resamples)
    return out


def _paired(grids: dict[str, dict[str, np.ndarray]], baseline: str | None, resamples: int, seed: int) -> dict[str, Any]:
    if not baseline or baseline not in grids:
        return {}
    paired: dict[str, Any] = {}
    for name, by_metric in grids.items():
        if name == baseline:
            continue
        paired[name] = {
            m: paired_difference(g, grids[baseline][m], resamples, seed)
            for m, g in by_metric.items()
            if m in PAIRED_METRICS and m in grids[baseline] and g.shape == grids[baseline][m].shape
        }
    return paired


def groups_of(arms: list[dict[str, Any]]) -> list[str]:
    """Groups in order of appearance; arms without a group belong to every group. [""] when none is named."""
    groups = list(dict.fromkeys(a["group"] for a in arms if a.get("group")))
    return groups or [""]


def _rankings(arms: list[dict[str, Any]], summary: dict[str, Any], metric: str) -> dict[str, list[dict[str, Any]]]:
    rankings = {}
    for group in groups_of(arms):
        members = [a for a in arms if not a.get("group") or a["group"] == group]
        scored = {a["name"]: summary[a["name"]][metric] for a in members if metric in summary[a["name"]]}
        algorithm = {a["name"]: a["algorithm"] for a in members}
        rankings[group or "all"] = [{**e, "algorithm": algorithm[e["arm"]]} for e in rank(scored)]
    return rankings


def _phase_comparisons(arms: list[dict[str, Any]], by_temperature: dict[str, Any], grids: dict[str, Any], metric: str,
                       resamples: int) -> list[dict[str, Any]]:
    """Consecutive groups compared (phase 1 → tuned), where each algorithm has one arm per group: did the
    ranking change, and per algorithm the paired change of the metric (after − before) with its interval."""
    groups = [g for g in groups_of(arms) if g]
    comparisons = []
    for before, after in zip(groups, groups[1:], strict=False):
        entry: dict[str, Any] = {"before": before, "after": after, "temperatures": {}}
        for temperature, block in by_temperature.items():
            first, second = block["ranking"].get(before, []), block["ranking"].get(after, [])
            unique = all(len({e["algorithm"] for e in r}) == len(r) for r in (first, second))
            if not (first and second and unique):
                continue
            arm_of = [{e["algorithm"]: e["arm"] for e in r} for r in (first, second)]
            by_arm = grids[temperature]

            def separated(i: int, x: str, y: str, arm_of=arm_of, by_arm=by_arm) -> bool:
                d = paired_difference(by_arm[arm_of[i][x]][metric], by_arm[arm_of[i][y]][metric], resamples)
                return bool(d["ci_low"] > 0 or d["ci_high"] < 0)

            comparison = compare_rankings(first, second, separated=separated)
            comparison["change"] = {
                algorithm: paired_difference(grids[temperature][arm_of[1][algorithm]][metric],
                                             grids[temperature][arm_of[0][algorithm]][metric], resamples)
                for algorithm in comparison["order_before"] if arm_of[0][algorithm] != arm_of[1][algorithm]
            }  # fmt: skip
            entry["temperatures"][temperature] = comparison
        comparisons.append(entry)
    return comparisons


def _examples(results: dict[str, Any], temperature: str) -> list[list[str]]:
    """A few sampled completions per prompt (the first seed's), for side-by-side reading."""
    return [p.get("examples", []) for p in results["temperatures"][temperature]["per_prompt"]]

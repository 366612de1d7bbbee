"""What a report says, independent of its format: sections of paragraphs, tables and figures.

html.py and markdown.py render the same sections, so the two files never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhflab.diagnostics.findings import read_findings
from rlhflab.study.stats import rank_label
from rlhflab.training.metrics import json_lines

COLUMNS = {  # metric → column title, in table order
    "gold": "gold reward", "rm_score": "RM score", "kl": "KL to ref at T", "length": "length",
    "distinct_2": "distinct-2", "malformed": "malformed",
}  # fmt: skip


def column_title(study: dict[str, Any], metric: str) -> str:
    """A metric's column title; a gold reward that is not a task's names its reward function."""
    source = study.get("gold") or ""
    if metric == "gold" and source.startswith("reward function "):
        return f"gold: {source.removeprefix('reward function ')}"
    return COLUMNS.get(metric, metric)


EXAMPLE_PROMPTS = 4  # prompts shown side by side with each arm's completions
TRAINING_EXAMPLES = 4  # completions shown from the first and the last logged step of a PPO/GRPO run


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    title: str
    path: Path


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)  # a str is a paragraph


def interval(s: dict[str, float] | None, signed: bool = False) -> str:
    if not s:
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(s['mean'])}\u00a0[{s['ci_low']:.3f},\u00a0{s['ci_high']:.3f}]"  # no-break spaces: one line


def summary_table(study: dict[str, Any], temperature: str) -> Table:
    """One row per arm: rank within its group, the metrics with intervals, the paired difference to the baseline."""
    block = study["temperatures"][temperature]
    metric = study["metric"]
    metrics = [m for m in COLUMNS if any(m in s for s in block["summary"].values())]
    baseline = study.get("baseline")
    ranks = {(g, e["arm"]): rank_label(e) for g, ranking in block["ranking"].items() for e in ranking}
    headers = ["rank", "arm", "algorithm", "group", "steps", *(column_title(study, m) for m in metrics)]
    if block["paired"]:
        headers.append(f"Δ {column_title(study, metric)} vs {baseline}")
    rows = []
    for arm in study["arms"]:
        if arm["name"] not in block["summary"]:
            continue
        arm_ranks = [label for (g, name), label in ranks.items() if name == arm["name"]]
        row = [" / ".join(dict.fromkeys(arm_ranks)) or "–", arm["name"], arm["algorithm"], arm.get("group") or "–",
               str(arm.get("max_steps", "–"))]  # fmt: skip
        row += [interval(block["summary"][arm["name"]].get(m)) for m in metrics]
        if block["paired"]:
            row.append(interval(block["paired"].get(arm["name"], {}).get(metric), signed=True) if arm["name"] != baseline else "—")
        rows.append(row)
    return Table(headers, rows)


def ranking_paragraphs(study: dict[str, Any], temperature: str) -> list[str]:
    metric = study["metric"]
    out = []
    for group, ranking in study["temperatures"][temperature]["ranking"].items():
        order = ", ".join(f"{rank_label(e)} {e['arm']} ({e['mean']:+.3f})" for e in ranking)
        where = "" if group == "all" else f" in {group}"
        out.append(f"Ranking by {column_title(study, metric)}{where} at T={temperature}: {order}. "
                   "`=` marks arms whose 95% interval overlaps another's (a tie at this sample size).")  # fmt: skip
    return out


def phase_paragraphs(study: dict[str, Any]) -> list[str]:
    """Did the ranking change between phases, and is the change outside the intervals?"""
    out = []
    for comparison in study.get("phases", []):
        for temperature, c in comparison["temperatures"].items():
            head = f"{comparison['before']} → {comparison['after']} at T={temperature}: "
            before, after = " > ".join(c["order_before"]), " > ".join(c["order_after"])
            if not c["changed"]:
                out.append(head + f"the ranking did not change ({before}).")
                continue
            resolved = {"yes": "yes: in both phases some swapped pair's paired difference has a 95% interval excluding 0",
                        "partly": "partly: a swapped pair's paired difference excludes 0 in one phase only",
                        "no": "no: every swapped pair's paired difference includes 0 in both phases, so the "
                              "reversal is within the noise"}  # fmt: skip
            out.append(head + f"the ranking changed ({before}  →  {after}). Outside the intervals? "
                       f"{resolved[c['outside_intervals']]}.")  # fmt: skip
            changes = [f"{a} {interval(d, signed=True)}" for a, d in c.get("change", {}).items()]
            if changes:
                out.append(f"Paired change of {study['metric']} ({comparison['after']} − {comparison['before']}): "
                           + "; ".join(changes) + ".")  # fmt: skip
    return out


def findings_section(study: dict[str, Any], root: Path) -> Section:
    section = Section("Diagnostics")
    for arm in study["arms"]:
        rows = []
        for run in arm["runs"]:
            for f in read_findings(root / run["dir"] / "diagnostics.jsonl"):
                rows.append([str(run["seed"]), str(f.step), f.severity, f.code, f.message, f.advice])
        if rows:
            section.blocks += [f"**{arm['name']}** — {len(rows)} finding(s)",
                               Table(["seed", "step", "severity", "code", "message", "advice"], rows)]  # fmt: skip
    if not section.blocks:
        section.blocks.append("No diagnostic findings in any run.")
    return section


def examples_section(study: dict[str, Any], temperature: str) -> Section:
    """The same prompts, each arm's sampled completions side by side (first seed)."""
    examples = study["temperatures"][temperature].get("examples", {})
    arms = [a["name"] for a in study["arms"] if a["name"] in examples]
    rows = []
    for i, prompt in enumerate(study.get("prompts", [])[:EXAMPLE_PROMPTS]):
        rows.append([prompt, *("\n".join(repr(t)[1:-1] for t in examples[a][i]) for a in arms)])
    return Section(f"Sampled completions (T={temperature})", [Table(["prompt", *arms], rows)] if rows else [])


def training_completions_section(study: dict[str, Any], root: Path) -> Section | None:
    """What each PPO/GRPO arm's policy wrote at its first and its last logged step (completions.jsonl, first
    seed): reward hacking and collapse show in the text before they show in any number."""
    section = Section("What the policy wrote while training")
    for arm in study["arms"]:
        run = arm["runs"][0]
        rows = [row for _, row in json_lines(root / run["dir"] / "completions.jsonl")
                if {"step", "prompt", "completion", "reward"} <= row.keys()]
        if not rows:
            continue
        steps = sorted({row["step"] for row in rows})
        shown = [row for step in dict.fromkeys((steps[0], steps[-1]))
                 for row in [r for r in rows if r["step"] == step][:TRAINING_EXAMPLES]]  # fmt: skip
        table = Table(["step", "prompt", "completion", "reward"],
                      [[str(r["step"]), str(r["prompt"]), repr(r["completion"])[1:-1], f"{r['reward']:.3f}"]
                       for r in shown])  # fmt: skip
        section.blocks += [f"**{arm['name']}** (seed {run['seed']})", table]
    return section if section.blocks else None


def timing_paragraph(study: dict[str, Any]) -> str | None:
    runs = study.get("runs", {})
    if "wall_seconds" not in study:
        return None
    train = sum(r.get("train_seconds", 0) for r in runs.values())
    evaluation = sum(r.get("eval_seconds", 0) for r in runs.values())
    return (f"Wall time of this invocation: {study['wall_seconds']:.0f} s (training {train:.0f} s and "
            f"evaluation {evaluation:.0f} s over {len(runs)} runs, as last recorded).")  # fmt: skip


def build_sections(study: dict[str, Any], root: Path, figures: dict[str, Path]) -> list[Section]:
    temperatures = list(study.get("temperatures", {}))
    overview = Section("Summary")
    seeds = sorted({r["seed"] for a in study["arms"] for r in a["runs"]})
    paired = " Δ is the paired difference to the baseline (same prompts, same sampling seeds)." if study.get("baseline") else ""
    overview.blocks.append(
        f"{len(study['arms'])} arm(s) × {len(seeds)} seed(s); {len(study.get('prompts', []))} evaluation prompts. "
        f"Intervals are 95% bootstrap intervals over seeds × prompts × samples.{paired} KL to ref at T: the KL "
        "to the reference model (a study's SFT model) of the distributions sampled at temperature T, KL(π_T ‖ "
        "π_ref,T) with both models' logits divided by T."
    )
    shared = study.get("shared") or {}
    if shared.get("sft_model"):
        accuracy = shared.get("rm_heldout_accuracy")
        held_out = f" (held-out pairwise accuracy {accuracy:.3f})" if isinstance(accuracy, float) else ""
        overview.blocks.append(f"Every arm starts from the SFT model `{shared['sft_model']}` and is scored by the "
                               f"reward model `{shared.get('reward_model')}`{held_out}.")  # fmt: skip
    if study.get("gold"):
        overview.blocks.append(f"Gold reward: {study['gold']}, applied to every sampled completion.")
    for run, message in shared.get("failed", {}).items():
        overview.blocks.append(f"**Run {run} stopped** and is left out of every table: {message}")
    if (timing := timing_paragraph(study)) is not None:
        overview.blocks.append(timing)
    for temperature in temperatures:
        overview.blocks += [f"**Evaluation temperature {temperature}**", summary_table(study, temperature)]
        overview.blocks += ranking_paragraphs(study, temperature)
    if not temperatures:
        overview.blocks.append("No evaluation results (eval.json) were found.")
    sections = [overview]
    if phases := phase_paragraphs(study):
        sections.append(Section("Did the ranking change between phases?", phases))
    sections.append(Section("Plots", [Figure(t, p) for t, p in figures.items()] or ["No plottable data."]))
    sections.append(findings_section(study, root))
    if temperatures:
        sections.append(examples_section(study, temperatures[0]))
    if (training := training_completions_section(study, root)) is not None:
        sections.append(training)
    return sections


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())

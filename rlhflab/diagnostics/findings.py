"""Findings and the monitor seam: monitors watch the metric stream and say what went wrong and what to change.

A monitor is any object with `observe(step, metrics) -> list[Finding]` and `state_dict()` /
`load_state_dict()` (so a resumed run keeps its windows). Monitors are pure functions of the
metrics they are fed, so they are tested on synthetic streams.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

SEVERITIES = ("info", "warning", "error")


@dataclass
class Finding:
    step: int
    code: str  # stable identifier, e.g. "dpo.margin_explosion"
    severity: str  # info | warning | error (error stops the run)
    message: str  # what was seen and what it means
    advice: str  # what to change

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Monitor(Protocol):
    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StatefulMonitor:
    """Gives a monitor whose state is its plain attributes a state_dict for checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(copy.deepcopy(state))


class NonFiniteMonitor(StatefulMonitor):
    """`train.nonfinite`: the loss or the gradient norm is NaN/inf. The training loop acts on it."""

    def observe(self, step: int, metrics: dict[str, float]) -> list[Finding]:
        bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
        if not bad:
            return []
        return [
            Finding(
                step,
                "train.nonfinite",
                "error",
                f"{' and '.join(bad)} is not finite at step {step}; the update was not applied.",
                "Lower the learning rate, check the data for empty or extreme examples, keep "
                "max_grad_norm > 0; --on-nonfinite skip skips such steps (a bounded number in a row).",
            )
        ]


class FindingsLog:
    """Writes findings to diagnostics.jsonl and the console; remembers each (code) once per run for the console."""

    def __init__(self, path: Path, console: Any | None = None):
        self.path = path
        self.console = console
        self.findings: list[Finding] = []

    def emit(self, findings: list[Finding]) -> None:
        if not findings:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for finding in findings:
                f.write(finding.to_json() + "\n")
        for finding in findings:
            self.findings.append(finding)
            if self.console is not None:
                style = {"info": "green", "warning": "yellow", "error": "bold red"}[finding.severity]
                self.console.print(
                    f"[{style}]{finding.severity}[/] [bold]{finding.code}[/] (step {finding.step}): "
                    f"{finding.message}\n  advice: {finding.advice}"
                )


def read_findings(path: Path) -> list[Finding]:
    if not path.exists():
        return []
    return [Finding(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""Metric sinks: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, and
`completions.jsonl` (example rollouts of PPO and GRPO: one JSON object per sample, with its step)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

# Keys of a metrics line that measure wall time: they differ between any two runs of the same seed.
# `time`, and every key under these prefixes: `timing/*` (seconds per phase), `perf/*` (throughput, MFU).
WALL_CLOCK_KEYS = ("time",)
WALL_CLOCK_PREFIXES = ("timing/", "perf/")


def is_wall_clock(key: str) -> bool:
    """Whether a metric measures wall time (see WALL_CLOCK_KEYS): compare two runs without these."""
    return key in WALL_CLOCK_KEYS or key.startswith(WALL_CLOCK_PREFIXES)


def _jsonable(value: float) -> Any:
    # JSON has no NaN/inf; keep them readable rather than writing invalid JSON.
    return value if math.isfinite(value) else str(value)


class MetricsWriter:
    """Appends `{"step", "time", **metrics}` lines; on resume drops lines a killed run wrote after its checkpoint.

    `enabled=False` (processes other than rank 0 under torchrun) writes nothing.
    """

    def __init__(self, out: Path, keep_until_step: int | None = None, tensorboard: bool = True, enabled: bool = True):
        self.path = Path(out) / "metrics.jsonl"
        self.samples_path = Path(out) / "completions.jsonl"
        self._file = self._samples = None
        self._tb = None
        if not enabled:
            return
        if keep_until_step is None:
            self.path.write_text("")
            self.samples_path.unlink(missing_ok=True)  # written only by recipes that give samples
        else:
            truncate_jsonl(self.path, keep_until_step)
            truncate_jsonl(self.samples_path, keep_until_step)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=keep_until_step)

    def write(self, step: int, metrics: dict[str, float], elapsed: float) -> None:
        if self._file is None:
            return
        row = {"step": step, "time": round(elapsed, 3), **{k: _jsonable(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), step)

    def write_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Append `{"step", **sample}` lines to completions.jsonl (rank 0 only, like the metrics)."""
        if self._file is None or not samples:
            return
        if self._samples is None:
            self._samples = self.samples_path.open("a", encoding="utf-8")
        self._samples.write("".join(json.dumps({"step": step, **sample}) + "\n" for sample in samples))
        self._samples.flush()

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def json_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, object) for each line of a JSONL file that holds a JSON object; a line a kill tore mid-write
    (or anything else unparsable) is skipped, and a missing file has none."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def truncate_jsonl(path: Path, keep_until_step: int) -> None:
    """On resume, keep only the lines of steps before `keep_until_step` (they will be re-derived).

    A kill can tear the last line mid-write: unparsable lines are dropped. The file is replaced
    atomically, so a kill during the truncation itself loses nothing.
    """
    if not path.exists():
        return
    kept = [line for line, row in json_lines(path)
            if isinstance(row.get("step"), int) and row["step"] < keep_until_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Exact resume of every training command after a kill (issue 6, part 1).

A run of N steps straight and a run killed at some step, then resumed with `--resume auto`, must
write the same `metrics.jsonl` (every key but wall time), the same diagnostics and the same final
weights. Kills come from tests/fault_launcher.py (hooks the tests install): after a step's metrics line
(so the killed run has logged steps past its last checkpoint), at an epoch boundary, and in the
middle of a checkpoint write. The default suite runs each command in-process (the kill becomes an
exception that unwinds like a crash) plus one real SIGKILLed subprocess; `-m slow` runs the whole
matrix as real subprocesses, including a SIGKILL sent from outside at a random moment.

A new training command is one more entry in COMMANDS (and STEPS_PER_EPOCH).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fault_launcher import Faults
from helpers import without_timing
from safetensors.torch import load_file

from rlhflab.cli import app
from rlhflab.training.checkpoint import list_checkpoints, verify_checkpoint
from rlhflab.training.hooks import installed
from rlhflab.training.metrics import read_metrics

FAULT_LAUNCHER = Path(__file__).with_name("fault_launcher.py")

MAX_STEPS = 8
CHECKPOINT_EVERY = 2
# Wall-clock quantities (`time`, `timing/*`, `perf/*`: without_timing) differ between any two runs; everything else must match bit for bit.


def _commands(i: dict[str, str]) -> dict[str, list[str]]:
    """One small run per training command; each visits 16 examples (or prompts) per epoch, 4 per step."""
    return {
        "pretrain": ["pretrain", "--task", "reviews", "--preset", "tiny", "--num-documents", "16", "--batch-size", "4",
                     "--vocab-size", "128"],
        "sft": ["sft", "--task", "reviews", "--model", i["base"], "--num-examples", "16", "--batch-size", "4"],
        "rm": ["rm", "--model", i["sft"], "--data", i["pairs"], "--batch-size", "4"],  # 17 pairs, 1 held out
        "dpo": ["dpo", "--model", i["sft"], "--data", i["pairs"], "--batch-size", "4", "--cache-dir", i["cache"]],
        "ppo": ["ppo", "--model", i["sft"], "--task", "reviews", "--reward-model", i["rm"], "--num-prompts", "8",
                "--batch-size", "2", "--max-new-tokens", "6", "--ppo-epochs", "2"],
        "grpo": ["grpo", "--model", i["sft"], "--task", "reviews", "--reward-model", i["rm"], "--num-prompts", "8",
                 "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6"],
    }


COMMANDS = ["pretrain", "sft", "rm", "dpo", "ppo", "grpo"]
STEPS_PER_EPOCH = {"pretrain": 4, "sft": 4, "rm": 4, "dpo": 4, "ppo": 4, "grpo": 4}


def command(name: str, inputs: dict[str, str], out: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    return [*_commands(inputs)[name], "--out", str(out), "--seed", "1", "--threads", "1", "--no-progress",
            "--max-steps", str(max_steps), "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--eval-temperatures", "", *extra]  # no end-of-run evaluation: resume is about training


class SimulatedKill(BaseException):
    """In-process stand-in for SIGKILL: not an Exception, so nothing in rlhflab catches it."""


def _simulated_kill() -> None:
    raise SimulatedKill


def run_cli(args: list[str], fault: str | None = None):
    """`rlhflab ARGS` in this process, with `fault` injected (tests/fault_launcher.py); a kill raises SimulatedKill."""
    if not fault:
        return CliRunner().invoke(app, args)
    with installed(Faults(fault, kill=_simulated_kill)):
        return CliRunner().invoke(app, args)


def run_subprocess(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`rlhflab ARGS` as a process: the production entry point, or with `fault` through tests/fault_launcher.py."""
    launcher = [str(FAULT_LAUNCHER), fault] if fault else ["-m", "rlhflab.cli"]
    return subprocess.run([sys.executable, *launcher, *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def comparable(out: Path) -> list[dict]:
    return without_timing(read_metrics(out))


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Same metrics line by line (but wall time), same findings, same final weights (a LoRA run's: its adapter)."""
    a, b = comparable(straight), comparable(resumed)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a == row_b, f"step {row_a['step']} differs"
    assert (straight / "diagnostics.jsonl").read_text() == (resumed / "diagnostics.jsonl").read_text()
    weights = "adapter_model.safetensors" if (straight / "model" / "adapter_config.json").exists() else "model.safetensors"
    wa, wb = load_file(straight / "model" / weights), load_file(resumed / "model" / weights)  # LoRA: the adapter
    assert wa.keys() == wb.keys()
    assert all(wa[k].equal(wb[k]) for k in wa)


def complete_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def record_trial(**trial) -> None:
    """Append a trial to $RLHFLAB_TRIALS_LOG (used to write docs/notes_reliability.md)."""
    if os.environ.get("RLHFLAB_TRIALS_LOG"):
        with open(os.environ["RLHFLAB_TRIALS_LOG"], "a") as f:
            f.write(json.dumps(trial) + "\n")


_straight_runs: dict[tuple[str, str], Path] = {}


def straight_run(name: str, inputs, tmp_path_factory, how: str = "inprocess") -> Path:
    """The uninterrupted run of `name`, made once per session (in-process or as a subprocess)."""
    if (name, how) not in _straight_runs:
        out = tmp_path_factory.mktemp(f"straight-{name}-{how}")
        if how == "inprocess":
            result = run_cli(command(name, inputs, out))
            assert result.exit_code == 0, result.output
        else:
            proc = run_subprocess(command(name, inputs, out))
            assert proc.returncode == 0, proc.stderr
        _straight_runs[name, how] = out
    return _straight_runs[name, how]


def kill_scenarios(name: str) -> dict[str, list[str]]:
    """Faults for one killed run each, then resumed until done. Random steps are seeded by the command name."""
    epoch = STEPS_PER_EPOCH[name]
    step = random.Random(name).randint(CHECKPOINT_EVERY, MAX_STEPS - 2)
    return {
        "random-step": [f"kill@{step}"],
        "epoch-last-step": [f"kill@{epoch - 1}"],  # the boundary is replayed from the previous checkpoint
        "epoch-first-step": [f"kill@{epoch}"],  # resumes from the checkpoint written exactly at the boundary
        "checkpoint-write": [f"kill_in_checkpoint@{MAX_STEPS - 2}"],
        "killed-twice": ["kill@3", "kill@6"],
    }


DEFAULT_SCENARIOS = ("random-step", "epoch-first-step", "checkpoint-write")
KILL_CASES = [
    pytest.param(name, scenario, id=f"{name}-{scenario}",
                 marks=() if scenario in DEFAULT_SCENARIOS or name == "sft" else pytest.mark.slow)
    for name in COMMANDS
    for scenario in kill_scenarios(name)
]


@pytest.mark.parametrize(("name", "scenario"), KILL_CASES)
def test_killed_run_resumes_exactly(name, scenario, inputs, tmp_path, tmp_path_factory):
    straight = straight_run(name, inputs, tmp_path_factory)
    kills = kill_scenarios(name)[scenario]
    out = tmp_path / "run"
    for i, fault in enumerate(kills):
        args = command(name, inputs, out, *(["--resume", "auto"] if i else []))
        with pytest.raises(SimulatedKill):
            run_cli(args, fault)
        if fault.startswith("kill_in_checkpoint"):
            assert (out / "checkpoints" / f".tmp-step-{MAX_STEPS - 2:06d}").exists()  # half written
            assert [p.name for p in list_checkpoints(out)][-1] == f"step-{MAX_STEPS - 4:06d}"
    killed_lines = complete_lines(out)
    result = run_cli(command(name, inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output
    assert_same_run(straight, out)
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(out))
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    record_trial(command=name, scenario=scenario, faults=kills, how="in-process", lines_before_resume=killed_lines,
                 identical=True)


def test_torn_metrics_line_is_dropped_on_resume(inputs, tmp_path, tmp_path_factory):
    """A kill in the middle of writing a metrics line leaves half a JSON object; resume must not choke on it."""
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        run_cli(command("sft", inputs, out), "kill@4")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "time": 0.1, "lo')
    with (out / "diagnostics.jsonl").open("a") as f:
        f.write('{"step": 5, "co')
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)


def test_resume_of_a_finished_run_changes_nothing(inputs, tmp_path, tmp_path_factory):
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    assert run_cli(command("sft", inputs, out)).exit_code == 0
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert f"at step {MAX_STEPS}" in result.output
    assert_same_run(straight, out)


def test_resume_auto_without_checkpoints_starts_fresh(inputs, tmp_path, tmp_path_factory):
    """A run killed before its first checkpoint: --resume auto starts from step 0 and drops the old lines."""
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    with pytest.raises(SimulatedKill):
        run_cli(command("sft", inputs, out), "kill@0")
    assert list_checkpoints(out) == []
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert_same_run(straight, out)


def test_real_sigkill_then_resume(inputs, tmp_path, tmp_path_factory):
    """A real process SIGKILLed after step 5 (checkpoint at 4), resumed: identical to the straight run."""
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    proc = run_subprocess(command("sft", inputs, out), fault="kill@5")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(6))
    result = run_cli(command("sft", inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert "at step 4" in result.output
    assert_same_run(straight, out)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["random-step", "epoch-first-step", "checkpoint-write", "external"])
@pytest.mark.parametrize("name", COMMANDS)
def test_sigkilled_process_resumes_exactly(name, scenario, inputs, tmp_path, tmp_path_factory):
    """Real processes throughout: straight, SIGKILLed, resumed (a fresh process)."""
    straight = straight_run(name, inputs, tmp_path_factory, how="subprocess")
    out = tmp_path / "run"
    if scenario == "external":  # SIGKILL from outside once a random number of steps is logged
        target = random.Random(f"{name}-external").randint(CHECKPOINT_EVERY + 1, MAX_STEPS - 1)
        proc = subprocess.Popen([sys.executable, "-m", "rlhflab.cli", *command(name, inputs, out)],
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and complete_lines(out) < target:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        kills = [f"external SIGKILL after {complete_lines(out)} lines"]
    else:
        kills = kill_scenarios(name)[scenario]
        proc = run_subprocess(command(name, inputs, out), fault=kills[0])
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    lines = complete_lines(out)
    checkpoint = list_checkpoints(out)[-1].name if list_checkpoints(out) else None
    resumed = run_subprocess(command(name, inputs, out, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(straight, out)
    record_trial(command=name, scenario=scenario, faults=kills, how="subprocess", lines_before_resume=lines,
                 resumed_from=checkpoint, identical=True)

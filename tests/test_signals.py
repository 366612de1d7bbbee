"""Graceful stop (issue 6, part 3): SIGTERM/SIGINT finish the current step, write a checkpoint and exit
130 with a message saying how to resume; the resumed run is identical to one never stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from test_resume import (
    COMMANDS,
    assert_same_run,
    command,
    complete_lines,
    record_trial,
    run_cli,
    straight_run,
    subprocess_env,
)

from rlhflab.training.checkpoint import list_checkpoints
from rlhflab.training.metrics import read_metrics


@pytest.mark.parametrize("name", COMMANDS)
def test_sigterm_checkpoints_and_resumes_exactly(name, inputs, tmp_path, tmp_path_factory):
    straight = straight_run(name, inputs, tmp_path_factory)
    out = tmp_path / "run"
    result = run_cli(command(name, inputs, out), "sigterm@3")  # arrives as step 3 starts
    assert result.exit_code == 130, result.output
    assert "after step 4" in result.output and "--resume auto" in result.output
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]  # step 3 was finished, not dropped
    assert list_checkpoints(out)[-1].name == "step-000004"
    assert not (out / "model").exists()
    result = run_cli(command(name, inputs, out, "--resume", "auto"))
    assert result.exit_code == 0, result.output
    assert "at step 4" in result.output
    assert_same_run(straight, out)
    record_trial(command=name, scenario="sigterm", faults=["sigterm@3"], how="in-process", identical=True)


def test_sigint_checkpoints_and_resumes_exactly(inputs, tmp_path, tmp_path_factory):
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    result = run_cli(command("sft", inputs, out), "sigint@6")
    assert result.exit_code == 130, result.output
    assert "--resume auto" in result.output
    assert list_checkpoints(out)[-1].name == "step-000007"  # an odd step: written for the stop, not by schedule
    assert run_cli(command("sft", inputs, out, "--resume", "auto")).exit_code == 0
    assert_same_run(straight, out)


def test_second_signal_stops_at_once(inputs, tmp_path, tmp_path_factory):
    """Two signals: the second one stops without finishing the step; the last checkpoint still resumes exactly."""
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    result = run_cli(command("sft", inputs, out), "sigterm@3,sigint@3")
    assert result.exit_code == 130
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2]
    assert list_checkpoints(out)[-1].name == "step-000002"
    assert run_cli(command("sft", inputs, out, "--resume", "auto")).exit_code == 0
    assert_same_run(straight, out)


def _stop_process(name, inputs, out, sig):
    """Start `rlhflab NAME` as a process and send `sig` once it has logged two steps."""
    proc = subprocess.Popen([sys.executable, "-m", "rlhflab.cli", *command(name, inputs, out)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and complete_lines(out) < 2:
        time.sleep(0.002)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_to_a_real_process(sig, inputs, tmp_path, tmp_path_factory):
    straight = straight_run("sft", inputs, tmp_path_factory)
    out = tmp_path / "run"
    code, stderr = _stop_process("sft", inputs, out, sig)
    assert code == 130, stderr
    assert "--resume auto" in stderr and "Traceback" not in stderr
    stopped_at = len(read_metrics(out))
    assert list_checkpoints(out)[-1].name == f"step-{stopped_at:06d}"
    assert run_cli(command("sft", inputs, out, "--resume", "auto")).exit_code == 0
    assert_same_run(straight, out)
    record_trial(command="sft", scenario=f"external {signal.Signals(sig).name}", faults=[], how="subprocess",
                 lines_before_resume=stopped_at, identical=True)

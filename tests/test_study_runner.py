"""The study runner end to end on tiny artefacts: the SFT baseline, a stub algorithm, resume, the CLI."""

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from rlhflab.config import RunConfig
from rlhflab.report.document import write_report
from rlhflab.stages import Command
from rlhflab.stages.artefacts import sft_model
from rlhflab.stages.train import final_metrics
from rlhflab.study.config import ARM_COMMANDS, StudyConfig
from rlhflab.study.runner import run_study

CALLS: list[tuple[str, int, float]] = []
RESUMES: list[tuple[str | None, bool]] = []  # (cfg.resume, whether the run folder still had its metrics)


@dataclass
class StubConfig(RunConfig):
    task_size: str = "small"
    beta: float = 0.1


def stub_stage(cfg: StubConfig) -> Path:
    """'Trains' by copying the SFT model; logs a few metric lines and one finding, like a real run."""
    from rlhflab.stages.artefacts import TaskArtefacts
    from rlhflab.training.loop import start_run

    CALLS.append((Path(cfg.out).parent.name, cfg.seed, cfg.beta))
    RESUMES.append((cfg.resume, (Path(cfg.out) / "metrics.jsonl").is_file()))
    out = start_run(cfg)  # writes config.yaml, as every training command does
    source = sft_model(TaskArtefacts(task=cfg.task, size=cfg.task_size, cache_dir=cfg.cache_dir, progress=False))
    lines = [{"step": s, "time": 0.1 * s, "loss": 1 / s, "reward": s * cfg.beta, "kl": 0.01 * s} for s in range(1, cfg.max_steps + 1)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    finding = {"step": 2, "code": "stub.check", "severity": "info", "message": "stub saw it", "advice": "stub advice"}
    (out / "diagnostics.jsonl").write_text(json.dumps(finding) + "\n")
    shutil.copytree(source, out / "model")
    return out / "model"


STUB = {**ARM_COMMANDS, "stub": Command(StubConfig, stub_stage, "a stub that copies the SFT model")}


@pytest.fixture
def study(tiny_artefacts, tmp_path):
    a = tiny_artefacts("reviews")
    CALLS.clear()
    return StudyConfig(
        name="runner test", out=str(tmp_path / "study"), task="reviews", task_size="tiny", cache_dir=a.cache_dir,
        seeds=[0, 1], max_steps=3, temperatures=[1.0], samples_per_prompt=2, bootstrap_resamples=200, threads=1,
        progress=False, arms=[{"algorithm": "stub", "grid": {"beta": [0.1, 0.5]}}],
    )  # fmt: skip


def test_study_runs_every_arm_and_seed_then_skips_finished_runs(study):
    assert run_study(study, STUB) == Path(study.out) / "study.json"
    report = write_report(Path(study.out))
    assert sorted(CALLS) == [("stub-beta0.1", 0, 0.1), ("stub-beta0.1", 1, 0.1), ("stub-beta0.5", 0, 0.5),
                             ("stub-beta0.5", 1, 0.5)]  # fmt: skip
    out = Path(study.out)
    result = json.loads((out / "study.json").read_text())
    assert [a["name"] for a in result["arms"]] == ["sft", "stub-beta0.1", "stub-beta0.5"]
    block = result["temperatures"]["1"]
    assert set(block["summary"]) == {"sft", "stub-beta0.1", "stub-beta0.5"}
    assert {"gold", "rm_score", "kl", "length", "distinct_2", "malformed"} <= set(block["summary"]["sft"])
    # the stub's model is the SFT model and seed S samples with the same seed for every arm: the paired
    # difference to the baseline is exactly zero on every prompt
    paired = block["paired"]["stub-beta0.1"]["gold"]
    assert paired["per_prompt"] == [0.0] * 16 and paired["ci_low"] == paired["ci_high"] == 0.0
    assert report == out / "report.html" and "stub advice" in report.read_text()
    assert (out / "runs" / "stub-beta0.5" / "seed-1" / "config.yaml").is_file()

    CALLS.clear()
    run_study(study, STUB)  # everything finished: nothing trains, nothing is re-evaluated
    assert CALLS == []
    partial = out / "runs" / "stub-beta0.5" / "seed-1"
    shutil.rmtree(partial / "model")  # a run killed before saving its model restarts from scratch ...
    RESUMES.clear()
    run_study(study, STUB)
    assert CALLS == [("stub-beta0.5", 1, 0.5)] and RESUMES == [(None, False)]
    shutil.rmtree(partial / "model")  # ... or, with --resume auto, continues in its folder
    RESUMES.clear()
    run_study(replace(study, resume="auto"), STUB)
    assert RESUMES == [("auto", True)]


def test_study_command_from_a_yaml_file(study, tmp_path):
    from rlhflab.cli import app, run_study_command, study_command

    study_with_stub = study_command(run=lambda cfg: run_study_command(cfg, STUB))
    values = {k: v for k, v in vars(study).items() if k not in ("out", "seeds")}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(values))
    out = tmp_path / "cli-study"
    result = CliRunner().invoke(study_with_stub, [str(path), "--out", str(out), "--seeds", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(CALLS) == [("stub-beta0.1", 3, 0.1), ("stub-beta0.5", 3, 0.5)]
    assert (out / "report.html").is_file() and (out / "study.json").is_file()
    bad = CliRunner().invoke(study_with_stub, [str(path), "--sedes", "3"])
    assert bad.exit_code == 2 and "seeds" in bad.output
    report = CliRunner().invoke(app, ["report", str(out / "runs" / "stub-beta0.1" / "seed-3")])
    assert report.exit_code == 0, report.output
    assert (out / "runs" / "stub-beta0.1" / "seed-3" / "report.html").is_file()


def test_real_dpo_and_grpo_arms(tiny_artefacts, tmp_path):
    """The registry reaches the real stage functions: two tiny steps of DPO, one of GRPO and of PPO."""
    a = tiny_artefacts("reviews")
    cfg = StudyConfig(
        out=str(tmp_path / "real"), task="reviews", task_size="tiny", cache_dir=a.cache_dir, seeds=[0],
        temperatures=[1.0], samples_per_prompt=2, bootstrap_resamples=100, threads=1, progress=False,
        arms=[{"algorithm": "dpo", "max_steps": 2, "params": {"batch_size": 4, "beta": 0.3}},
              {"algorithm": "grpo", "max_steps": 1, "params": {"batch_size": 2, "group_size": 2, "max_new_tokens": 8}},
              {"algorithm": "ppo", "max_steps": 1, "params": {"batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8}}],
    )  # fmt: skip
    run_study(cfg)
    out = Path(cfg.out)
    for arm in ("dpo", "grpo", "ppo"):
        run = out / "runs" / arm / "seed-0"
        assert (run / "model").is_dir() and (run / "metrics.jsonl").is_file()
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["task_size"] == "tiny" and saved["seed"] == 0
    assert yaml.safe_load((out / "runs" / "dpo" / "seed-0" / "config.yaml").read_text())["beta"] == 0.3
    dpo_run = out / "runs" / "dpo" / "seed-0"
    assert "eval/rewards/accuracies" in final_metrics(dpo_run)  # DPO's held-out metrics end its log
    assert not (dpo_run / "train_eval.json").exists()  # the study evaluates; the stage's own suite is off
    result = json.loads((out / "study.json").read_text())
    assert set(result["temperatures"]["1"]["paired"]) == {"dpo", "grpo", "ppo"}
    assert [a["max_steps"] for a in result["arms"]] == [0, 2, 1, 1]


def test_a_stopped_run_is_reported_and_the_study_goes_on(study):
    from rlhflab.training.loop import TrainingStopped

    def stopped(cfg):
        raise TrainingStopped("dpo.start_not_ln2: the log-probs are wrong", 1)

    commands = {**STUB, "broken": Command(StubConfig, stopped, "always stopped")}
    run_study(replace(study, seeds=[0], arms=[{"algorithm": "broken"}, {"algorithm": "stub"}]), commands)
    report = write_report(Path(study.out))
    result = json.loads((Path(study.out) / "study.json").read_text())
    assert list(result["shared"]["failed"]) == ["broken/seed-0"]
    assert set(result["temperatures"]["1"]["summary"]) == {"sft", "stub"}
    assert "Run broken/seed-0 stopped" in report.read_text()


def test_changed_arm_params_retrain_instead_of_reusing_the_old_run(study):
    from rlhflab.study.config import expand_arms
    from rlhflab.study.runner import is_trained

    cfg = study
    run_study(cfg, STUB)
    arm = next(a for a in expand_arms(cfg, source="test", commands=STUB) if a.algorithm != "sft")
    assert is_trained(cfg, arm, cfg.seeds[0], STUB)
    changed = replace(arm, params={**arm.params, "lr": 0.123})
    assert not is_trained(cfg, changed, cfg.seeds[0], STUB)

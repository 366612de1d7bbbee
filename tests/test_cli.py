"""The command line generated from the config dataclasses: choices, booleans, lists, --config, a bare
--resume, TRL's option names, help sections, and the positional forms of study and report."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml
from click.testing import CliRunner

from rlhflab.algorithms.dpo import DPOConfig
from rlhflab.algorithms.grpo import GRPOConfig
from rlhflab.algorithms.ppo import PPOConfig
from rlhflab.algorithms.pretrain import PretrainConfig
from rlhflab.algorithms.sft import SFTConfig
from rlhflab.cli import app, make_command, report_command, study_command
from rlhflab.config import TaskName, choices_of, field_info
from rlhflab.stages import COMMANDS
from rlhflab.study.config import StudyConfig, builtin_path
from rlhflab.study.demo import DemoConfig

ALL_CONFIGS = {**{name: c.config for name, c in COMMANDS.items()}, "demo": DemoConfig, "study": StudyConfig}
LITERAL_FIELDS = [(name, f.name, choices_of(typing.get_type_hints(cls)[f.name]))
                  for name, cls in ALL_CONFIGS.items() for f in dataclasses.fields(cls)
                  if choices_of(typing.get_type_hints(cls)[f.name]) is not None]  # fmt: skip


def parse(cls: type, args: list[str]):
    """The config `rlhflab` would build from `args` (nothing runs)."""
    parsed = []
    result = CliRunner().invoke(make_command("test", cls, parsed.append, "test"), args)
    assert result.exit_code == 0, result.output
    return parsed[0]


def test_every_literal_field_is_found():
    found = {(name, field) for name, field, _ in LITERAL_FIELDS}
    expected = {("dpo", "loss_type"), ("ppo", "kl_estimator"), ("pretrain", "preset"), ("ppo", "value_init"),
                ("grpo", "loss_agg"), ("grpo", "scale_rewards"), ("grpo", "advantage_estimator"),
                ("grpo", "importance_sampling_level"), ("rm", "pooling"), ("sft", "lr_schedule"),
                ("sft", "on_nonfinite"), ("sft", "precision"), ("eval", "task"), ("eval", "task_size"),
                ("study", "metric")}  # fmt: skip
    assert expected <= found


@pytest.mark.parametrize(("command", "field", "choices"), LITERAL_FIELDS)
def test_a_bad_choice_is_an_input_error_listing_the_choices(command, field, choices):
    result = CliRunner().invoke(app, [command, f"--{field.replace('_', '-')}", "not-a-choice", "--out", "/nonexistent"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "not-a-choice" in result.output
    for choice in choices:
        assert f"'{choice}'" in result.output, (choice, result.output)


def test_bad_choices_in_yaml_are_input_errors_too(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("kl_estimator: k4\n")
    result = CliRunner().invoke(app, ["ppo", "--config", str(file)])
    assert result.exit_code == 2 and "must be one of k1, k2, k3" in result.output and str(file) in result.output


def test_choices_are_the_registries():
    """The Literal types list exactly what the code behind them implements."""
    from rlhflab.core.kl import KL_ESTIMATORS
    from rlhflab.core.losses import DPO_LOSSES
    from rlhflab.core.policy_loss import LOSS_AGGREGATIONS
    from rlhflab.models.loading import PRESETS
    from rlhflab.tasks import TASKS

    hints = {cls: typing.get_type_hints(cls) for cls in (DPOConfig, PPOConfig, GRPOConfig, PretrainConfig)}
    loss_types = set(choices_of(hints[DPOConfig]["loss_type"]))
    assert set(DPO_LOSSES) <= loss_types <= set(DPO_LOSSES) | {"simpo", "orpo"}
    assert set(choices_of(hints[PPOConfig]["kl_estimator"])) == set(KL_ESTIMATORS)
    assert set(choices_of(hints[GRPOConfig]["loss_agg"])) == set(LOSS_AGGREGATIONS)
    assert set(choices_of(hints[PretrainConfig]["preset"])) == set(PRESETS)
    assert set(typing.get_args(TaskName)) == set(TASKS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_option_has_help_text(name):
    cls = ALL_CONFIGS[name]
    missing = [f.name for f in dataclasses.fields(cls) if not field_info(cls, f.name).get("help")]
    assert not missing, f"{name}: fields without help: {missing}"


def test_help_is_grouped_by_the_class_that_declares_each_field():
    result = CliRunner().invoke(app, ["ppo", "-h"])
    assert result.exit_code == 0
    text = result.output
    sections = ["TaskConfig (rlhflab/config.py)", "RunConfig (rlhflab/config.py)",
                "RolloutConfig (rlhflab/algorithms/rollout.py)", "PPOConfig (rlhflab/algorithms/ppo.py)"]  # fmt: skip
    assert [text.index(s) for s in sections] == sorted(text.index(s) for s in sections)
    assert text.index("--kl-estimator [k1|k2|k3]") > text.index(sections[3]) > text.index("--group-size")
    assert "--progress / --no-progress" in text and "--learning-rate" in text


def test_options_override_the_config_file_and_lists_and_booleans_parse(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"lr": 0.5, "beta": 0.2, "eval_temperatures": [0.1], "progress": True}))
    cfg = parse(DPOConfig, ["--config", str(file), "--beta", "0.3", "--eval-temperatures", "0.5,0.7",
                            "--eval-temperatures", "1", "--no-progress"])
    assert (cfg.lr, cfg.beta, cfg.eval_temperatures, cfg.progress) == (0.5, 0.3, [0.5, 0.7, 1.0], False)
    assert parse(DPOConfig, ["--eval-temperatures", ""]).eval_temperatures == []
    assert parse(DPOConfig, []) == DPOConfig()


def test_unknown_keys_and_options_suggest_the_closest(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("bach_size: 4\n")
    result = CliRunner().invoke(app, ["sft", "--config", str(file)])
    assert result.exit_code == 2 and "Did you mean 'batch_size'" in result.output and str(file) in result.output
    result = CliRunner().invoke(app, ["sft", "--bach-size", "4"])
    assert result.exit_code == 2 and "--batch-size" in result.output


def test_a_bare_resume_means_the_newest_checkpoint():
    assert parse(SFTConfig, ["--resume"]).resume == "auto"
    assert parse(SFTConfig, ["--resume", "--max-steps", "3"]).resume == "auto"
    assert parse(SFTConfig, ["--resume", "runs/x/checkpoints/step-4"]).resume == "runs/x/checkpoints/step-4"
    assert parse(SFTConfig, []).resume is None


def test_trl_option_names():
    cfg = parse(DPOConfig, ["--learning-rate", "5e-7", "--max-prompt-length", "32", "--max-length", "96",
                            "--per-device-train-batch-size", "4"])
    assert (cfg.lr, cfg.max_prompt_tokens, cfg.max_completion_tokens, cfg.batch_size) == (5e-7, 32, 64, 4)
    # TRL's GRPO batch counts completions; ours counts prompts, each sampled num_generations times
    cfg = parse(GRPOConfig, ["--per-device-train-batch-size", "32", "--num-generations", "4",
                             "--max-completion-length", "20"])
    assert (cfg.batch_size, cfg.group_size, cfg.max_new_tokens) == (8, 4, 20)
    both = CliRunner().invoke(make_command("t", DPOConfig, print, "t"), ["--lr", "1", "--learning-rate", "2"])
    assert both.exit_code == 2 and "set the same field" in both.output
    uneven = CliRunner().invoke(make_command("t", GRPOConfig, print, "t"), ["--per-device-train-batch-size", "6"])
    assert uneven.exit_code == 2 and "not a multiple of the group size 8" in uneven.output


def test_study_and_report_take_positional_paths(tmp_path):
    parsed = []
    study = study_command(run=parsed.append)
    file = tmp_path / "s.yaml"
    file.write_text(yaml.safe_dump({"name": "mine", "seeds": [3]}))
    assert CliRunner().invoke(study, [str(file), "--seeds", "0,1", "--resume"]).exit_code == 0
    assert (parsed[-1].name, parsed[-1].seeds, parsed[-1].resume) == ("mine", [0, 1], "auto")
    assert CliRunner().invoke(study, ["--builtin", "phases", "--task-size", "tiny"]).exit_code == 0
    phases = yaml.safe_load(builtin_path("phases").read_text())
    assert (parsed[-1].name, parsed[-1].task_size) == (phases["name"], "tiny")
    bad = CliRunner().invoke(study, ["--builtin", "demoo"])
    assert bad.exit_code == 2 and "no built-in study 'demoo'" in bad.output
    for twice in ([str(file), "--builtin", "phases"], [str(file), "--config", str(file)],
                  ["--builtin", "phases", "--config", str(file)]):
        result = CliRunner().invoke(study, twice)  # one would silently replace the other
        assert result.exit_code == 2 and "give the study once" in result.output, twice
    result = CliRunner().invoke(report_command(), [str(tmp_path / "missing")])
    assert result.exit_code == 2 and "folder not found" in result.output

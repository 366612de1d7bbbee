"""Study configs: typed YAML with unknown keys rejected, grids expanded into arms, built-ins valid."""

from dataclasses import dataclass

import pytest
import yaml

from rlhflab.config import RunConfig
from rlhflab.errors import InputError
from rlhflab.stages import Command
from rlhflab.study.config import ARM_COMMANDS, StudyConfig, arm_steps, builtin_path, expand_arms, load_study


@dataclass
class ToyConfig(RunConfig):
    beta: float = 0.1
    group_size: int = 4


TOY = {**ARM_COMMANDS, "toy": Command(ToyConfig, lambda cfg: None, "toy", examples_per_step=("batch_size", "group_size"))}


def write(tmp_path, values) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_grid_expands_into_named_arms_and_the_baseline_is_added(tmp_path):
    cfg = load_study(write(tmp_path, {"arms": [{"algorithm": "toy", "params": {"lr": 1e-3},
                                                 "grid": {"beta": [0.1, 0.3], "group_size": [4, 8]}}]}))  # fmt: skip
    arms = expand_arms(cfg, commands=TOY)
    assert [a.name for a in arms] == ["sft", "toy-beta0.1-group_size4", "toy-beta0.1-group_size8",
                                      "toy-beta0.3-group_size4", "toy-beta0.3-group_size8"]  # fmt: skip
    assert arms[0].algorithm == "sft"
    assert arms[4].params == {"lr": 1e-3, "beta": 0.3, "group_size": 8}


def test_unknown_keys_are_errors_in_the_study_the_arm_and_the_params(tmp_path):
    with pytest.raises(InputError, match="Did you mean 'seeds'"):
        load_study(write(tmp_path, {"seed": [0]}))
    with pytest.raises(InputError, match="arms\\[0\\].*Did you mean 'params'"):
        expand_arms(load_study(write(tmp_path, {"arms": [{"algorithm": "toy", "param": {}}]})), commands=TOY)
    with pytest.raises(InputError, match="Did you mean 'beta'"):
        expand_arms(load_study(write(tmp_path, {"arms": [{"algorithm": "toy", "params": {"betta": 1}}]})), commands=TOY)
    with pytest.raises(InputError, match="unknown algorithm 'tpo'"):
        expand_arms(load_study(write(tmp_path, {"arms": [{"algorithm": "tpo"}]})), commands=TOY)
    with pytest.raises(InputError, match="seed is set by the study"):
        expand_arms(load_study(write(tmp_path, {"arms": [{"algorithm": "toy", "params": {"seed": 3}}]})), commands=TOY)


def test_repeated_arm_names_are_errors():
    cfg = StudyConfig(arms=[{"algorithm": "toy"}, {"algorithm": "toy"}])
    with pytest.raises(InputError, match="repeated: toy"):
        expand_arms(cfg, commands=TOY)
    assert [a.name for a in expand_arms(StudyConfig(arms=[{"algorithm": "toy", "group": "a"},
                                                          {"algorithm": "toy", "group": "b"}]), commands=TOY)] == ["sft", "toy-a", "toy-b"]


def test_budgets_in_steps_or_samples():
    cfg = StudyConfig(max_steps=7, arms=[{"algorithm": "toy"}, {"algorithm": "toy", "name": "b", "max_steps": 3},
                                         {"algorithm": "toy", "name": "c", "max_samples": 100,
                                          "params": {"batch_size": 2, "group_size": 8}}])  # fmt: skip
    assert [arm_steps(a, cfg, TOY) for a in expand_arms(cfg, commands=TOY)[1:]] == [7, 3, 7]  # ceil(100 / 16)


def test_builtin_studies_load_and_validate():
    for name in ("demo", "phases", "frontier"):
        cfg = load_study(str(builtin_path(name)))
        arms = expand_arms(cfg)
        assert arms[0].name == "sft" and cfg.task == "reviews"
        assert {a.algorithm for a in arms} == {"sft", "dpo", "ppo", "grpo"}
    phases = load_study(str(builtin_path("phases")))
    assert phases.temperatures == [0.7, 0.3] and len(phases.seeds) > 1
    by_name = {a.name: a for a in expand_arms(phases)}
    assert by_name["dpo-phase1"].params["batch_size"] == 1 and by_name["dpo-tuned"].params["beta"] == 0.3
    assert by_name["grpo-tuned"].params["group_size"] == 8 and by_name["ppo-phase1"].params["kl_coef"] == 0.01
    with pytest.raises(InputError, match="no built-in study 'demoo'"):
        builtin_path("demoo")


def test_builtin_study_with_overrides():
    cfg = load_study(str(builtin_path("demo")), {"seeds": "0,1", "task_size": "tiny"})
    assert cfg.seeds == [0, 1] and cfg.task_size == "tiny"

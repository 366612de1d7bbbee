"""Evaluation and studies on your own model (issue 13, item 7): a reward function (`--reward-fn`, TRL's conventions)
is the gold column of `eval`, of a study without a task and of a PPO/GRPO run's end-of-run evaluation.

Each test recomputes the gold values by hand from the decoded samples that eval.json keeps (two samples per prompt,
all of them kept as examples) and the prompt file's `letter` field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import tiny_lm, tiny_tokenizer

from rlhflab.cli import app
from rlhflab.report.document import write_report
from rlhflab.study.config import StudyConfig
from rlhflab.study.runner import run_study

runner = CliRunner()
RECORDS = [{"prompt": "a b", "letter": "a"}, {"prompt": "c d e", "letter": "c"}, {"prompt": "f g", "letter": "f"},
           {"prompt": "h a", "letter": "h"}]  # fmt: skip
REWARD_FILE = """
def letter_count(completions, letter, **kwargs):  # TRL's convention: the prompt file's fields by name
    return [float(c.count(x)) for c, x in zip(completions, letter)]

def words(prompts, completions):  # by position
    return [float(len(c.split())) for c in completions]
"""


def expected_gold(record: dict, text: str, length_weight: float = 0.0) -> float:
    """The reward functions above, written again: occurrences of the prompt's letter (+ weight × words)."""
    return sum(ch == record["letter"] for ch in text) + length_weight * len(text.split())


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> dict[str, str]:
    """A user's model folder, prompt file (with a `letter` field) and reward function file."""
    root = tmp_path_factory.mktemp("own")
    tokenizer = tiny_tokenizer()
    tiny_lm(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (root / "reward.py").write_text(REWARD_FILE)
    return {"model": str(root / "model"), "prompts": str(root / "prompts.jsonl"), "reward": str(root / "reward.py")}


def assert_gold_recomputed(results: dict, length_weight: float = 0.0) -> list[float]:
    """Every gold value of eval.json equals the reward recomputed from the kept samples; returns them all."""
    values = []
    for block in results["temperatures"].values():
        for record, prompt in zip(RECORDS, block["per_prompt"], strict=True):
            assert prompt["prompt"] == record["prompt"] and len(prompt["examples"]) == results["samples_per_prompt"]
            assert prompt["values"]["gold"] == pytest.approx(
                [expected_gold(record, text, length_weight) for text in prompt["examples"]])
            values += prompt["values"]["gold"]
    return values


def test_eval_takes_a_reward_function_as_the_gold_column(own, tmp_path):
    args = ["eval", "--model", own["model"], "--data", own["prompts"], "--temperatures", "1.0",
            "--samples-per-prompt", "2", "--max-new-tokens", "8", "--no-progress", "--threads", "1"]
    result = runner.invoke(app, [*args, "--reward-fn", f"{own['reward']}:letter_count", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert results["gold"] == "reward function reward.py:letter_count"
    values = assert_gold_recomputed(results)
    assert len(set(values)) > 1  # the samples differ in what they score: the check is not vacuous
    assert "gold" in results["temperatures"]["1"]["aggregate"]

    weighted = [*args, "--reward-fn", f"{own['reward']}:letter_count,{own['reward']}:words", "--reward-weights",
                "1,0.5", "--out", str(tmp_path / "b")]  # several functions: their weighted sum
    assert runner.invoke(app, weighted).exit_code == 0
    assert_gold_recomputed(json.loads((tmp_path / "b" / "eval.json").read_text()), length_weight=0.5)

    bad = runner.invoke(app, [*args, "--reward-fn", f"{own['reward']}:nothing", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "letter_count" in bad.output  # names what the file has, before any sampling


def test_grpo_without_a_task_ends_with_its_reward_function_as_gold(own, tmp_path):
    result = runner.invoke(app, [
        "grpo", "--model", own["model"], "--data", own["prompts"], "--reward-fn", f"{own['reward']}:letter_count",
        "--eval-prompts", own["prompts"], "--eval-temperatures", "1.0", "--eval-samples-per-prompt", "2",
        "--max-steps", "1", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6", "--out",
        str(tmp_path / "run"), "--no-progress", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["gold"] == "reward function reward.py:letter_count"
    assert_gold_recomputed(results)


def test_a_study_of_your_own_model_data_and_reward_function(own, tmp_path):
    cfg = StudyConfig(
        name="own", out=str(tmp_path / "study"), task=None, model=own["model"], prompt_data=own["prompts"],
        eval_prompts=own["prompts"], reward_fn=f"{own['reward']}:letter_count", seeds=[0], temperatures=[1.0],
        samples_per_prompt=2, max_new_tokens=6, bootstrap_resamples=100, threads=1, progress=False,
        arms=[{"algorithm": "grpo", "max_steps": 1, "params": {"batch_size": 2, "group_size": 2}}],
    )  # fmt: skip
    study = json.loads(run_study(cfg).read_text())
    assert study["gold"] == "reward function reward.py:letter_count" and study["metric"] == "gold"
    block = study["temperatures"]["1"]
    assert set(block["summary"]) == {"sft", "grpo"} and all("gold" in s for s in block["summary"].values())
    assert "gold" in block["paired"]["grpo"]  # the head-to-head: paired against the untrained model
    assert {e["arm"] for e in block["ranking"]["all"]} == {"sft", "grpo"}  # ranked by the reward function
    for arm in ("sft", "grpo"):
        assert_gold_recomputed(json.loads((Path(cfg.out) / "runs" / arm / "seed-0" / "eval.json").read_text()))
    write_report(Path(cfg.out))
    report = (Path(cfg.out) / "report.md").read_text()
    assert "gold: reward.py:letter_count" in report and "Gold reward: reward function reward.py:letter_count" in report

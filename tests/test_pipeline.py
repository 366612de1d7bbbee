"""Task artefacts and the CLI, end to end on the tiny preset."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhflab.cli import app
from rlhflab.stages.artefacts import preference_pairs, reward_model, sft_model
from rlhflab.tasks import get_task

runner = CliRunner()
# the module that builds and caches the --task artefacts; its trainers are replaced to prove a cache hit trains nothing
ARTEFACTS_MODULE = "rlhflab.stages.artefacts"


def test_artefacts_load_into_transformers(tiny_artefacts):
    a = tiny_artefacts("reviews")
    policy = AutoModelForCausalLM.from_pretrained(sft_model(a))
    scorer = AutoModelForSequenceClassification.from_pretrained(reward_model(a))
    assert policy.config.architectures == ["LlamaForCausalLM"]
    assert scorer.score.weight.abs().sum() > 0  # the reward head was trained and saved
    task = get_task("reviews")
    rows = [json.loads(line) for line in preference_pairs(a).read_text().splitlines()]
    assert len(rows) > 50
    chosen = task.gold_reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = task.gold_reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))


def _trains_nothing(*args, **kwargs):
    raise AssertionError("an artefact was trained again instead of being reused from the cache")


def test_a_second_request_reuses_the_cache_and_trains_nothing(tiny_artefacts, tmp_path, monkeypatch):
    """A cached artefact is reused: with every trainer of the artefact module replaced, asking again returns
    the same folder, untouched. The replaced trainer is shown to be the one the module calls: in a cache
    holding only the base model, the SFT model is built by it, once."""
    import importlib

    module = importlib.import_module(ARTEFACTS_MODULE)
    a = tiny_artefacts("reviews")
    folder = sft_model(a).parent
    before = {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}
    for trainer in ("run_pretrain", "run_sft", "run_reward_model"):
        monkeypatch.setattr(module, trainer, _trains_nothing)
    assert module.sft_model(a) == sft_model(a) == folder / "model"
    assert module.reward_model(a).is_dir()  # the whole chain: base, SFT, pairs, reward model
    assert {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]} == before

    built: list[str] = []

    def fake_sft(cfg, model, tokenizer, examples):
        built.append(cfg.out)
        (Path(cfg.out) / "model").mkdir()
        return Path(cfg.out) / "model"

    monkeypatch.setattr(module, "run_sft", fake_sft)
    fresh = dataclasses.replace(a, cache_dir=str(tmp_path / "cache"))
    base = module.base_model(a).parent
    shutil.copytree(base, fresh.root() / base.name)  # the base model only: SFT must be built
    first = module.sft_model(fresh)
    assert len(built) == 1 and module.sft_model(fresh) == first and len(built) == 1


def test_eval_command_writes_intervals(tiny_artefacts, tmp_path):
    a = tiny_artefacts("reviews")
    sft_model(a), reward_model(a)
    result = runner.invoke(app, ["eval", "--task", "reviews", "--task-size", "tiny", "--cache-dir", a.cache_dir,
                                 "--out", str(tmp_path), "--samples-per-prompt", "2", "--temperatures", "1.0",
                                 "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "eval.json").read_text())
    block = results["temperatures"]["1"]
    assert len(block["per_prompt"]) == 16
    agg = block["aggregate"]
    # the policy is its own reference here: every sampled log-ratio is exactly zero
    assert agg["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    # the aggregate gold mean is the mean of the per-sample values, and lies inside its interval
    values = np.array([p["values"]["gold"] for p in block["per_prompt"]])
    assert agg["gold"]["mean"] == pytest.approx(values.mean())
    assert agg["gold"]["ci_low"] <= agg["gold"]["mean"] <= agg["gold"]["ci_high"]
    # gold values agree with an independent re-scoring of the kept examples
    task = get_task("reviews")
    first = block["per_prompt"][0]
    assert first["values"]["gold"][: len(first["examples"])] == pytest.approx(
        task.gold_reward([first["prompt"]] * len(first["examples"]), first["examples"]))


def test_cli_reports_bad_data_with_location(tmp_path, tiny_artefacts):
    a = tiny_artefacts("reviews")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": 3, "rejected": " c"}\n')
    result = runner.invoke(app, ["rm", "--model", str(sft_model(a)), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "line 2" in result.output and "chosen" in result.output and str(bad) in result.output


def test_grpo_reward_fn_reads_a_field_of_the_prompt_file(tmp_path, tiny_artefacts):
    """`rlhflab grpo --data prompts.jsonl --reward-fn FILE:NAME,FILE:NAME --reward-weights ...`: the records' other
    fields reach the reward functions by name, row by row (TRL's convention), here an `answer`; the reward is the
    weighted sum of the functions'."""
    a = tiny_artefacts("reviews")
    records = [{"prompt": f"i bought this lamp {i}", "answer": str(i)} for i in range(4)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    log = tmp_path / "seen.jsonl"
    (tmp_path / "reward.py").write_text(
        "import json\n"
        "def answer_check(completions, answer, prompts, **kwargs):\n"
        f"    open({str(log)!r}, 'a').write(json.dumps([prompts, answer]) + '\\n')\n"
        "    return [float(len(c) % 2) for c in completions]\n"
        "def length(completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    reward = tmp_path / "reward.py"
    result = runner.invoke(app, ["grpo", "--model", str(sft_model(a)), "--data", str(data), "--reward-fn",
                                 f"{reward}:answer_check,{reward}:length", "--reward-weights", "1,0.25",
                                 "--out", str(tmp_path / "run"),
                                 "--max-steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4",
                                 "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2
    for prompts, answers in calls:  # 2 prompts × 2 completions a step: each row carries its prompt's answer
        assert len(answers) == 4 and answers == [p.rsplit(" ", 1)[1] for p in prompts]
    for row in (json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()):
        weighted = row["rewards/answer_check/mean"] + 0.25 * row["rewards/length/mean"]
        assert row["reward"] == pytest.approx(weighted, rel=1e-6)  # the reward is the weighted sum


def test_cli_unknown_option_suggests():
    result = runner.invoke(app, ["sft", "--bach-size", "4"])
    assert result.exit_code == 2
    assert "--batch-size" in result.output


def test_sft_stops_on_mask_mismatch(tmp_path):
    from rlhflab.algorithms.sft import SFTConfig, SFTRecipe
    from rlhflab.data.collate import TokenizedExample
    from rlhflab.training.loop import TrainingStopped

    model = torch.nn.Linear(1, 1)
    # a response token at position 0 cannot be predicted: the shifted mask counts one token fewer
    examples = [TokenizedExample(prompt_ids=[], completion_ids=[5, 6, 2])]
    recipe = SFTRecipe(model, examples, SFTConfig(out=str(tmp_path), batch_size=1), pad_token_id=0)
    with pytest.raises(TrainingStopped, match="mask"):
        recipe.plan_step(0)
    finding = json.loads((tmp_path / "diagnostics.jsonl").read_text().splitlines()[0])
    assert finding["code"] == "logps.mask_mismatch"

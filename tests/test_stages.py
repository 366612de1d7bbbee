"""Every policy-training command ends the same way: the final model, then the shared evaluation suite on the
evaluation prompts (a task's, or --eval-prompts FILE) when --eval-temperatures is not empty; the stage does it,
not the algorithm. And one cache root for every artefact."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from rlhflab.cli import app
from rlhflab.stages.artefacts import base_model, cache_root, reference_logps_dir, sft_model
from rlhflab.tasks import get_task

QUICK = ["--max-steps", "1", "--batch-size", "2", "--threads", "1", "--no-progress", "--eval-samples-per-prompt", "1"]


def run(*args: str) -> None:
    result = CliRunner().invoke(app, [*args, *QUICK])
    assert result.exit_code == 0, result.output


def test_sft_with_a_task_ends_with_the_suite_on_its_prompts(tiny_artefacts, tmp_path):
    a = tiny_artefacts("reviews")
    out = tmp_path / "sft"
    run("sft", "--task", "reviews", "--model", str(base_model(a)), "--num-examples", "8", "--out", str(out),
        "--eval-temperatures", "1.0")
    results = json.loads((out / "eval.json").read_text())
    assert results["model"] == str(out / "model") and list(results["temperatures"]) == ["1"]
    per_prompt = results["temperatures"]["1"]["per_prompt"]
    assert [p["prompt"] for p in per_prompt] == get_task("reviews").eval_prompts()
    assert "gold" in per_prompt[0]["values"] and "rm_score" not in per_prompt[0]["values"]  # no RM built for it
    skipped = tmp_path / "no-eval"
    run("sft", "--task", "reviews", "--model", str(base_model(a)), "--num-examples", "8", "--out", str(skipped),
        "--eval-temperatures", "")
    assert (skipped / "model").is_dir() and not (skipped / "eval.json").exists()


def test_dpo_evaluates_on_an_eval_prompt_file_and_not_without_prompts(tiny_artefacts, tmp_path):
    a = tiny_artefacts("reviews")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"the lamp {i}", "chosen": " is great", "rejected": " is bad"}) + "\n"
                             for i in range(6)))  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the lamp", "this film")))
    common = ["dpo", "--model", str(sft_model(a)), "--data", str(pairs), "--cache-dir", a.cache_dir]
    out = tmp_path / "with-prompts"
    run(*common, "--out", str(out), "--eval-prompts", str(prompts), "--eval-temperatures", "0.5,1")
    results = json.loads((out / "eval.json").read_text())
    assert list(results["temperatures"]) == ["0.5", "1"] and results["num_prompts"] == 2
    assert [p["prompt"] for p in results["temperatures"]["1"]["per_prompt"]] == ["the lamp", "this film"]
    bare = tmp_path / "no-prompts"
    run(*common, "--out", str(bare))  # no task and no --eval-prompts: nothing to evaluate on
    assert (bare / "model").is_dir() and not (bare / "eval.json").exists()


def test_one_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHFLAB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" and cache_root(str(tmp_path / "flag")) == tmp_path / "flag"
    assert reference_logps_dir(str(tmp_path)) == tmp_path / "reference-logps"
    monkeypatch.delenv("RLHFLAB_CACHE")
    assert cache_root() == Path.home() / ".cache" / "rlhflab"

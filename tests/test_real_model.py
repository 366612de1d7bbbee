"""Every command on a real pretrained chat model: SmolLM2-135M-Instruct (`--model smollm2-135m-instruct`).

Slow (`-m slow`, `make test-real`) and skipped unless the `real` extra is installed (`make setup-real`). The model is
converted once per session into a temporary cache (`real_model_cache`, what `--model NAME` does on a user's
first run), then each
command runs a few steps on the chat data in tests/data/ with short budgets and one thread. Wall times on the
2-core development machine are in docs/notes.md ("The real model in the tests").
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import needs_real_model
from test_resume import SimulatedKill, assert_same_run, run_cli  # the in-process kill/resume machinery
from transformers import AutoModelForCausalLM

from rlhflab.data.collate import (
    collate_sequences,
    template_end_token,
    tokenize_prompt,
    tokenize_prompt_completion,
)
from rlhflab.models.loading import decode_completion, load_tokenizer, stop_token_ids
from rlhflab.training.hooks import installed
from rlhflab.training.metrics import read_metrics

NAME = "smollm2-135m-instruct"
DATA = Path(__file__).parent / "data"
IM_END, NEWLINE = "<|im_end|>", "\n"

pytestmark = [
    pytest.mark.slow,
    needs_real_model(),
]


@pytest.fixture(scope="module")
def cache(real_model_cache) -> Path:
    """The cache with the converted model (tests/conftest.py); commands name the model and this --cache-dir."""
    return real_model_cache


@pytest.fixture(scope="module")
def folder(cache) -> Path:
    return cache / "models" / NAME


def rlhflab(cache: Path, out: Path, *args: str, fault: str | None = None) -> list[dict]:
    """`rlhflab ARGS --model smollm2-135m-instruct` in this process; returns its metrics lines."""
    common = ["--model", NAME, "--cache-dir", str(cache), "--out", str(out), "--threads", "1", "--no-progress"]
    if args[0] != "eval":
        common += ["--seed", "1", "--eval-temperatures", ""]
    if fault is None:
        result = run_cli([*args, *common])
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        from fault_launcher import Faults

        with installed(Faults(fault, kill=_raise_kill)), pytest.raises(SimulatedKill):
            run_cli([*args, *common])
    return read_metrics(out) if (out / "metrics.jsonl").exists() else []


def _raise_kill() -> None:
    raise SimulatedKill


def test_conversion_gives_a_plain_chatml_model(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and len(tokenizer) == 49_152
    assert not hasattr(model.config, "quantization_config")  # a normal folder, not a GGUF-marked one
    assert tokenizer.convert_ids_to_tokens(template_end_token(tokenizer)) == IM_END == tokenizer.eos_token
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]  # ChatML: EOS, end of turn and eos ids agree


def test_chatml_turn_ends_alike_when_collated_and_sampled(folder):
    """The collator keeps <|im_end|> and drops the template's newline after it; greedy decoding of the same
    prompt ends with the same token, so the sampled and collated completions have the same shape at the end."""
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = [{"role": "system", "content": "Answer in one short sentence."},
              {"role": "user", "content": "What is the capital of France?"}]
    answer = [{"role": "assistant", "content": "The capital of France is Paris."}]
    example = tokenize_prompt_completion(tokenizer, prompt, answer, None, None)
    rendered = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    assert rendered.endswith(IM_END + NEWLINE)
    assert example.prompt_ids + example.completion_ids == tokenizer.encode(rendered[: -len(NEWLINE)])
    assert tokenizer.convert_ids_to_tokens(example.completion_ids[-1]) == IM_END
    batch = collate_sequences([example], tokenizer.pad_token_id)
    assert batch["input_ids"][0][batch["response_mask"][0].bool()][-1] == tokenizer.eos_token_id  # in the log-probs

    from rlhflab.core.sampling import sample

    ids = tokenize_prompt(tokenizer, prompt, None).prompt_ids
    assert ids == example.prompt_ids
    samples = sample(model, [ids], max_new_tokens=32, temperature=0, stop_token_ids=stop_token_ids(tokenizer),
                     pad_token_id=tokenizer.pad_token_id)
    [completion] = samples.completions()
    assert not samples.truncated.any() and tokenizer.convert_ids_to_tokens(completion[-1]) == IM_END
    assert "Paris" in decode_completion(tokenizer, completion, stop_token_ids(tokenizer))


LORA = ["--lora-r", "8"]  # adapters on q, k, v, o, gate, up, down (the default targets)
SFT = ["sft", "--data", str(DATA / "chat_sft.jsonl"), "--max-steps", "2", "--batch-size", "2",
       "--max-prompt-tokens", "64", "--max-completion-tokens", "32"]


def test_sft_on_messages(cache, tmp_path):
    metrics = rlhflab(cache, tmp_path, *SFT)
    assert [row["step"] for row in metrics] == [0, 1] and all(math.isfinite(row["loss"]) for row in metrics)
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_sft_with_lora_resumes_exactly(cache, tmp_path):
    """Killed after step 0 and resumed: the same metrics and the same adapter as the uninterrupted run."""
    args = [*SFT, *LORA, "--checkpoint-every", "1", "--merge-lora"]
    rlhflab(cache, tmp_path / "straight", *args)
    rlhflab(cache, tmp_path / "resumed", *args, fault="kill@0")
    rlhflab(cache, tmp_path / "resumed", *args, "--resume")
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    assert (tmp_path / "straight" / "model" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model_merged")  # plain transformers
    assert sum(p.numel() for p in merged.parameters()) == 134_515_008


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_on_conversational_pairs_starts_at_ln2(cache, tmp_path, lora):
    metrics = rlhflab(cache, tmp_path, "dpo", "--data", str(DATA / "chat_pairs.jsonl"), "--max-steps", "2",
                      "--batch-size", "2", "--max-prompt-tokens", "64", "--max-completion-tokens", "32",
                      "--eval-fraction", "0", *(LORA if lora else []))
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    saved = "adapter_model.safetensors" if lora else "model.safetensors"
    assert math.isfinite(metrics[-1]["loss"]) and (tmp_path / "model" / saved).is_file()


def test_reward_model_on_conversational_pairs(cache, tmp_path):
    metrics = rlhflab(cache, tmp_path, "rm", "--data", str(DATA / "chat_pairs.jsonl"), "--max-steps", "1",
                      "--batch-size", "2", "--max-prompt-tokens", "64", "--max-completion-tokens", "32")
    assert math.isfinite(metrics[0]["loss"])


@pytest.mark.parametrize("algorithm, lora", [("grpo", False), ("grpo", True), ("ppo", True)])
def test_rl_on_chat_prompts_with_a_reward_function(cache, tmp_path, algorithm, lora):
    max_new = 12
    metrics = rlhflab(cache, tmp_path, algorithm, "--data", str(DATA / "chat_prompts.jsonl"),
                      "--reward-fn", f"{DATA / 'chat_reward.py'}:contains_answer", "--max-steps", "1",
                      "--batch-size", "1", "--group-size", "2", "--max-new-tokens", str(max_new),
                      *(LORA if lora else []))
    assert math.isfinite(metrics[0]["loss"]) and 0 < metrics[0]["completions/mean_length"] <= max_new
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["max_prompt_tokens"] == 512  # a real model's budget when --model is not a built-in task


def test_eval_on_chat_prompts(cache, tmp_path):
    rlhflab(cache, tmp_path, "eval", "--data", str(DATA / "chat_prompts.jsonl"), "--reference", NAME,
            "--temperatures", "0.7", "--samples-per-prompt", "2", "--max-new-tokens", "12",
            "--reward-fn", f"{DATA / 'chat_reward.py'}:contains_answer")
    results = json.loads((tmp_path / "eval.json").read_text())
    aggregate = results["temperatures"]["0.7"]["aggregate"]
    assert aggregate["kl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # the model against itself
    assert 0 < aggregate["length"]["mean"] <= 12
    assert results["gold"] == "reward function chat_reward.py:contains_answer" and 0 <= aggregate["gold"]["mean"] <= 1

"""DPO end to end on a tiny Llama: packed log-probs, step-0 ln 2, cached reference, run folder, resume."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhflab.algorithms.dpo import (
    DPOConfig,
    DPORecipe,
    pack_pairs,
    pair_logps,
    reference_cache_dirs,
    run_dpo,
)
from rlhflab.core.logprobs import sequence_logps
from rlhflab.data.collate import collate_preference_pairs, tokenize_preference
from rlhflab.data.loading import from_records
from rlhflab.diagnostics.findings import read_findings
from rlhflab.models.tokenizer import train_tokenizer
from rlhflab.stages.artefacts import reference_logps_dir
from rlhflab.tasks.reviews import ReviewsTask
from rlhflab.training.loop import train
from rlhflab.training.metrics import read_metrics
from rlhflab.training.precision import freeze, mixed_precision

TRL_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
TRL_NAMES += ["logps/chosen", "logps/rejected", "grad_norm", "lr", "num_tokens", "tokens_per_second"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(ReviewsTask().pretrain_corpus(400, seed=0), vocab_size=200)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    examples = from_records(ReviewsTask().constructed_pairs(48, seed=0), "preference")
    return [tokenize_preference(tokenizer, ex, 64, 64) for ex in examples]


def tiny_model(tokenizer, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def cfg_for(tmp_path: Path, **kw) -> DPOConfig:
    base = DPOConfig(
        out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), max_steps=6, batch_size=8, lr=1e-3,
        progress=False, eval_fraction=0.1, eval_every=3, max_row_tokens=96, threads=1,
    )  # fmt: skip
    return replace(base, **kw)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pair_logps_equal_padded_forward(tokenizer, pairs, attn):
    model = tiny_model(tokenizer, attn).eval()
    batch = pairs[:10]
    with torch.no_grad():
        chosen, rejected = pair_logps(model, pack_pairs(batch, 96, tokenizer.pad_token_id))
        padded = collate_preference_pairs(batch, tokenizer.pad_token_id)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        expected = sequence_logps(logits, padded["input_ids"], padded["response_mask"])  # [2B]
    torch.testing.assert_close(chosen, expected[:10], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(rejected, expected[10:], atol=1e-5, rtol=1e-6)


def _recipe(tokenizer, pairs, cfg, calls: list | None = None) -> DPORecipe:
    model = tiny_model(tokenizer)
    frozen = copy.deepcopy(model)

    def load_reference():
        if calls is not None:
            calls.append(1)
        return copy.deepcopy(frozen)

    dirs = reference_cache_dirs(cfg, Path(cfg.out), reference_logps_dir(cfg.cache_dir))
    return DPORecipe(model, pairs[:40], cfg, tokenizer.pad_token_id, load_reference, pairs[40:], dirs)


def test_step0_loss_is_ln2_exactly(tokenizer, pairs, tmp_path):
    recipe = _recipe(tokenizer, pairs, cfg_for(tmp_path))
    plan = recipe.plan_step(0)
    numerator, metrics = recipe.loss(plan.updates[0][0])
    assert abs(numerator.item() / 8 - math.log(2)) < 1e-6
    assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert plan.metrics["eval/rewards/accuracies"] == 0.0


def test_cached_reference_equals_live_and_is_freed(tokenizer, pairs, tmp_path):
    # 40 train pairs, 8 a step: epoch 1 is steps 0-4, epoch 2 reuses the cache.
    cached_cfg = cfg_for(tmp_path / "cached", max_steps=10)
    calls: list = []
    cached = _recipe(tokenizer, pairs, cached_cfg, calls)
    train(cached_cfg, cached)
    live_cfg = cfg_for(tmp_path / "live", max_steps=10, live_reference=True)
    live = _recipe(tokenizer, pairs, live_cfg)
    train(live_cfg, live)
    a, b = read_metrics(Path(cached_cfg.out)), read_metrics(Path(live_cfg.out))
    # epoch 1 packs the reference's pairs exactly as the policy's: bit-for-bit equal. Epoch 2 reshuffles,
    # so a live reference sees other row layouts (other float rounding): equal to float32 precision.
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [r[key] for r in a[:5]] == [r[key] for r in b[:5]]
        torch.testing.assert_close([r[key] for r in a], [r[key] for r in b], rtol=1e-5, atol=1e-6)
    assert calls == [1] and cached.reference is None and cached._load_reference is None
    assert live.reference is not None
    # a second run with the same reference weights and data never loads the reference
    again_calls: list = []
    again_cfg = cfg_for(tmp_path / "again", max_steps=10, cache_dir=cached_cfg.cache_dir)
    again = _recipe(tokenizer, pairs, again_cfg, again_calls)
    train(again_cfg, again)
    assert again_calls == []
    assert [r["loss"] for r in read_metrics(Path(again_cfg.out))] == [r["loss"] for r in a]


def test_run_writes_run_folder(tokenizer, pairs, tmp_path):
    cfg = cfg_for(tmp_path)
    model = tiny_model(tokenizer)
    frozen = copy.deepcopy(model)
    path = run_dpo(cfg, model, tokenizer, pairs, lambda: copy.deepcopy(frozen))
    out = Path(cfg.out)
    assert (out / "config.yaml").exists() and not (out / "eval.json").exists()  # the stage evaluates, not DPO
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]  # 6 training steps + the final evaluation
    for name in TRL_NAMES:
        assert name in rows[0], name
    assert "eval/rewards/accuracies" in rows[0] and "eval/rewards/accuracies" in rows[-1]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    findings = read_findings(out / "diagnostics.jsonl")
    assert [(f.code, f.severity) for f in findings][:1] == [("dpo.start_not_ln2", "info")]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for p, q in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    assert json.loads(
        (out / f"reference-logps-{next(iter(out.glob('reference-logps-*'))).stem[16:]}.json").read_text()
    )


class Killed(Exception):
    pass


def test_resume_gives_identical_metrics(tokenizer, pairs, tmp_path):
    straight_cfg = cfg_for(tmp_path / "straight", max_steps=8)
    train(straight_cfg, _recipe(tokenizer, pairs, straight_cfg))
    cut_cfg = cfg_for(tmp_path / "cut", max_steps=8, checkpoint_every=2)
    killed = _recipe(tokenizer, pairs, cut_cfg)
    plan_step = killed.plan_step

    def crash_at_3(step):
        if step == 3:
            raise Killed
        return plan_step(step)

    killed.plan_step = crash_at_3
    with pytest.raises(Killed):
        train(cut_cfg, killed)
    calls: list = []
    resumed = _recipe(tokenizer, pairs, replace(cut_cfg, resume="auto"), calls)
    train(replace(cut_cfg, resume="auto"), resumed)
    volatile = {"time", "tokens_per_second"}
    a = [{k: v for k, v in r.items() if k not in volatile} for r in read_metrics(Path(straight_cfg.out))]
    b = [{k: v for k, v in r.items() if k not in volatile} for r in read_metrics(Path(cut_cfg.out))]
    assert a == b
    assert calls == [1]  # the checkpoint at step 2 holds pairs of steps 0-1; steps 2-4 load the reference


def test_step0_accuracy_is_zero_with_reference_cached_from_other_batches(tokenizer, pairs, tmp_path):
    recipe = _recipe(tokenizer, pairs, cfg_for(tmp_path, batch_size=1, eval_every=0))
    # cache every pair from one big packed batch: another row layout than batch 1's, other rounding
    recipe.reference_logps(recipe.keys, pack_pairs(recipe.pairs, 1024, tokenizer.pad_token_id))
    for step in range(6):  # no optimizer step: the policy is still the reference
        _, metrics = recipe.loss(recipe.plan_step(step).updates[0][0])
        assert metrics["rewards/accuracies"] == 0.0
        assert abs(metrics["dpo_loss"] - math.log(2)) < 1e-6 and abs(metrics["rewards/margins"]) < 1e-6


def test_bf16_step0_is_ln2_and_reference_cached_apart(tokenizer, pairs, tmp_path):
    """bf16 autocast: step 0 is still exactly ln 2 (reference and policy see the same packed rows);
    a reference cached from other row layouts stays inside LOGP_NOISE["bf16"] (accuracy 0, loss ≈ ln 2);
    bf16 and fp32 runs of one reference never read each other's cache."""
    cfg = cfg_for(tmp_path, batch_size=1, eval_every=0, precision="bf16")
    recipe = _recipe(tokenizer, pairs, cfg)
    with mixed_precision("bf16", recipe.model):
        _, metrics = recipe.loss(recipe.plan_step(0).updates[0][0])
        assert metrics["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["rewards/margins"] == 0.0
        recipe.reference_logps(recipe.keys, pack_pairs(recipe.pairs, 1024, tokenizer.pad_token_id))
        for step in range(1, 8):  # no optimizer step: the policy is still the reference
            _, metrics = recipe.loss(recipe.plan_step(step).updates[0][0])
            assert metrics["rewards/accuracies"] == 0.0
            assert abs(metrics["dpo_loss"] - math.log(2)) < 1e-3
    recipe.cache.flush()
    fp32 = _recipe(tokenizer, pairs, replace(cfg, precision="fp32"))
    assert fp32.cache.fingerprint != recipe.cache.fingerprint and len(fp32.cache) == 0
    assert len(_recipe(tokenizer, pairs, cfg).cache) == len(recipe.pairs)  # same precision: shared


def test_frozen_bf16_reference_equals_autocast_bit_for_bit(tokenizer, pairs):
    """freeze(bf16) stores Linear weights as autocast would round them: same log-probs, no per-forward cast."""
    model = tiny_model(tokenizer)
    packed = pack_pairs(pairs[:8], 96, tokenizer.pad_token_id)
    frozen = freeze(copy.deepcopy(model), "bf16")
    assert frozen.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert frozen.model.embed_tokens.weight.dtype == torch.float32  # and lm_head, tied to it
    assert frozen.lm_head.weight is frozen.model.embed_tokens.weight
    with torch.no_grad(), mixed_precision("bf16", model):
        expected, got = pair_logps(model, packed), pair_logps(frozen, packed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

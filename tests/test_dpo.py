"""DPO end to end on a tiny Llama: packed log-probs, step-0 ln 2, cached reference, run folder, resume."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    assert_stops_on_mask_mismatch,
    forget_the_label_shift,
    task_tokenizer,
    tiny_lm,
    without_timing,
)
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from rlhflab.algorithms.dpo import (
    DPOConfig,
    DPORecipe,
    pair_logps,
    reference_cache_dirs,
    run_dpo,
)
from rlhflab.core.logprobs import sequence_logps
from rlhflab.core.losses import orpo_loss, simpo_loss
from rlhflab.data.collate import collate_sequences, pack_pairs, tokenize_preference
from rlhflab.data.loading import from_records
from rlhflab.diagnostics.findings import read_findings
from rlhflab.stages.artefacts import reference_logps_dir
from rlhflab.tasks.reviews import ReviewsTask
from rlhflab.training.data_order import EpochSampler
from rlhflab.training.loop import train
from rlhflab.training.metrics import read_metrics
from rlhflab.training.precision import freeze, mixed_precision

# the recipe's and the loop's step metrics (num_tokens and perf/tokens_per_second are the loop's: tests/test_training.py)
TRL_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
TRL_NAMES += ["logps/chosen", "logps/rejected", "grad_norm", "lr"]


@pytest.fixture(scope="module")
def tokenizer():
    return task_tokenizer(("reviews",), documents=400, vocab_size=200)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    examples = from_records(ReviewsTask().constructed_pairs(48, seed=0), "preference")
    return [tokenize_preference(tokenizer, ex, 64, 64) for ex in examples]


def tiny_model(tokenizer, attn: str = "sdpa") -> LlamaForCausalLM:
    return tiny_lm(tokenizer, num_attention_heads=4, num_key_value_heads=4, attn_implementation=attn)


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
        chosen, rejected = pair_logps(model, pack_pairs(batch, 96, tokenizer.pad_token_id, trim_final_tokens=True))
        padded = collate_sequences([c for c, _ in batch] + [r for _, r in batch], tokenizer.pad_token_id)
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
    held_out = recipe.evaluate()
    assert held_out["eval/rewards/accuracies"] == 0.0 and abs(held_out["eval/loss"] - math.log(2)) < 1e-6


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
    shared = tmp_path / "cache" / "reference-logps"
    path = run_dpo(cfg, model, tokenizer, pairs, lambda: copy.deepcopy(frozen), shared_reference_cache=shared)
    out = Path(cfg.out)
    assert (out / "config.yaml").exists() and not (out / "eval.json").exists()  # the stage evaluates, not DPO
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]  # no line appended after the loop's
    for name in TRL_NAMES:
        assert name in rows[0], name
    assert "eval/rewards/accuracies" in rows[0] and "eval/rewards/accuracies" in rows[-1]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    findings = read_findings(out / "diagnostics.jsonl")
    assert [(f.code, f.severity) for f in findings][:1] == [("dpo.start_not_ln2", "info")]
    assert "logps.mask_mismatch" in findings[0].message  # it says which check covers a shared shift bug
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for p, q in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    for folder in (out, shared):  # the run's cache (resume) and the one shared by runs of this reference
        assert json.loads(next(folder.glob("reference-logps-*.json")).read_text())


def padded_logps(model, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(y_c|x), log π(y_r|x) from one right-padded forward of each sequence: the unpacked reference."""
    padded = collate_sequences([c for c, _ in batch] + [r for _, r in batch], 0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    logps = sequence_logps(logits, padded["input_ids"], padded["response_mask"])  # [2B]
    return logps[: len(batch)], logps[len(batch) :]


def test_evaluate_equals_the_dpo_loss_of_padded_forwards(tokenizer, pairs, tmp_path):
    """The held-out metrics the loop logs (`evaluate()`), after training, against sigmoid DPO written out on
    unpacked forwards of the trained policy and the reference."""
    cfg = cfg_for(tmp_path, max_steps=4)
    recipe = _recipe(tokenizer, pairs, cfg)
    reference = copy.deepcopy(recipe.model).eval()
    train(cfg, recipe)
    got = recipe.evaluate()
    policy_c, policy_r = padded_logps(recipe.model.eval(), recipe.eval_pairs)
    ref_c, ref_r = padded_logps(reference, recipe.eval_pairs)
    margin = cfg.beta * ((policy_c - ref_c) - (policy_r - ref_r))
    assert got["eval/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(margin).mean().item(), abs=1e-5)
    assert got["eval/rewards/margins"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert got["eval/rewards/chosen"] == pytest.approx(cfg.beta * (policy_c - ref_c).mean().item(), abs=1e-5)
    assert got["eval/rewards/accuracies"] == (margin > 1e-4).float().mean().item()
    assert got["eval/rewards/margins"] != 0.0  # the policy has moved: a test of the trained weights


def test_step_plan_counts_the_real_tokens_laid_out(tokenizer, pairs, tmp_path):
    """StepPlan.num_tokens (the loop's running `num_tokens`): the pairs' real tokens, each prompt once."""
    recipe = _recipe(tokenizer, pairs, cfg_for(tmp_path, grad_accum=2))
    replay = EpochSampler(len(recipe.pairs), recipe.cfg.seed).take(recipe.cfg.batch_size)
    plan = recipe.plan_step(0)
    expected = sum(len(c.prompt_ids) + len(c.completion_ids) + len(r.completion_ids)
                   for c, r in (recipe.pairs[i] for i in replay))
    assert plan.num_tokens == expected and "num_tokens" not in plan.metrics


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_loss_types_run_end_to_end(tokenizer, pairs, tmp_path, loss_type):
    """`--loss-type simpo|orpo` through run_dpo: no reference is ever loaded, the first step's loss is the core
    loss on length-normalised log-probs of unpacked forwards (+ ORPO's NLL of y_c), and the policy trains."""
    cfg = cfg_for(tmp_path, loss_type=loss_type, beta=2.0 if loss_type == "simpo" else 0.1, simpo_gamma=0.5)

    def no_reference():
        raise AssertionError("a reference-free loss loaded the reference")

    model = tiny_model(tokenizer)
    recipe = DPORecipe(copy.deepcopy(model), pairs[:40], cfg, tokenizer.pad_token_id, no_reference)
    first = [recipe.pairs[i] for i in EpochSampler(40, cfg.seed).take(cfg.batch_size)]
    numerator, metrics = recipe.loss(recipe.plan_step(0).updates[0][0])
    chosen, rejected = padded_logps(recipe.model, first)
    lengths_c = torch.tensor([len(c.completion_ids) for c, _ in first])
    lengths_r = torch.tensor([len(r.completion_ids) for _, r in first])
    avg_c, avg_r = chosen / lengths_c, rejected / lengths_r
    if loss_type == "simpo":
        expected = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.5)[0]
    else:
        expected = orpo_loss(avg_c, avg_r, beta=0.1)[0] - avg_c  # + NLL per token of y_c (ORPO eq. 6)
    assert numerator.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert "nll_loss" in metrics if loss_type == "orpo" else "nll_loss" not in metrics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_dpo(cfg, model, tokenizer, pairs, no_reference)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rows = read_metrics(Path(cfg.out))
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert not list(Path(cfg.out).glob("reference-logps-*"))  # nothing cached: nothing to cache
    codes = [f.code for f in read_findings(Path(cfg.out) / "diagnostics.jsonl")]
    assert "dpo.start_not_ln2" not in codes  # step 0 has no reference to equal


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
    assert without_timing(read_metrics(Path(straight_cfg.out))) == without_timing(read_metrics(Path(cut_cfg.out)))
    assert calls == [1]  # the checkpoint at step 2 holds pairs of steps 0-1; steps 2-4 load the reference


def test_step0_accuracy_is_zero_with_reference_cached_from_other_batches(tokenizer, pairs, tmp_path):
    recipe = _recipe(tokenizer, pairs, cfg_for(tmp_path, batch_size=1, eval_every=0))
    # cache every pair from one big packed batch: another row layout than batch 1's, other rounding
    recipe.reference_logps(recipe.keys, pack_pairs(recipe.pairs, 1024, tokenizer.pad_token_id, trim_final_tokens=True))
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
        recipe.reference_logps(recipe.keys, pack_pairs(recipe.pairs, 1024, tokenizer.pad_token_id, trim_final_tokens=True))
        for step in range(1, 8):  # no optimizer step: the policy is still the reference
            _, metrics = recipe.loss(recipe.plan_step(step).updates[0][0])
            assert metrics["rewards/accuracies"] == 0.0
            assert abs(metrics["dpo_loss"] - math.log(2)) < 1e-3
    recipe.cache.flush()
    fp32 = _recipe(tokenizer, pairs, replace(cfg, precision="fp32"))
    assert fp32.cache.fingerprint != recipe.cache.fingerprint and len(fp32.cache) == 0
    shared = _recipe(tokenizer, pairs, cfg).cache  # same precision: shared, held-out pairs included
    assert len(shared) == len(recipe.pairs) + len(recipe.eval_pairs)


def test_frozen_bf16_reference_equals_autocast_bit_for_bit(tokenizer, pairs):
    """freeze(bf16) stores Linear weights as autocast would round them: same log-probs, no per-forward cast."""
    model = tiny_model(tokenizer)
    packed = pack_pairs(pairs[:8], 96, tokenizer.pad_token_id, trim_final_tokens=True)
    frozen = freeze(copy.deepcopy(model), "bf16")
    assert frozen.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert frozen.model.embed_tokens.weight.dtype == torch.float32  # and lm_head, tied to it
    assert frozen.lm_head.weight is frozen.model.embed_tokens.weight
    with torch.no_grad(), mixed_precision("bf16", model):
        expected, got = pair_logps(model, packed), pair_logps(frozen, packed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_wrong_label_shift_stops_the_run_before_any_update(tokenizer, pairs, tmp_path, monkeypatch):
    """The shift bug that policy and reference share (so step 0 would still be ln 2) fires logps.mask_mismatch."""
    import rlhflab.data.collate as collate

    forget_the_label_shift(monkeypatch, collate)
    cfg = cfg_for(tmp_path)
    model = tiny_model(tokenizer)

    def run():
        run_dpo(cfg, model, tokenizer, pairs, lambda: tiny_model(tokenizer))

    assert_stops_on_mask_mismatch(run, model, Path(cfg.out))

"""PPO on a tiny model: smoke, ratio exactly 1 on the first update, KL controller, invariance, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_stops_on_mask_mismatch,
    count_a,
    forget_the_label_shift,
    tiny_lm_config,
    tiny_tokenizer,
    without_timing,
)
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from rlhflab.algorithms.ppo import KLController, PPOConfig, PPORecipe, run_ppo
from rlhflab.training.metrics import read_metrics
from rlhflab.training.precision import mixed_precision


def models(tokenizer, seed: int = 0):
    """(policy, value model, reference, reward model); policy and reference start equal."""
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(tiny_lm_config(tokenizer, num_labels=1))
    reference = LlamaForCausalLM(tiny_lm_config(tokenizer, num_labels=1))
    reference.load_state_dict(policy.state_dict())
    value = LlamaForSequenceClassification(tiny_lm_config(tokenizer, num_labels=1))
    reward = LlamaForSequenceClassification(tiny_lm_config(tokenizer, num_labels=1))
    return policy, value, reference, reward


def config(tmp_path: Path, **overrides) -> PPOConfig:
    base = PPOConfig(out=str(tmp_path / "run"), max_steps=3, batch_size=4, group_size=1, max_new_tokens=6, lr=1e-3,
                     ppo_epochs=2, num_minibatches=2, threads=1, progress=False, seed=5)
    return replace(base, **overrides)


def run(cfg: PPOConfig, use_reward_model: bool = False):
    tokenizer = tiny_tokenizer()
    policy, value, reference, reward = models(tokenizer)
    kwargs = {"reward_model": reward} if use_reward_model else {"reward_fn": count_a}
    run_ppo(cfg, policy, value, reference, tokenizer, PROMPTS, **kwargs)
    return policy, value, read_metrics(Path(cfg.out))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_smoke_policy_and_value_change(tmp_path, precision):
    tokenizer = tiny_tokenizer()
    policy0, value0, _, _ = models(tokenizer)
    policy, value, metrics = run(config(tmp_path, precision=precision), use_reward_model=True)
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), policy0.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(value.parameters(), value0.parameters(), strict=True))
    for key in ("reward", "kl", "entropy", "objective/kl", "objective/entropy", "objective/rlhf_reward", "approx_kl",
                "clip_ratio/region", "clip_ratio/low", "clip_ratio/high", "ratio", "loss/policy", "loss/value", "value/explained_var", "kl_coef",
                "completions/mean_length", "completions/clipped_ratio", "loss"):
        assert all(torch.isfinite(torch.tensor(float(m[key]))) for m in metrics), key
    assert metrics[0]["kl"] == metrics[0]["objective/kl"] == 0.0  # policy == reference before the first update
    assert (tmp_path / "run" / "value_model" / "model.safetensors").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ratio_is_exactly_one_on_the_first_update(tmp_path, precision):
    """Also under bf16 autocast: the old log-probs come from the same packed rows in the same precision."""
    tokenizer = tiny_tokenizer()
    policy, value, reference, _ = models(tokenizer)
    cfg = config(tmp_path, grad_accum=2, precision=precision)
    recipe = PPORecipe(policy, value, reference, tokenizer, PROMPTS, cfg, reward_fn=count_a)
    with mixed_precision(precision, policy):
        plan = recipe.plan_step(0)
        assert len(plan.updates) == recipe.updates_per_step == 4
        for mb in plan.updates[0]:
            _, metrics = recipe.loss(mb)
            assert metrics["ratio"] == 1.0
            assert metrics["approx_kl"] == 0.0 and metrics["clip_ratio/region"] == 0.0
    assert plan.metrics["kl"] == plan.metrics["objective/kl"] == 0.0


def test_score_lands_on_the_last_token_and_kl_penalty_elsewhere(tmp_path):
    """With γ = λ = 1, a zero value model and β·KL = 0, every token's return equals the sequence's score."""
    tokenizer = tiny_tokenizer()
    policy, value, reference, _ = models(tokenizer)
    torch.nn.init.zeros_(value.score.weight)
    cfg = config(tmp_path, gamma=1.0, lam=1.0, missing_eos_penalty=1.0)
    recipe = PPORecipe(policy, value, reference, tokenizer, PROMPTS, cfg, reward_fn=lambda p, c: [2.0] * len(c))
    plan = recipe.plan_step(0)
    for mb in plan.updates[0]:
        truncated = torch.tensor([len(c) == 6 and tokenizer.eos_token_id not in c
                                  for c in mb["packed"].target_ids.split(mb["packed"].completion_lengths.tolist())])
        expected = (2.0 - truncated.float())[:, None].expand_as(mb["returns"])
        assert torch.allclose(mb["returns"][mb["mask"]], expected[mb["mask"]])


def test_grad_accumulation_invariance(tmp_path):
    """The same rollout batch in 1 or 2 micro-batches per update gives the same trained weights."""
    weights = []
    for accum in (1, 2):
        policy, _, metrics = run(config(tmp_path / str(accum), max_steps=1, grad_accum=accum, num_minibatches=1))
        weights.append(torch.cat([p.detach().flatten() for p in policy.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_adaptive_kl_controller():
    """Ziegler et al. 2019: β grows when KL is above target and shrinks below, by at most 20% × n / horizon."""
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(kl=12.0, n=10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(kl=3.0, n=10)
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # error clipped from -0.5 to -0.2
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n=10)
    assert fixed.value == 0.1


def test_resume_gives_identical_metrics(tmp_path):
    cfg = config(tmp_path / "full", max_steps=4, adaptive_kl=True, target_kl=0.01, kl_horizon=20)
    _, _, full = run(cfg)
    part = config(tmp_path / "part", max_steps=4, adaptive_kl=True, target_kl=0.01, kl_horizon=20, checkpoint_every=2)
    run(replace(part, max_steps=2))
    _, _, resumed = run(replace(part, resume="auto"))
    assert len({m["kl_coef"] for m in full}) > 1  # the controller moved, and its state was resumed
    assert without_timing(resumed) == without_timing(full)


def test_minibatches_must_split_over_processes(tmp_path, monkeypatch):
    """Under torchrun every minibatch is cut into grad_accum micro-batches per process: 4 prompts in 2 minibatches
    fit 2 processes, in 4 minibatches they do not (an input error before any sampling)."""
    from rlhflab.errors import InputError
    from rlhflab.training import distributed

    tokenizer = tiny_tokenizer()
    policy, value, reference, _ = models(tokenizer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.data_parallel():
        PPORecipe(policy, value, reference, tokenizer, PROMPTS, config(tmp_path), reward_fn=count_a)
        with pytest.raises(InputError, match="multiple of 8"):
            PPORecipe(policy, value, reference, tokenizer, PROMPTS, config(tmp_path, num_minibatches=4),
                      reward_fn=count_a)


def test_a_wrong_label_shift_stops_the_run_before_any_update(tmp_path, monkeypatch):
    """logps.mask_mismatch on the first micro-batch of packed rollouts."""
    import rlhflab.algorithms.rollout as rollout

    forget_the_label_shift(monkeypatch, rollout)
    tokenizer = tiny_tokenizer()
    policy, value, reference, _ = models(tokenizer)

    def run():
        run_ppo(config(tmp_path), policy, value, reference, tokenizer, PROMPTS, reward_fn=count_a)

    assert_stops_on_mask_mismatch(run, policy, tmp_path / "run")


def test_micro_batches_are_planned_everywhere_and_trained_by_their_process(monkeypatch):
    """training.sharding: rank 1 of 2 plans all 2 × grad_accum micro-batches (their sizes normalise the loss) and
    trains on its block, the last two; alone, one process trains on all."""
    from rlhflab.training import distributed
    from rlhflab.training.sharding import plan_micro_batches

    assert plan_micro_batches(list(range(8)), 2) == [([0, 1, 2, 3], True), ([4, 5, 6, 7], True)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with distributed.data_parallel():
        plan = plan_micro_batches(list(range(8)), 2)
    assert plan == [([0, 1], False), ([2, 3], False), ([4, 5], True), ([6, 7], True)]

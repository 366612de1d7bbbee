"""GRPO on a tiny model: smoke, ratio exactly 1 at iteration 0, golden trajectory, resume, reward functions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    PROMPTS,
    assert_stops_on_mask_mismatch,
    count_a,
    forget_the_label_shift,
    tiny_lm,
    tiny_tokenizer,
    without_timing,
)

from rlhflab.algorithms.grpo import GRPOConfig, GRPORecipe, run_grpo
from rlhflab.algorithms.rewards import call_reward_fn, load_reward_fn
from rlhflab.errors import InputError
from rlhflab.training.metrics import read_metrics
from rlhflab.training.precision import mixed_precision


def config(tmp_path: Path, **overrides) -> GRPOConfig:
    base = GRPOConfig(out=str(tmp_path / "run"), max_steps=3, batch_size=2, group_size=4, max_new_tokens=6, lr=1e-2,
                      threads=1, progress=False, seed=3)
    return replace(base, **overrides)


def run(cfg: GRPOConfig, tokenizer=None, reward_fn=count_a):
    tokenizer = tokenizer or tiny_tokenizer()
    policy = tiny_lm(tokenizer)
    reference = tiny_lm(tokenizer) if cfg.beta > 0 else None
    run_grpo(cfg, policy, tokenizer, PROMPTS, reward_fn=reward_fn, reference=reference)
    return policy, read_metrics(Path(cfg.out))


def test_smoke_parameters_change_and_metrics_are_finite(tmp_path):
    tokenizer = tiny_tokenizer()
    before = {k: v.clone() for k, v in tiny_lm(tokenizer).state_dict().items()}
    policy, metrics = run(config(tmp_path), tokenizer)
    changed = [k for k, v in policy.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    assert len(metrics) == 3
    for key in ("loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/low",
                "clip_ratio/high", "completions/mean_length", "completions/clipped_ratio"):
        assert all(torch.isfinite(torch.tensor(float(m[key]))) for m in metrics), key
    assert (Path(tmp_path) / "run" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize(("num_iterations", "precision", "level"),
                         [(1, "fp32", "token"), (2, "fp32", "token"), (1, "bf16", "token"), (2, "bf16", "token"),
                          (2, "fp32", "sequence")])
def test_ratio_is_exactly_one_at_iteration_zero(tmp_path, num_iterations, precision, level):
    """Old log-probs: the current forward detached (1 iteration) or a no-grad forward of the same packed rows
    (in the same precision, so also exact under bf16 autocast); KL to an equal reference is exactly 0. The same
    for GSPO's sequence-level ratio."""
    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, num_iterations=num_iterations, grad_accum=2, precision=precision,
                 importance_sampling_level=level)
    policy = tiny_lm(tokenizer)
    recipe = GRPORecipe(policy, tokenizer, PROMPTS, cfg, reward_fn=count_a, reference=tiny_lm(tokenizer))
    with mixed_precision(precision, policy):
        plan = recipe.plan_step(0)
        assert len(plan.updates) == num_iterations
        for mb in plan.updates[0]:
            _, metrics = recipe.loss(mb)
            assert metrics["ratio"] == 1.0 and metrics["kl"] == 0.0
            assert metrics["clip_ratio/low"] == metrics["clip_ratio/high"] == 0.0


def test_group_of_tied_rewards_gives_zero_policy_gradient(tmp_path):
    """All rewards equal ⇒ every advantage 0; with beta 0 the loss and its gradient vanish."""
    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, beta=0.0)
    recipe = GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, cfg, reward_fn=lambda p, c: [1.0] * len(c))
    plan = recipe.plan_step(0)
    assert plan.metrics["frac_reward_zero_std"] == 1.0
    numerator, _ = recipe.loss(plan.updates[0][0])
    numerator.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in recipe.model.parameters())


# (reward, loss, kl, entropy) of the first three steps of `config(...)`, recorded on CPU, torch 2.13
# (re-recorded when sampling moved to inverse-CDF draws from per-prompt seeds).
GOLDEN = [[0.03125, 0.0, 0.0, 3.1213], [0.05, 0.00063, 0.01638, 3.10975], [0.16042, 0.003, 0.06128, 3.07514]]


def test_golden_trajectory(tmp_path):
    """Three steps on a fixed seed reproduce the recorded metrics (guards silent changes to sampling, packing,
    advantages or the loss). Step 0: ratio 1 and a reference equal to the policy give loss 0 and kl 0."""
    _, metrics = run(config(tmp_path))
    got = [m[k] for m in metrics for k in ("reward", "loss", "kl", "entropy")]
    assert got == pytest.approx([v for row in GOLDEN for v in row], abs=2e-4)


def test_resume_gives_identical_metrics(tmp_path):
    full_cfg = config(tmp_path / "full", max_steps=4, num_iterations=2)
    _, full = run(full_cfg)
    part_cfg = config(tmp_path / "part", max_steps=4, num_iterations=2, checkpoint_every=2)
    tokenizer = tiny_tokenizer()
    run_grpo(replace(part_cfg, max_steps=2), tiny_lm(tokenizer), tokenizer, PROMPTS, reward_fn=count_a,
             reference=tiny_lm(tokenizer))
    _, resumed = run(replace(part_cfg, resume="auto"), tokenizer)
    assert without_timing(resumed) == without_timing(full)
    # the example completions too: each step's once, as the uninterrupted run wrote them
    logged = [(tmp_path / run_dir / "run" / "completions.jsonl").read_text() for run_dir in ("full", "part")]
    assert logged[0] == logged[1]
    assert [json.loads(line)["step"] for line in logged[0].splitlines()] == [s for s in range(4) for _ in range(8)]


def test_completions_log_matches_the_rollout(tmp_path):
    """completions.jsonl: the first log_completions completions of every logged step, with the reward the reward
    function gives their text and the group-relative advantage recomputed from the logged rewards."""
    cfg = config(tmp_path, log_completions=4, group_size=4, beta=0.0)
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [s for s in range(cfg.max_steps) for _ in range(4)]
    for step in range(cfg.max_steps):
        group = [r for r in rows if r["step"] == step]  # one whole group of 4: the first prompt's
        assert len({r["prompt"] for r in group}) == 1
        rewards = torch.tensor([r["reward"] for r in group])
        assert rewards.tolist() == pytest.approx(count_a([r["prompt"] for r in group], [r["completion"] for r in group]))
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert [r["advantage"] for r in group] == pytest.approx(expected.tolist(), abs=1e-5)


def test_rloo_advantages_in_a_grpo_step(tmp_path):
    """--advantage-estimator rloo: each completion's advantage is its reward minus the mean of its k−1 siblings'
    (a leave-one-out loop over the step's logged rewards); an unknown estimator is an input error."""
    from rlhflab.config import load_config

    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, advantage_estimator="rloo", log_completions=8, beta=0.0)
    plan = GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, cfg, reward_fn=count_a).plan_step(0)
    rows, k = plan.samples, cfg.group_size
    for g in range(cfg.batch_size):
        group = rows[g * k : (g + 1) * k]
        for i, row in enumerate(group):
            others = [r["reward"] for j, r in enumerate(group) if j != i]
            assert row["advantage"] == pytest.approx(row["reward"] - sum(others) / len(others), abs=1e-6)
    with pytest.raises(InputError, match="grpo, rloo"):
        load_config(GRPOConfig, overrides={"advantage_estimator": "ppo"})


def test_drop_zero_std_groups_leaves_tied_groups_out_of_the_loss(tmp_path):
    """Groups whose rewards all tie leave the loss and its item count; the others stay (checked against the
    logged rewards of every row)."""
    def tie_on_short_prompts(prompts, completions):
        return [0.0 if len(p) < 4 else float(len(c)) for p, c in zip(prompts, completions, strict=True)]

    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, beta=0.0, batch_size=6, loss_agg="token_mean", drop_zero_std_groups=True, log_completions=48)
    plan = GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, cfg, reward_fn=tie_on_short_prompts).plan_step(0)
    mb, k = plan.updates[0][0], cfg.group_size
    rewards = torch.tensor([r["reward"] for r in plan.samples]).view(-1, k)
    informative = (rewards.max(dim=1).values > rewards.min(dim=1).values).repeat_interleave(k)
    assert 0 < int(informative.sum()) < len(informative)  # both kinds of group in this step
    assert mb["in_loss"].tolist() == informative.tolist()
    assert mb["num_items"] == int(mb["packed"].completion_lengths[informative].sum())


def test_mask_truncated_completions_leaves_cut_off_text_out_of_the_loss(tmp_path):
    """DAPO's overlong masking: with beta 0 the masked loss equals the unmasked loss of the same batch with the cut-off
    completions' advantages set to 0, and the item count (tokens, token_mean) counts only finished completions."""
    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, beta=0.0, loss_agg="token_mean", max_new_tokens=3, mask_truncated_completions=True)
    recipe = GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, cfg, reward_fn=count_a)
    for step in range(6):  # find a step with both finished and cut-off completions
        plan = recipe.plan_step(step)
        mb = plan.updates[0][0]
        if 0 < int(mb["in_loss"].sum()) < len(mb["in_loss"]):
            break
    else:
        pytest.fail("no step mixed finished and truncated completions")
    lengths = mb["packed"].completion_lengths
    assert mb["num_items"] == int(lengths[mb["in_loss"]].sum())
    masked, _ = recipe.loss(mb)
    zeroed = {**mb, "in_loss": torch.ones_like(mb["in_loss"]), "advantages": mb["advantages"] * mb["in_loss"]}
    reference, _ = recipe.loss(zeroed)
    torch.testing.assert_close(masked, reference)


def test_load_reward_fn_from_file_and_module(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text("def length(prompts, completions):\n    return [float(len(c)) for c in completions]\nX = 3\n")
    fn = load_reward_fn(f"{file}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    gold = load_reward_fn("rlhflab.tasks.reviews:reviews_reward")
    assert gold(["i bought this phone and the battery was"], [" great ."]) == [2.0]
    for spec, words in [
        ("no_colon", "does not name"),
        (f"{tmp_path}/missing.py:f", "not found"),
        (f"{file}:nothing", "has no 'nothing'"),
        (f"{file}:X", "not a function"),
        ("rlhflab.no_such_module:f", "cannot import"),
        (f"{file}:", "does not name"),
    ]:
        with pytest.raises(InputError, match=words):
            load_reward_fn(spec)


def test_reward_fn_output_is_checked():
    with pytest.raises(InputError, match="2 completions"):
        call_reward_fn(lambda p, c: [1.0], ["p", "q"], ["a", "b"])
    with pytest.raises(InputError, match="non-finite"):
        call_reward_fn(lambda p, c: [float("nan")] * 2, ["p", "q"], ["a", "b"])
    with pytest.raises(InputError, match="list of numbers"):
        call_reward_fn(lambda p, c: ["x", "y"], ["p", "q"], ["a", "b"])


def test_reward_fn_gets_the_data_fields_it_names():
    """TRL's convention: the prompt data's other fields come by keyword, one value per completion; a function gets the
    ones it names (all with **kwargs); one naming `completions` is called by keyword, any other by position."""
    prompts, completions, columns = ["p", "p", "q"], ["a", "b", "c"], {"answer": ["1", "1", "2"], "level": [3, 3, 5]}

    def trl_style(completions, answer, **kwargs):
        assert kwargs["prompts"] == prompts and kwargs["level"] == [3, 3, 5]
        return [float(c == "b") + float(a) for c, a in zip(completions, answer, strict=True)]

    def named_only(prompts, completions, level):
        return [float(x) for x in level]

    assert call_reward_fn(trl_style, prompts, completions, columns).tolist() == [1.0, 2.0, 2.0]
    assert call_reward_fn(named_only, prompts, completions, columns).tolist() == [3.0, 3.0, 5.0]
    assert call_reward_fn(lambda p, c: [float(len(x)) for x in p], prompts, completions, columns).tolist() == [1.0] * 3
    with pytest.raises(InputError, match=r"needs 'solution'.*fields: answer, level"):
        call_reward_fn(lambda completions, solution: [0.0] * 3, prompts, completions, columns)
    ids = [[5, 2], [6], [7, 8, 2]]
    lengths = call_reward_fn(lambda completions, completion_ids: [float(len(i)) for i in completion_ids], prompts,
                             completions, columns, completion_ids=ids)
    assert lengths.tolist() == [2.0, 1.0, 3.0]


def test_conversational_completions_reach_the_reward_fn_as_assistant_messages(tmp_path):
    """For chat prompts TRL passes each completion as [{"role": "assistant", "content": text}]; so does GRPO here."""
    from rlhflab.algorithms.rollout import Rollout, score

    chat = [{"role": "user", "content": "hi"}]
    rollout = Rollout(prompts=[chat, "plain"], prompt_ids=[[1], [2]], completions=[[3], [4], [5], [6]],
                      texts=["a", "b", "c", "d"], truncated=torch.zeros(4, dtype=torch.bool), group_size=2)
    seen = []
    score(rollout, [lambda prompts, completions: seen.extend(completions) or [0.0] * 4], None, pad_token_id=0)
    assert seen == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}], "c", "d"]


def test_reward_fn_sees_each_completions_own_prompt_fields(tmp_path):
    """Through a GRPO run (3 prompts × group 4 a step): every row's field belongs to the prompt it continues."""
    seen = []

    def check(prompts, completions, length, **kwargs):
        assert length == [len(p) for p in prompts]
        seen.append(len(completions))
        return [0.0] * len(completions)

    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, beta=0.0)
    run_grpo(cfg, tiny_lm(tokenizer), tokenizer, PROMPTS, reward_fn=check,
             prompt_columns={"length": [len(p) for p in PROMPTS]})
    assert seen == [cfg.batch_size * cfg.group_size] * cfg.max_steps


def test_several_reward_functions_are_summed_with_their_weights(tmp_path):
    """TRL's reward_funcs + reward_weights: the reward is Σ w_i f_i, and each f_i is logged as rewards/NAME/mean
    and /std. Checked against the values each function returned (recorded as it ran)."""
    returned = {"length": [], "count_a": []}

    def length(prompts, completions):
        returned["length"].append([float(len(c)) for c in completions])
        return returned["length"][-1]

    def recorded_count_a(prompts, completions):
        returned["count_a"].append(count_a(prompts, completions))
        return returned["count_a"][-1]

    recorded_count_a.__name__ = "count_a"
    tokenizer = tiny_tokenizer()
    cfg = config(tmp_path, beta=0.0, reward_weights=[0.5, 2.0])
    _, metrics = run(cfg, tokenizer, reward_fn=[length, recorded_count_a])
    for step, m in enumerate(metrics):
        lengths, counts = torch.tensor(returned["length"][step]), torch.tensor(returned["count_a"][step])
        assert m["rewards/length/mean"] == pytest.approx(lengths.mean().item())
        assert m["rewards/count_a/std"] == pytest.approx(counts.std().item())
        assert m["reward"] == pytest.approx((0.5 * lengths + 2.0 * counts).mean().item(), rel=1e-6)
    with pytest.raises(InputError, match="1 reward weights for 2 reward functions"):
        GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, config(tmp_path, reward_weights=[1.0]),
                   reward_fn=[length, count_a])


def test_load_several_reward_fns(tmp_path):
    from rlhflab.algorithms.rewards import load_reward_fns, reward_names

    file = tmp_path / "r.py"
    file.write_text("def fmt(p, c):\n    return [0.0] * len(c)\n")
    fns = load_reward_fns(f"{file}:fmt, rlhflab.tasks:reviews_reward,{file}:fmt")
    assert reward_names(fns) == ["fmt_0", "reviews_reward", "fmt_2"]  # a name used twice is numbered
    with pytest.raises(InputError, match="names no function"):
        load_reward_fns(" , ")


@pytest.mark.parametrize("loss_agg,scale_rewards", [("token_mean", "batch"), ("seq_mean_token_sum_norm", "none")])
def test_aggregation_modes_and_reward_model(tmp_path, loss_agg, scale_rewards):
    """Every aggregation mode gives a finite loss; num_items is its denominator (tokens or completions)."""
    from transformers import LlamaForSequenceClassification

    tokenizer = tiny_tokenizer()
    reward_model = LlamaForSequenceClassification(replace(tiny_lm(tokenizer).config, num_labels=1))
    cfg = config(tmp_path, loss_agg=loss_agg, scale_rewards=scale_rewards, beta=0.0)
    recipe = GRPORecipe(tiny_lm(tokenizer), tokenizer, PROMPTS, cfg, reward_model=reward_model)
    plan = recipe.plan_step(0)
    mb = plan.updates[0][0]
    tokens = int(mb["packed"].completion_lengths.sum())
    assert mb["num_items"] == (tokens if loss_agg == "token_mean" else cfg.batch_size * cfg.group_size)
    numerator, _ = recipe.loss(mb)
    assert torch.isfinite(numerator)


def test_a_wrong_label_shift_stops_the_run_before_any_update(tmp_path, monkeypatch):
    """logps.mask_mismatch on the first micro-batch of packed rollouts."""
    import rlhflab.algorithms.rollout as rollout

    forget_the_label_shift(monkeypatch, rollout)
    tokenizer = tiny_tokenizer()
    policy = tiny_lm(tokenizer)

    def run():
        run_grpo(config(tmp_path), policy, tokenizer, PROMPTS, reward_fn=count_a, reference=tiny_lm(tokenizer))

    assert_stops_on_mask_mismatch(run, policy, tmp_path / "run")

"""core.advantages, core.kl, core.policy_loss against hand-computed values and brute-force loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhflab.core.advantages import (
    gae,
    group_advantages,
    group_reward_std,
    rloo_advantages,
    whiten,
)
from rlhflab.core.kl import KL_ESTIMATORS, get_kl_estimator, kl_k1, kl_k2, kl_k3
from rlhflab.core.policy_loss import (
    LOSS_AGGREGATIONS,
    aggregate,
    clipped_surrogate,
    clipped_value,
    masked_mean,
    ppo_clip_token_losses,
    sequence_level_logps,
)

# ---- GAE ---------------------------------------------------------------------------------------------------


def brute_gae(rewards, values, mask, gamma, lam):
    """Textbook GAE on each row's masked positions only, compacted into a plain list."""
    advantages = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[b, t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            advantages[b, t] = next_adv
    return advantages, (advantages + values) * mask


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5]])
    mask = torch.ones(1, 2)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta_1 = 1 - 0.5 = 0.5; delta_0 = 0 + 0.9 * 0.5 - 0.5 = -0.05; A_0 = -0.05 + 0.45 * 0.5 = 0.175
    torch.testing.assert_close(advantages, torch.tensor([[0.175, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.675, 1.0]]))
    # gamma = lam = 1: A_t = (sum of future rewards) - V_t, R_t = sum of future rewards
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_brute_force_with_prompt_padding_and_holes(gamma, lam):
    torch.manual_seed(0)
    rewards = torch.randn(4, 9, dtype=torch.float64)
    values = torch.randn(4, 9, dtype=torch.float64)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0, 0, 0],  # prompt, response, padding
            [0, 1, 1, 1, 1, 1, 1, 1, 1],  # response to the end
            [0, 0, 0, 1, 0, 1, 1, 0, 0],  # a hole (e.g. a tool output) inside the response
            [0, 0, 0, 0, 0, 0, 0, 0, 0],  # empty
        ],
        dtype=torch.float64,
    )
    # Masked-out positions hold garbage: it must not leak into the result.
    rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e6))
    values = torch.where(mask.bool(), values, torch.full_like(values, -1e6))
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_adv, expected_ret = brute_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_adv, rtol=0, atol=1e-10)
    torch.testing.assert_close(returns, expected_ret, rtol=0, atol=1e-10)


def test_whiten():
    torch.manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64)
    picked = x[mask.bool()].tolist()
    mean, std = statistics.fmean(picked), statistics.stdev(picked)
    out = whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], (x[mask.bool()] - mean) / math.sqrt(std**2 + 1e-8))
    assert torch.equal(out[~mask.bool()], torch.zeros(int((1 - mask).sum()), dtype=torch.float64))
    kept_mean = whiten(x, mask, shift_mean=False)
    assert kept_mean[mask.bool()].mean().item() == pytest.approx(mean)


# ---- group advantages ----------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 1/2; group 2: all equal, std 0
    got = group_advantages(rewards, group_size=4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [0.5001] * 4 + [1e-4] * 4
    )
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        group_advantages(rewards, 4, "none"), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    )
    torch.testing.assert_close(group_reward_std(rewards, 4), torch.tensor([0.5, 0.0]))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_brute_force(scale_rewards):
    torch.manual_seed(1)
    rewards = torch.randn(12, dtype=torch.float64)
    size = 4
    expected = []
    for g in range(0, 12, size):
        group = rewards[g : g + size].tolist()
        for r in group:
            centred = r - statistics.fmean(group)
            if scale_rewards == "group":
                centred /= statistics.stdev(group) + 1e-4
            elif scale_rewards == "batch":
                centred /= statistics.stdev(rewards.tolist()) + 1e-4
            expected.append(centred)
    got = group_advantages(rewards, size, scale_rewards)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_rloo_matches_leave_one_out_loop():
    torch.manual_seed(2)
    rewards = torch.randn(9, dtype=torch.float64)
    expected = []
    for g in range(0, 9, 3):
        group = rewards[g : g + 3].tolist()
        for i, r in enumerate(group):
            expected.append(r - statistics.fmean(group[:i] + group[i + 1 :]))
    torch.testing.assert_close(rloo_advantages(rewards, 3), torch.tensor(expected, dtype=torch.float64))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as info:
        get_kl_estimator("nope")
    assert all(name in str(info.value) for name in KL_ESTIMATORS)
    with pytest.raises(ValueError) as info:
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "nope")
    assert all(name in str(info.value) for name in LOSS_AGGREGATIONS)
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(4), 2, "nope")


# ---- KL estimators -------------------------------------------------------------------------------------------

P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
Q = torch.tensor([0.25, 0.25, 0.2, 0.2, 0.1], dtype=torch.float64)
EXACT_KL = float((P * (P / Q).log()).sum())


def test_kl_exact_per_token_values():
    logp, ref_logp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_k1(logp, ref_logp).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref_logp).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref_logp).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(ref_logp, ref_logp).item() == 0.0


def test_k1_k3_expectations_are_exactly_kl():
    """Sum over the support, weighted by p: E_p[k1] = E_p[k3] = KL(p || q) to rounding."""
    for name in ("k1", "k3"):
        expectation = float((P * KL_ESTIMATORS[name](P.log(), Q.log())).sum())
        assert expectation == pytest.approx(EXACT_KL, abs=1e-12)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_monte_carlo_mean(name):
    samples = torch.multinomial(P, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimates = KL_ESTIMATORS[name](P.log()[samples], Q.log()[samples])
    if name == "k2":  # biased: converges to E_p[1/2 (log p/q)^2], near but not at KL
        target = float((P * 0.5 * (P / Q).log() ** 2).sum())
    else:
        target = EXACT_KL
    standard_error = estimates.std().item() / math.sqrt(len(samples))
    assert abs(estimates.mean().item() - target) < 5 * standard_error
    if name != "k1":
        assert (estimates >= 0).all()


# ---- PPO clip loss and value loss ----------------------------------------------------------------------------

# four live tokens, one per clipping region, then a masked token holding garbage
RATIOS = [1.5, 0.5, 0.5, 1.5, 100.0]
ADVS = [1.0, -1.0, 1.0, -1.0, 1000.0]
MASK = torch.tensor([[1, 1, 1, 1, 0]])



def ppo_clip_loss(logp, old_logp, advantages, mask, clip_eps=0.2, clip_eps_high=None, loss_agg="token_mean"):
    """The clipped policy loss as PPO and GRPO compose it: `clipped_surrogate`, then `aggregate`."""
    token_losses, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps, clip_eps_high)
    return aggregate(token_losses, mask, loss_agg), stats


def value_loss(values, old_values, returns, mask, clip_range=0.2):
    """The clipped value loss as PPO composes it: `clipped_value`, then the token mean."""
    token_losses, stats = clipped_value(values, old_values, returns, mask, clip_range)
    return aggregate(token_losses, mask, "token_mean"), stats

def ppo_inputs():
    old_logp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0]], dtype=torch.float64)
    logp = (old_logp + torch.tensor([RATIOS], dtype=torch.float64).log()).requires_grad_()
    return logp, old_logp, torch.tensor([ADVS], dtype=torch.float64)


def test_ppo_clip_loss_hand_computed():
    logp, old_logp, advantages = ppo_inputs()
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, MASK, clip_eps=0.2)
    # per token: A=+1, rho=1.5 -> -min(1.5, 1.2) = -1.2 (clipped high); A=-1, rho=0.5 -> max(0.5, 0.8) = 0.8
    # (clipped low); A=+1, rho=0.5 -> -0.5 (unclipped); A=-1, rho=1.5 -> 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert stats["clip_ratio/high"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/low"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/region"].item() == pytest.approx(0.5)
    k3 = [r - 1 - math.log(r) for r in RATIOS[:4]]  # KL(old || new) with samples from old: r = new / old
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 4)
    loss.backward()
    # clipped tokens pass no gradient; unclipped: d(-A rho)/d logp = -A rho, over 4 tokens
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, 0.0, -0.5 / 4, 1.5 / 4, 0.0]], dtype=torch.float64)
    )


def test_clipped_surrogate_returns_the_token_losses_and_their_statistics_in_one_call():
    """The one call PPO and GRPO make: its token losses are `ppo_clip_token_losses`, its statistics equal a
    token-by-token loop over the mask (random ratios and advantages, a ragged mask, asymmetric clipping)."""
    gen = torch.Generator().manual_seed(1)
    old_logp = torch.randn(4, 7, generator=gen, dtype=torch.float64) - 2
    logp = old_logp + torch.randn(4, 7, generator=gen, dtype=torch.float64) * 0.4
    advantages = torch.randn(4, 1, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7, [1] * 5 + [0] * 2])
    token_losses, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps=0.1, clip_eps_high=0.25)
    torch.testing.assert_close(token_losses, ppo_clip_token_losses(logp, old_logp, advantages.expand(4, 7), 0.1, 0.25))
    low = high = region = ratio_sum = kl_sum = n = 0
    for b in range(4):
        for t in range(7):
            if not mask[b, t]:
                continue
            r, a = math.exp(logp[b, t] - old_logp[b, t]), float(advantages[b, 0])
            n += 1
            low += r < 0.9 and a < 0
            high += r > 1.25 and a > 0
            region += max(-a * r, -a * min(max(r, 0.9), 1.25)) > -a * r
            ratio_sum += r
            kl_sum += r - 1 - math.log(r)  # k3 of KL(old || new): samples from old, r = new / old
    expected = {"clip_ratio/low": low / n, "clip_ratio/high": high / n, "clip_ratio/region": region / n,
                "ratio": ratio_sum / n, "approx_kl": kl_sum / n}
    assert {k: v.item() for k, v in stats.items()} == pytest.approx(expected)
    assert 0 < region < n  # the draw exercises both sides of the clip


def test_masked_mean_counts_only_masked_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # nothing masked: 0, not 0/0


def test_ppo_clip_higher():
    logp, old_logp, advantages = ppo_inputs()
    loss, stats = ppo_clip_loss(logp, old_logp, advantages, MASK, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4)
    assert stats["clip_ratio/high"].item() == pytest.approx(0.25)


def test_ppo_clip_loss_takes_one_advantage_per_sequence():
    logp, old_logp, advantages = ppo_inputs()
    per_seq = torch.tensor([[2.0]], dtype=torch.float64)
    a, _ = ppo_clip_loss(logp, old_logp, per_seq, MASK)
    b, _ = ppo_clip_loss(logp, old_logp, per_seq.expand(1, 5), MASK)
    assert a.item() == b.item()


def test_gspo_sequence_ratio_matches_a_loop():
    """GSPO: every token of sequence i is clipped with s_i = exp(mean over its tokens of log π − log π_old);
    the loss and its gradient equal a per-sequence loop written from the paper's formula."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.3 - 2).requires_grad_()
    old_logp = logp.detach() + torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.2
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]])
    advantages = torch.tensor([[1.5], [-0.7], [0.4]], dtype=torch.float64).expand(3, 6)
    ratio_logps = sequence_level_logps(logp, old_logp, mask)
    got = aggregate(ppo_clip_token_losses(ratio_logps, old_logp, advantages, 0.1, 0.15), mask, "seq_mean_token_mean")
    got.backward()
    grad = logp.grad.clone()
    logp.grad = None
    per_sequence = []
    for i in range(3):
        n = int(mask[i].sum())
        s = torch.exp((logp[i, :n] - old_logp[i, :n]).mean())
        a = advantages[i, 0]
        per_sequence.append(torch.maximum(-a * s, -a * torch.clamp(s, 1 - 0.1, 1 + 0.15)))  # same on every token
    expected = torch.stack(per_sequence).mean()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, logp.grad)
    assert (sequence_level_logps(old_logp, old_logp, mask) == old_logp).all()  # ratio exactly 1 at π = π_old


def test_value_loss_hand_computed():
    values = torch.tensor([[2.0, 1.1, 9.0]])
    old_values = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[3.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: max((2 - 3)^2, (1.2 - 3)^2) = 3.24 (clipped is larger); token 1: inside the clip, 1.9^2
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.9**2) / 2)
    assert stats["value/clip_frac"].item() == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old_values, returns, mask, clip_range=None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.9**2) / 2)


# ---- aggregation and gradient accumulation -------------------------------------------------------------------


def brute_aggregate(losses, mask, mode, max_tokens):
    if mode == "token_mean":
        picked = [
            losses[b, t].item() for b in range(losses.shape[0]) for t in range(losses.shape[1]) if mask[b, t]
        ]
        return sum(picked) / len(picked)
    per_seq = []
    for b in range(losses.shape[0]):
        row = [losses[b, t].item() for t in range(losses.shape[1]) if mask[b, t]]
        if row:
            per_seq.append(sum(row) / (len(row) if mode == "seq_mean_token_mean" else max_tokens))
    return sum(per_seq) / len(per_seq)


def random_batch(seed: int, batch: int = 6, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    losses = torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 7, 3, 0, 5, 2])[:batch]  # very different lengths, one empty sequence
    mask = (torch.arange(length) < lengths[:, None]).long()
    return losses, mask


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
def test_aggregate_matches_brute_force(mode):
    losses, mask = random_batch(0)
    got = aggregate(losses, mask, mode, max_tokens=10)
    assert got.item() == pytest.approx(brute_aggregate(losses, mask, mode, 10), abs=1e-12)


@pytest.mark.parametrize("mode", sorted(LOSS_AGGREGATIONS))
@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1], [2, 4], [3, 3], [1, 3, 2]])
def test_micro_batch_parts_recombine_to_the_full_batch(mode, split):
    losses, mask = random_batch(1)
    full = aggregate(losses, mask, mode, max_tokens=10)
    numerator, denominator = 0.0, 0.0
    for chunk_losses, chunk_mask in zip(losses.split(split), mask.split(split), strict=True):
        num, den = aggregate(chunk_losses, chunk_mask, mode, max_tokens=10, return_parts=True)
        numerator, denominator = numerator + num, denominator + den
    torch.testing.assert_close(numerator / denominator, full, rtol=0, atol=1e-14)


def test_mean_of_micro_batch_means_is_not_the_full_batch_value():
    """Why the parts exist: averaging per-micro-batch token means weights short micro-batches up."""
    losses, mask = random_batch(1)
    full = aggregate(losses, mask, "token_mean")
    naive = (
        sum(aggregate(lo, m, "token_mean") for lo, m in zip(losses.split(3), mask.split(3), strict=True)) / 2
    )
    assert abs(naive.item() - full.item()) > 1e-3


def test_micro_batch_gradients_add_up_to_full_batch_gradient():
    logp, old_logp, _ = (t.detach() for t in ppo_inputs())
    logp = logp.repeat(4, 1).requires_grad_()
    old_logp = old_logp.repeat(4, 1)
    advantages = torch.randn(4, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    full, _ = ppo_clip_loss(logp, old_logp, advantages, mask, loss_agg="seq_mean_token_mean")
    (full_grad,) = torch.autograd.grad(full, logp)

    token_losses = ppo_clip_token_losses(logp, old_logp, advantages)
    total_den = sum(
        aggregate(tl, m, "seq_mean_token_mean", return_parts=True)[1]
        for tl, m in zip(token_losses.detach().split(2), mask.split(2), strict=True)
    )
    grad = torch.zeros_like(logp)
    for rows in (slice(0, 2), slice(2, 4)):
        num, _ = aggregate(
            ppo_clip_token_losses(logp, old_logp, advantages)[rows],
            mask[rows],
            "seq_mean_token_mean",
            return_parts=True,
        )
        grad += torch.autograd.grad(num / total_den, logp)[0]
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-14)


def test_dr_grpo_needs_max_tokens():
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(torch.zeros(2, 3), torch.ones(2, 3), "seq_mean_token_sum_norm")

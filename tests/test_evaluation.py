"""The evaluation suite: bootstrap intervals against closed forms, its KL against a brute-force exact KL."""

import numpy as np
import pytest
import torch

from rlhflab.data.collate import tokenize_prompt
from rlhflab.errors import InputError
from rlhflab.evaluation.stats import bootstrap_ci
from rlhflab.evaluation.suite import EvalConfig, evaluate


def test_bootstrap_matches_normal_theory_for_independent_prompts():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 2.0, size=(400, 1))
    mean, low, high = bootstrap_ci(values, num_resamples=4000, seed=1)
    half_width = 1.96 * values.std() / np.sqrt(400)
    assert mean == values.mean()
    assert abs((high - low) / 2 - half_width) / half_width < 0.1


def test_bootstrap_accounts_for_correlated_samples():
    # each prompt has its own offset: samples of a prompt are correlated, so the interval must be
    # about as wide as that of the 16 prompt means, not of 16 x 8 independent values
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1.0, size=(16, 1))
    values = offsets + rng.normal(0, 0.1, size=(16, 8))
    _, low, high = bootstrap_ci(values, num_resamples=4000, seed=1)
    prompt_means = values.mean(axis=1)
    expected = 1.96 * prompt_means.std() / np.sqrt(16)
    assert 0.75 < (high - low) / 2 / expected < 1.25


# ---- the suite's KL: KL(π_T ‖ π_ref,T) of the distributions sampled at temperature T --------------------------


def _kl_setting():
    """A tokenizer of 11 tokens and two different tiny Llamas over it, their output layers scaled so that the
    next-token distributions are far from uniform (a temperature then changes them a lot)."""
    from helpers import tiny_llama

    from rlhflab.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(["ab ba", "ba ab"], vocab_size=16)
    models = []
    for seed in (0, 1):
        model = tiny_llama(seed=seed, vocab_size=len(tokenizer), hidden_size=32, head_dim=8, intermediate_size=64)
        with torch.no_grad():
            model.lm_head.weight.mul_(5.0)
        models.append(model)
    return tokenizer, *models


def _every_completion_logp(model, prompt: list[int], vocab: int, eos: int, temperature: float) -> np.ndarray:
    """Brute force over every completion of at most 2 tokens ([EOS], or any two tokens: finished or cut at
    max_new_tokens = 2): log π_T(y | x) in float64, from one forward of each prompt + y. Rows in a fixed order."""
    first, second = torch.arange(vocab).repeat_interleave(vocab), torch.arange(vocab).repeat(vocab)  # [V*V]
    ids = torch.cat([torch.tensor(prompt).expand(vocab * vocab, -1), first[:, None], second[:, None]], dim=1)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits.double() / temperature, dim=-1)  # [V*V, P+2, V]
    p = len(prompt)
    one = logps[:, p - 1].gather(1, first[:, None])[:, 0]  # the first completion token, predicted at the prompt's end
    two = logps[:, p].gather(1, second[:, None])[:, 0]
    whole = torch.where(first == eos, one, one + two)  # sampling stops at EOS: [EOS] is a whole completion
    keep = (first != eos) | (second == 0)  # [EOS] once
    return whole[keep].numpy()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_kl_is_that_of_the_distributions_sampled(temperature):
    """Each sample's "kl" is log π_T(y) − log π_ref,T(y) of one of the possible completions, and its mean over
    many samples drawn at T is the exact KL(π_T ‖ π_ref,T), summed by brute force over every completion.
    At T ≠ 1 that differs from the mean temperature-1 log-ratio (what the suite reported before) by > 8 SE."""
    tokenizer, policy, reference = _kl_setting()
    prompt = tokenize_prompt(tokenizer, "ab", None).prompt_ids
    n = 2000
    cfg = EvalConfig(temperatures=[temperature], samples_per_prompt=n, max_new_tokens=2, batch_size=n)
    results = evaluate(policy, tokenizer, ["ab"], cfg, reference=reference)
    sampled = np.array(results["temperatures"][f"{temperature:g}"]["per_prompt"][0]["values"]["kl"])
    assert sampled.shape == (n,)

    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    logp, ref_logp = (_every_completion_logp(m, prompt, vocab, eos, temperature) for m in (policy, reference))
    prob = np.exp(logp)
    assert prob.sum() == pytest.approx(1.0, abs=1e-9)  # every possible completion is enumerated
    ratios = logp - ref_logp
    exact = float((prob * ratios).sum())
    nearest = np.abs(sampled[:, None] - ratios[None, :]).min(axis=1)
    assert nearest.max() < 1e-4  # each sample's value is one completion's tempered log-ratio
    standard_error = sampled.std() / np.sqrt(n)
    assert abs(sampled.mean() - exact) < 4 * standard_error, (sampled.mean(), exact, standard_error)
    if temperature != 1.0:
        untempered = [_every_completion_logp(m, prompt, vocab, eos, 1.0) for m in (policy, reference)]
        old = float((prob * (untempered[0] - untempered[1])).sum())
        assert abs(old - exact) > 8 * standard_error  # the old metric could not pass the 4 SE check above


def test_greedy_evaluation_with_a_reference_is_refused():
    tokenizer, policy, reference = _kl_setting()
    with pytest.raises(InputError, match="temperature 0"):
        evaluate(policy, tokenizer, ["ab"], EvalConfig(temperatures=[0.7, 0.0]), reference=reference)

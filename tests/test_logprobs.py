"""core.logprobs against brute force: one position at a time, one sequence at a time, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhflab.core.logprobs import sequence_logps, token_entropy, token_logps

EOS = 1
PAD = 0


def brute_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """out[b, t] = log_softmax(logits[b, t])[input_ids[b, t + 1]], one position at a time."""
    batch, length, _ = logits.shape
    out = torch.zeros(batch, length - 1, dtype=logits.dtype)
    for b in range(batch):
        for t in range(length - 1):
            out[b, t] = torch.log_softmax(logits[b, t], dim=-1)[input_ids[b, t + 1]]
    return out


def wrong_unshifted_labels(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Off by one: position t scored against its own token instead of the next one."""
    logps = torch.log_softmax(logits, dim=-1).gather(-1, input_ids.unsqueeze(-1)).squeeze(-1)
    return (logps * response_mask).sum(-1)


def wrong_unshifted_mask(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Off by one: labels shifted but the mask not (response_mask[:, :-1] instead of [:, 1:])."""
    return (token_logps(logits, input_ids) * response_mask[:, :-1]).sum(-1)


# ---- hand-built logits: exact values ---------------------------------------------------------------------


def hand_built() -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary of 3, sequence [2, 1, 0].
    logits[0] = [0, ln 3, 0]   -> p = [1/5, 3/5, 1/5], predicts input_ids[1] = 1: log(3/5)
    logits[1] = [ln 2, 0, ln 2] -> p = [2/5, 1/5, 2/5], predicts input_ids[2] = 0: log(2/5)
    logits[2] = huge           -> predicts nothing; must not be read.
    """
    logits = torch.tensor(
        [[[0.0, math.log(3), 0.0], [math.log(2), 0.0, math.log(2)], [100.0, -100.0, 50.0]]],
        dtype=torch.float64,
    )
    return logits, torch.tensor([[2, 1, 0]])


def test_token_logps_exact_on_hand_built_logits():
    logits, ids = hand_built()
    expected = torch.tensor([[math.log(3 / 5), math.log(2 / 5)]], dtype=torch.float64)
    torch.testing.assert_close(token_logps(logits, ids), expected, rtol=0, atol=1e-12)


def test_sequence_logps_exact_on_hand_built_logits():
    logits, ids = hand_built()
    both = torch.tensor([[0, 1, 1]])  # tokens 1 and 2 are the response
    last = torch.tensor([[0, 0, 1]])  # only token 2
    assert sequence_logps(logits, ids, both).item() == pytest.approx(math.log(6 / 25), abs=1e-12)
    assert sequence_logps(logits, ids, last).item() == pytest.approx(math.log(2 / 5), abs=1e-12)
    assert sequence_logps(logits, ids, both, average=True).item() == pytest.approx(
        math.log(6 / 25) / 2, abs=1e-12
    )


def test_off_by_one_versions_give_other_numbers_on_hand_built_logits():
    logits, ids = hand_built()
    last = torch.tensor([[0, 0, 1]])
    right = sequence_logps(logits, ids, last).item()
    assert right == pytest.approx(math.log(2 / 5), abs=1e-12)
    # Unshifted labels read logits[2] (the "huge" row) for token 0: log softmax([100, -100, 50])[0] ~ 0.
    assert wrong_unshifted_labels(logits, ids, last).item() == pytest.approx(0.0, abs=1e-12)
    # Unshifted mask drops the last response token entirely.
    assert wrong_unshifted_mask(logits, ids, last).item() == 0.0


def test_token_logps_matches_brute_force_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 6))
    torch.testing.assert_close(token_logps(logits, ids), brute_token_logps(logits, ids), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        token_logps(logits, ids, temperature=0.7), brute_token_logps(logits / 0.7, ids), rtol=0, atol=1e-12
    )


def test_half_precision_logits_are_upcast():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 64) * 5
    ids = torch.randint(0, 64, (2, 5))
    out = token_logps(logits.bfloat16(), ids)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, brute_token_logps(logits.bfloat16().float(), ids), rtol=0, atol=1e-5)


def test_masked_out_minus_inf_logp_does_not_poison_the_sum():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = -float("inf")  # token 2 impossible at position 0 ...
    ids = torch.tensor([[0, 2, 3]])  # ... and it is the (prompt) token at position 1
    mask = torch.tensor([[0, 0, 1]])
    assert sequence_logps(logits, ids, mask).item() == pytest.approx(math.log(1 / 4))


def test_token_entropy_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 9, dtype=torch.float64) * 3
    expected = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(token_entropy(logits), expected, rtol=0, atol=1e-12)
    uniform = torch.zeros(1, 1, 8)
    assert token_entropy(uniform).item() == pytest.approx(math.log(8))
    uniform[..., 4:] = -float("inf")  # four allowed tokens: log 4, no nan
    assert token_entropy(uniform).item() == pytest.approx(math.log(4))


# ---- a real causal LM, padded batches vs each sequence alone ---------------------------------------------


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


# (prompt, response) pairs; prompt lengths differ, every response ends in EOS.
PAIRS = [
    ([2, 10, 11], [20, 21, 22, EOS]),
    ([2, 12, 13, 14, 15], [23, EOS]),
    ([2, 16], [24, 25, 26, 27, 28, EOS]),
]


def alone(model: LlamaForCausalLM, prompt: list[int], response: list[int]) -> float:
    """Brute force: the unpadded sequence alone, one response position at a time."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    total = 0.0
    for j in range(len(prompt), ids.shape[1]):  # every response token, EOS included
        total += torch.log_softmax(logits[j - 1], dim=-1)[ids[0, j]].item()
    return total


def padded_batch(side: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, response_mask [B, T], padded on `side` with `pad_id`."""
    length = max(len(p) + len(r) for p, r in PAIRS)
    ids, attn, resp = [], [], []
    for prompt, response in PAIRS:
        n_pad = length - len(prompt) - len(response)
        seq, a, m = (
            prompt + response,
            [1] * (len(prompt) + len(response)),
            [0] * len(prompt) + [1] * len(response),
        )
        if side == "left":
            seq, a, m = [pad_id] * n_pad + seq, [0] * n_pad + a, [0] * n_pad + m
        else:
            seq, a, m = seq + [pad_id] * n_pad, a + [0] * n_pad, m + [0] * n_pad
        ids.append(seq)
        attn.append(a)
        resp.append(m)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(resp)


def batch_logits(model: LlamaForCausalLM, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # real tokens numbered from 0 on either side
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(model, side):
    ids, attn, resp = padded_batch(side, PAD)
    got = sequence_logps(batch_logits(model, ids, attn), ids, resp)
    expected = torch.tensor([alone(model, p, r) for p, r in PAIRS])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_average_divides_by_response_length_including_eos(model, side):
    ids, attn, resp = padded_batch(side, PAD)
    got = sequence_logps(batch_logits(model, ids, attn), ids, resp, average=True)
    expected = torch.tensor([alone(model, p, r) / len(r) for p, r in PAIRS])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_eos_is_counted(model):
    ids, attn, resp = padded_batch("right", PAD)
    logits = batch_logits(model, ids, attn)
    with_eos = sequence_logps(logits, ids, resp)
    eos_only = resp * (ids == EOS)
    without_eos = sequence_logps(logits, ids, resp - eos_only)
    eos_logps = sequence_logps(logits, ids, eos_only)
    assert (eos_logps < 0).all()
    torch.testing.assert_close(with_eos, without_eos + eos_logps)
    torch.testing.assert_close(
        with_eos, torch.tensor([alone(model, p, r) for p, r in PAIRS]), rtol=0, atol=1e-4
    )


def test_pad_equal_to_eos_counts_the_real_eos_once(model):
    """Tokenizers with pad == eos: the collator's mask keeps the one real EOS, drops trailing pads."""
    ids, attn, resp = padded_batch("right", EOS)
    logits = batch_logits(model, ids, attn)
    got = sequence_logps(logits, ids, resp)
    torch.testing.assert_close(got, torch.tensor([alone(model, p, r) for p, r in PAIRS]), rtol=0, atol=1e-4)
    # The classic bug: a mask built as (input_ids != pad) drops the real EOS, which is then never learned.
    naive = (ids != EOS).long() * (resp.cumsum(-1) > 0).long()
    assert not torch.allclose(sequence_logps(logits, ids, naive), got)


def test_off_by_one_versions_differ_on_the_model(model):
    ids, attn, resp = padded_batch("right", PAD)
    logits = batch_logits(model, ids, attn)
    right = sequence_logps(logits, ids, resp)
    for wrong in (wrong_unshifted_labels(logits, ids, resp), wrong_unshifted_mask(logits, ids, resp)):
        assert (wrong - right).abs().min() > 1e-3


# ---- logps.mask_mismatch on packed rows (DPO, reward model, PPO, GRPO) ------------------------------------

GROUPS = [([1, 5, 6], [[7, 8, 2], [9, 2]]), ([1, 3], [[4, 4, 4, 2], [10, 11, 2]]), ([1], [[12, 2], [13, 14, 2]])]


@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.parametrize("max_row_tokens", [8, 64])
def test_packed_mask_check_passes_on_what_the_packer_builds(trim, max_row_tokens):
    from rlhflab.core.packing import pack_groups
    from rlhflab.diagnostics.checks import check_packed_mask

    packed = pack_groups(GROUPS, max_row_tokens=max_row_tokens, pad_token_id=0, trim_final_tokens=trim)
    assert check_packed_mask(packed, GROUPS) is None


@pytest.mark.parametrize("corruption", ["shift forgotten", "shifted twice", "prompt token scored", "token missing"])
def test_packed_mask_check_fires_on_a_wrong_shift_or_mask(corruption):
    """Each corruption is one a packer or log-prob gather bug could make; each must fire logps.mask_mismatch
    (the DPO step-0 check cannot see these when policy and reference share them)."""
    from dataclasses import replace

    from rlhflab.core.packing import pack_groups
    from rlhflab.diagnostics.checks import check_packed_mask

    packed = pack_groups(GROUPS, max_row_tokens=64, pad_token_id=0)
    if corruption == "shift forgotten":  # each token "predicted" from its own position
        packed = replace(packed, logit_index=packed.logit_index + 1)
    elif corruption == "shifted twice":
        packed = replace(packed, logit_index=packed.logit_index - 1)
    elif corruption == "prompt token scored":  # the mask starts one token early: targets slide into the prompt
        packed = replace(packed, target_ids=packed.input_ids.flatten()[packed.logit_index])
    else:  # the mask ends one token early
        keep = torch.ones_like(packed.target_ids, dtype=torch.bool)
        keep[-1] = False
        packed = replace(packed, **{name: getattr(packed, name)[keep] for name in
                                    ("logit_index", "target_ids", "sequence_index", "token_position", "token_index")})
    finding = check_packed_mask(packed, GROUPS)
    assert finding is not None and finding.code == "logps.mask_mismatch" and finding.severity == "error"

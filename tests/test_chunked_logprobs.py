"""Log-probs with the LM head applied in chunks (core.logprobs.chunked_head_logps, core.causal_lm, packed_forward).

Exact against the full [N, V] logits for values and gradients (w.r.t. the hidden states and the head), with a
temperature, entropy and argmax hits; on padded rows (both sides) and packed rows; chunk sizes that do not divide N,
N below one chunk, N = 0. And the point of it: what autograd keeps for the backward has no [N, V] tensor.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FullLogitsForward, tiny_llama

from rlhflab.core import logprobs
from rlhflab.core.causal_lm import padded_response_logps
from rlhflab.core.logprobs import chunked_head_logps
from rlhflab.core.packing import pack_groups, packed_forward

N, H, V = 20, 8, 50


def full_head_logps(hidden, head, targets, temperature=1.0):
    """The unchunked reference, written independently: log_softmax over the whole [N, V] logits."""
    logits = head(hidden)
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    logps = torch.log_softmax(logits / temperature, dim=-1)  # [N, V]
    picked = logps.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logps.exp() * logps).sum(-1)
    return picked, entropy, head(hidden).argmax(-1) == targets


def head_setting(n: int = N, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.mul_(4.0)  # peaked distributions, so a wrong position or temperature shows
    hidden = torch.randn(n, H, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (n,))
    targets[::2] = head(hidden).argmax(-1)[::2]  # every other target the most likely token: argmax hits
    return hidden, head, targets


def gradients(hidden, head, logps, entropy):
    """d/d(hidden, weight, bias) of a loss that weighs tokens differently and uses the entropy."""
    weights = torch.linspace(-1.0, 2.0, logps.numel(), dtype=logps.dtype)
    return torch.autograd.grad((weights * logps).sum() + 0.3 * entropy.sum(), [hidden, head.weight, head.bias])


@pytest.mark.parametrize("chunk_size", [1, 3, 7, N, N + 5])  # 3 and 7 do not divide N; N + 5: N below one chunk
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_equals_full_logits_values_and_gradients(chunk_size, temperature):
    hidden, head, targets = head_setting()
    got = chunked_head_logps(hidden, head, targets, temperature, chunk_size=chunk_size, with_entropy=True,
                             with_argmax=True)  # fmt: skip
    expected = full_head_logps(hidden, head, targets, temperature)
    assert got.logps.shape == got.entropy.shape == (N,)
    torch.testing.assert_close(got.logps, expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got.entropy, expected[1], rtol=0, atol=1e-12)
    assert torch.equal(got.target_is_argmax, expected[2]) and got.target_is_argmax.any()
    for g, e in zip(gradients(hidden, head, got.logps, got.entropy),
                    gradients(hidden, head, expected[0], expected[1]), strict=True):  # fmt: skip
        assert e.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_no_grad_loop_and_checkpointed_chunks_agree():
    hidden, head, targets = head_setting(dtype=torch.float32)
    with torch.no_grad():
        plain = chunked_head_logps(hidden, head, targets, 0.7, chunk_size=6, with_entropy=True)
    assert plain.logps.grad_fn is None
    graph = chunked_head_logps(hidden, head, targets, 0.7, chunk_size=6, with_entropy=True)
    assert torch.equal(plain.logps, graph.logps.detach()) and torch.equal(plain.entropy, graph.entropy.detach())


def test_half_precision_head_gives_float32_logps():
    hidden, head, targets = head_setting(dtype=torch.bfloat16)
    got = chunked_head_logps(hidden, head, targets, chunk_size=7)
    assert got.logps.dtype == torch.float32
    torch.testing.assert_close(got.logps, full_head_logps(hidden, head, targets)[0], rtol=0, atol=1e-5)


def test_no_tokens():
    hidden, head, targets = head_setting(n=0)
    got = chunked_head_logps(hidden, head, targets, with_entropy=True, with_argmax=True)
    assert got.logps.shape == got.entropy.shape == got.target_is_argmax.shape == (0,)
    grad_hidden, grad_weight, _ = gradients(hidden, head, got.logps, got.entropy)  # the graph still exists
    assert grad_hidden.shape == (0, H) and not grad_weight.any()


def test_invalid_arguments():
    hidden, head, targets = head_setting()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_logps(hidden, head, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        chunked_head_logps(hidden, head, targets, temperature=0.0)


# ---- what autograd keeps -------------------------------------------------------------------------------------------

def saved_for_backward(run):
    """Run `run()` with autograd on; returns its result and the shapes of every tensor autograd saved for the
    backward outside checkpointed regions (those save placeholders through their own, inner hooks)."""
    shapes: list[torch.Size] = []

    def keep(tensor):
        shapes.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        result = run()
    return result, shapes


def test_chunked_head_keeps_no_n_by_v_tensor_for_the_backward():
    """The unchunked path saves [N, V] logits (so the hook sees what it must); the chunked path saves nothing
    with N × V elements, nor chunks that add up to it (which chunks without checkpointing would do)."""
    n, vocab, chunk = 256, 2048, 32
    torch.manual_seed(0)
    head, hidden = torch.nn.Linear(H, vocab), torch.randn(n, H, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    full, full_shapes = saved_for_backward(lambda: full_head_logps(hidden, head, targets, 0.7))
    assert max(s.numel() for s in full_shapes) >= n * vocab
    got, shapes = saved_for_backward(
        lambda: chunked_head_logps(hidden, head, targets, 0.7, chunk_size=chunk, with_entropy=True))
    assert max((s.numel() for s in shapes), default=0) <= chunk * vocab
    assert sum(s.numel() for s in shapes if vocab in s) < n * vocab // 4, shapes
    for g, e in zip(gradients(hidden, head, got.logps, got.entropy), gradients(hidden, head, *full[:2]), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)  # and its backward (recomputing the chunks) is right


VOCAB = 997  # a prime: no other dimension of the tiny model has this size


@pytest.mark.parametrize("where", ["packed", "padded"])
def test_head_only_models_keep_no_vocabulary_sized_tensor(where, monkeypatch):
    """packed_forward and padded_response_logps on a Llama: no tensor with a vocabulary dimension is saved for the
    backward; the same run with the chunks not checkpointed saves [chunk, V] ones (the check can see them)."""
    model = tiny_llama(vocab_size=VOCAB)
    groups = [([5, 6, 7], [[8, 9, 2], [10, 2]]), ([11, 12], [[13, 14, 15, 2]])]
    packed = pack_groups(groups)
    rows = padded_rows("right")

    def run():
        if where == "packed":
            return packed_forward(model, packed, with_entropy=True, chunk_size=4).sequence_logps
        input_ids, attention_mask, response_mask, position_ids = rows
        return padded_response_logps(model, input_ids, attention_mask, response_mask, position_ids=position_ids,
                                     chunk_size=4).sequence_logps()

    _, shapes = saved_for_backward(run)
    assert not [s for s in shapes if VOCAB in s], shapes
    monkeypatch.setattr(logprobs, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    _, unchecked = saved_for_backward(run)
    assert [s for s in unchecked if VOCAB in s]


# ---- padded rows (evaluation, SFT) -----------------------------------------------------------------------------

PAIRS = [([1, 10, 11], [20, 21, 22, 2]), ([1, 12, 13, 14, 15], [23, 2]), ([1, 16], [24, 25, 26, 27, 28, 2])]


def padded_rows(side: str):
    """input_ids, attention_mask, response_mask, position_ids [B, T] of PAIRS, padded (with 0) on `side`."""
    from rlhflab.data.collate import TokenizedExample, collate_sequences

    batch = collate_sequences([TokenizedExample(p, r) for p, r in PAIRS], 0, padding_side=side)
    return batch["input_ids"], batch["attention_mask"], batch["response_mask"], batch["position_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_padded_rows_equal_the_full_logits_and_each_pair_alone(side, chunk_size):
    model = tiny_llama("eager")
    input_ids, attention_mask, response_mask, position_ids = padded_rows(side)
    results = []
    for runner in (model, FullLogitsForward(model)):
        model.zero_grad()
        got = padded_response_logps(runner, input_ids, attention_mask, response_mask, 0.7, position_ids,
                                    with_argmax=True, chunk_size=chunk_size)  # fmt: skip
        weights = torch.linspace(-1.0, 1.0, got.token_logps.numel()).view_as(got.token_logps)
        (weights * got.token_logps).sum().backward()
        results.append((got, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (fast, fast_grads), (full, full_grads) = results
    torch.testing.assert_close(fast.token_logps, full.token_logps, rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.target_is_argmax, full.target_is_argmax) and torch.equal(fast.mask, full.mask)
    assert not fast.token_logps[~fast.mask].any()  # 0 off the response
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # each pair alone, unpadded, one position at a time
        for row, (prompt, response) in enumerate(PAIRS):
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0] / 0.7
            alone = sum(torch.log_softmax(logits[j - 1], -1)[(prompt + response)[j]]
                        for j in range(len(prompt), len(prompt) + len(response)))  # fmt: skip
            torch.testing.assert_close(fast.sequence_logps()[row], alone, rtol=0, atol=1e-5)


def test_sft_loss_is_the_cross_entropy_of_the_full_logits(tmp_path):
    """SFT's loss and token accuracy through the chunked head equal the summed cross-entropy (and argmax) of the
    full [B, T, V] logits over response tokens, as computed before; and so do the gradients."""
    from helpers import sft_examples, tiny_lm, tiny_tokenizer

    from rlhflab.algorithms.sft import SFTConfig, SFTRecipe
    from rlhflab.data.collate import collate_sequences

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    examples = sft_examples(tokenizer, 6)
    batch = collate_sequences(examples, tokenizer.pad_token_id)
    recipe = SFTRecipe(model, examples, SFTConfig(out=str(tmp_path)), tokenizer.pad_token_id)
    loss, metrics = recipe.loss(batch)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask, labels = batch["response_mask"][:, 1:].bool(), batch["input_ids"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    hits = int((logits.argmax(-1)[mask] == labels[mask]).sum())
    assert 0 < hits and metrics["mean_token_accuracy"] == hits / int(mask.sum())
    for g, e in zip(grads, torch.autograd.grad(expected, list(model.parameters())), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

"""KV-cache sampler: sampled log-probs equal a full forward, EOS handling, greedy parity, determinism."""

import pytest
import torch
from helpers import tiny_causal_lm, tiny_llama
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    Qwen2ForCausalLM,
)

from rlhflab.core import sampling
from rlhflab.core.packing import pack_groups, packed_forward, to_padded
from rlhflab.core.sampling import sample

PAD = 0
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24], [30]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def frequent_eos(model) -> int:
    """A token the model emits often, used as EOS so that some rows stop early and some do not."""
    out = sample(
        model,
        PROMPTS,
        num_samples=3,
        max_new_tokens=12,
        stop_token_ids=[-1],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1),
    )
    return int(torch.mode(out.completion_ids.flatten()).values)


def full_forward_logps(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    steps = torch.arange(len(completion))
    return logps[len(prompt) - 1 + steps, torch.tensor(completion, dtype=torch.long)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_equal_full_forward(model, frequent_eos, temperature):
    out = sample(
        model,
        PROMPTS,
        num_samples=3,
        max_new_tokens=12,
        temperature=temperature,
        stop_token_ids=[frequent_eos],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    completions = out.completions()
    assert out.truncated.any() and not out.truncated.all()  # the test covers both endings
    for n, completion in enumerate(completions):
        prompt = PROMPTS[int(out.prompt_index[n])]
        expected = full_forward_logps(model, prompt, completion, temperature)
        torch.testing.assert_close(out.logps[n, : len(completion)], expected, atol=1e-5, rtol=1e-5)

    # The trainer-side packed forward reads the same numbers.
    groups = [(PROMPTS[i], completions[3 * i : 3 * i + 3]) for i in range(len(PROMPTS))]
    packed = pack_groups(groups, max_row_tokens=40)
    with torch.no_grad():
        packed_logps, mask = to_padded(packed_forward(model, packed, temperature).token_logps, packed)
    width = packed_logps.shape[1]
    torch.testing.assert_close(packed_logps, out.logps[:, :width], atol=1e-5, rtol=1e-5)
    assert torch.equal(mask.long(), out.response_mask[:, :width])


def test_stops_at_eos_and_truncates(model, frequent_eos):
    max_new = 12
    out = sample(
        model,
        PROMPTS,
        num_samples=3,
        max_new_tokens=max_new,
        stop_token_ids=[frequent_eos],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    for n in range(out.completion_ids.shape[0]):
        ids, mask, logps = out.completion_ids[n], out.response_mask[n], out.logps[n]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # contiguous from the start
        assert (ids[length:] == PAD).all() and (logps[length:] == 0).all()
        eos_positions = (ids[:length] == frequent_eos).nonzero().flatten().tolist()
        if out.truncated[n]:
            assert eos_positions == [] and length == max_new
        else:
            assert eos_positions == [length - 1]  # EOS included, and it is the first one


def test_stops_at_the_first_of_several_stop_tokens(model, frequent_eos):
    """A chat model ends at its template's end of turn or at EOS (or any generation_config eos id): each row
    stops at the first of them, which is its last token, and the tokens before are those of a free run."""
    kwargs = dict(num_samples=3, max_new_tokens=12, pad_token_id=PAD)
    free = sample(model, PROMPTS, stop_token_ids=[-1], generator=torch.Generator().manual_seed(0), **kwargs)
    counts = torch.bincount(free.completion_ids.flatten(), minlength=64)
    counts[frequent_eos] = 0
    other = int(counts.argmax())  # the commonest token after frequent_eos: the second stop token
    both = sample(model, PROMPTS, stop_token_ids=[frequent_eos, other], generator=torch.Generator().manual_seed(0),
                  **kwargs)
    ends = []
    for row, cut in zip(free.completions(), both.completions(), strict=True):
        first = next((i for i, token in enumerate(row) if token in (frequent_eos, other)), None)
        assert cut == (row if first is None else row[: first + 1])
        ends.append(cut[-1] if first is not None else None)
    assert {frequent_eos, other} <= set(ends)  # rows ended at each of the two stop tokens
    assert both.truncated.tolist() == [end is None for end in ends]


def test_all_rows_done_stops_early(model):
    greedy = sample(model, [PROMPTS[0]], max_new_tokens=4, temperature=0, stop_token_ids=[-1], pad_token_id=PAD)
    first = int(greedy.completion_ids[0, 0])
    out = sample(
        model,
        [PROMPTS[0]],
        num_samples=2,
        max_new_tokens=10,
        temperature=0,
        stop_token_ids=[first],
        pad_token_id=PAD,
    )
    assert out.completion_ids.shape == (2, 1)
    assert out.completions() == [[first], [first]]
    assert not out.truncated.any()


@pytest.mark.parametrize("prompts", [[PROMPTS[0]], [PROMPTS[1]], PROMPTS])
def test_greedy_equals_generate(model, prompts):
    eos = 63
    out = sample(
        model, prompts, num_samples=2, max_new_tokens=10, temperature=0, stop_token_ids=[eos], pad_token_id=PAD
    )
    completions = out.completions()
    assert completions[0::2] == completions[1::2]  # greedy: both samples of a prompt agree
    for i, prompt in enumerate(prompts):
        generated = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt)),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
        expected = generated[0, len(prompt) :].tolist()
        if eos in expected:
            expected = expected[: expected.index(eos) + 1]
        assert completions[2 * i] == expected


def test_top_k_one_equals_greedy(model):
    greedy = sample(model, PROMPTS, max_new_tokens=8, temperature=0, stop_token_ids=[63], pad_token_id=PAD)
    top1 = sample(
        model,
        PROMPTS,
        max_new_tokens=8,
        temperature=1.0,
        top_k=1,
        stop_token_ids=[63],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_seeded_generator_is_deterministic(model):
    def run(seed):
        return sample(
            model,
            PROMPTS,
            num_samples=4,
            max_new_tokens=8,
            top_p=0.9,
            stop_token_ids=[63],
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logps, b.logps)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_seeds_make_each_prompts_samples_independent_of_the_batch(model, frequent_eos):
    """With one seed per prompt, sampling 4 prompts together gives what 4 calls of one prompt give (the
    property that lets a rollout batch be split over processes), and a prompt's seed alone moves its samples."""
    kwargs = dict(num_samples=3, max_new_tokens=10, top_p=0.95, stop_token_ids=[frequent_eos], pad_token_id=PAD)
    seeds = [101, 102, 103, 104]
    together = sample(model, PROMPTS, seeds=seeds, **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone = sample(model, [prompt], seeds=[seeds[i]], **kwargs)
        assert alone.completions() == together.completions()[3 * i : 3 * i + 3]
        width = alone.logps.shape[1]
        torch.testing.assert_close(alone.logps, together.logps[3 * i : 3 * i + 3, :width], rtol=0, atol=1e-5)
    other = sample(model, PROMPTS, seeds=[101, 102, 103, 999], **kwargs)
    assert other.completions()[:9] == together.completions()[:9]
    assert other.completions()[9:] != together.completions()[9:]
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample(model, PROMPTS, seeds=[1, 2], **kwargs)
    with pytest.raises(ValueError, match="not both"):
        sample(model, PROMPTS, seeds=seeds, generator=torch.Generator(), **kwargs)


def test_inverse_cdf_never_picks_a_token_of_probability_zero():
    """Uniforms at the edges of [0, 1) with top-k 2: only the two kept tokens come out, each for its share of u."""
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.0]]).repeat(5, 1)  # top-2: tokens 1 (p 0.731) and 3 (p 0.269)
    uniforms = torch.tensor([0.0, 0.5, 0.7310, 0.7312, 1.0 - 2**-24])
    tokens, logps = sampling._next_tokens(logits, uniforms, temperature=1.0, top_k=2, top_p=1.0)
    assert tokens.tolist() == [1, 1, 1, 3, 3]
    torch.testing.assert_close(logps, torch.log_softmax(logits, -1)[range(5), tokens])


def first_token_probs(model, prompt, temperature):
    with torch.no_grad():
        return torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1] / temperature, dim=-1)


def test_first_token_frequencies_match_softmax(model):
    n, temperature = 6000, 0.5
    out = sample(
        model,
        [PROMPTS[2]],
        num_samples=n,
        max_new_tokens=1,
        temperature=temperature,
        stop_token_ids=[63],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    probs = first_token_probs(model, PROMPTS[2], temperature)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=probs.numel()).float()
    # Chi-square over bins with enough expected mass; 64 bins -> mean ~df, std ~sqrt(2 df).
    expected = n * probs
    keep = expected >= 5
    chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
    df = int(keep.sum()) - 1
    assert chi2 < df + 6 * (2 * df) ** 0.5, (chi2, df)
    assert (counts / n - probs).abs().max() < 0.03


def test_top_k_and_top_p_restrict_support(model):
    probs = first_token_probs(model, PROMPTS[0], 0.5)
    top3 = set(torch.topk(probs, 3).indices.tolist())
    out = sample(
        model,
        [PROMPTS[0]],
        num_samples=500,
        max_new_tokens=1,
        temperature=0.5,
        top_k=3,
        stop_token_ids=[63],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(out.completion_ids[:, 0].tolist()) <= top3

    sorted_probs, order = torch.sort(probs, descending=True)
    nucleus_size = int(((sorted_probs.cumsum(0) - sorted_probs) < 0.6).sum())
    nucleus = set(order[:nucleus_size].tolist())
    out = sample(
        model,
        [PROMPTS[0]],
        num_samples=500,
        max_new_tokens=1,
        temperature=0.5,
        top_p=0.6,
        stop_token_ids=[63],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    assert set(out.completion_ids[:, 0].tolist()) == nucleus
    # logps describe the untruncated tempered distribution
    torch.testing.assert_close(out.logps[:, 0], probs.log()[out.completion_ids[:, 0]], atol=1e-5, rtol=1e-5)


def test_restores_training_mode():
    model = tiny_llama().train()
    sample(model, [PROMPTS[0]], max_new_tokens=2, stop_token_ids=[63], pad_token_id=PAD)
    assert model.training


def test_rejects_bad_arguments(model):
    with pytest.raises(ValueError):
        sample(model, [[]], stop_token_ids=[63], pad_token_id=PAD)
    with pytest.raises(ValueError):
        sample(model, PROMPTS, top_p=0.0, stop_token_ids=[63], pad_token_id=PAD)


def test_pad_equal_to_eos(model, frequent_eos):
    out = sample(
        model,
        PROMPTS,
        num_samples=2,
        max_new_tokens=12,
        stop_token_ids=[frequent_eos],
        pad_token_id=frequent_eos,
        generator=torch.Generator().manual_seed(0),
    )
    for n, completion in enumerate(out.completions()):
        if out.truncated[n]:
            assert frequent_eos not in completion and len(completion) == 12
        else:
            assert completion.index(frequent_eos) == len(completion) - 1  # EOS kept once, at the end


def run_sample(model, *, generic: bool, monkeypatch, **kwargs):
    """`sample`, forced onto the generic (model forward + DynamicCache) decode path if `generic`."""
    with monkeypatch.context() as patch:
        if generic:
            patch.setattr(sampling, "_has_llama_layout", lambda *args: False)
        return sample(model, PROMPTS, stop_token_ids=[63], pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_static_cache_path_equals_generic_path(kv_heads, temperature, monkeypatch):
    """The lean Llama decode step computes what the model's own forward computes."""
    model = tiny_llama(num_key_value_heads=kv_heads)
    assert sampling._has_llama_layout(model, total_len=64)
    fast, generic = (
        run_sample(
            model,
            generic=generic,
            monkeypatch=monkeypatch,
            num_samples=3,
            max_new_tokens=12,
            temperature=temperature,
            generator=torch.Generator().manual_seed(0),
        )
        for generic in (False, True)
    )
    assert torch.equal(fast.completion_ids, generic.completion_ids)
    assert torch.equal(fast.response_mask, generic.response_mask)
    torch.testing.assert_close(fast.logps, generic.logps, atol=1e-5, rtol=1e-5)


def test_other_architectures_fall_back_to_generic_path():
    """GPT-2 (learned positions, fused c_attn) is not Llama-shaped: its own forward decodes it."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    assert not sampling._has_llama_layout(model, total_len=64)
    out = sample(
        model,
        PROMPTS,
        num_samples=2,
        max_new_tokens=8,
        temperature=0.7,
        stop_token_ids=[63],
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )
    for n, completion in enumerate(out.completions()):
        expected = full_forward_logps(model, PROMPTS[int(out.prompt_index[n])], completion, 0.7)
        torch.testing.assert_close(out.logps[n, : len(completion)], expected, atol=1e-5, rtol=1e-5)


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2: the Llama layout plus q/k/v biases (fused with the weights in the lean decode step)."""
    model = tiny_causal_lm("Qwen2")
    with torch.no_grad():  # nonzero biases, so that a bias left out would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def test_static_cache_path_with_biases_equals_generic_path(monkeypatch):
    model = tiny_qwen2()
    assert sampling._has_llama_layout(model, total_len=64)
    kwargs = {"num_samples": 3, "max_new_tokens": 12, "temperature": 1.0}
    fast, generic = (
        run_sample(model, generic=generic, monkeypatch=monkeypatch, generator=torch.Generator().manual_seed(0), **kwargs)
        for generic in (False, True)
    )
    assert torch.equal(fast.completion_ids, generic.completion_ids)
    torch.testing.assert_close(fast.logps, generic.logps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_bf16_autocast_logps_match_the_trainer_forward(architecture):
    """Under bf16 autocast (--precision bf16) the lean decode step keeps bf16 weight copies and a
    float32 KV cache; its log-probs agree with the trainer's packed forward to bf16 precision."""
    model = tiny_llama() if architecture == "llama" else tiny_qwen2()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample(model, PROMPTS, num_samples=3, max_new_tokens=12, stop_token_ids=[63], pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
        completions = out.completions()
        groups = [(PROMPTS[i], completions[3 * i : 3 * i + 3]) for i in range(len(PROMPTS))]
        packed = pack_groups(groups, max_row_tokens=40)
        with torch.no_grad():
            packed_logps, mask = to_padded(packed_forward(model, packed).token_logps, packed)
    width = packed_logps.shape[1]
    assert torch.equal(mask.long(), out.response_mask[:, :width])
    torch.testing.assert_close(packed_logps, out.logps[:, :width], atol=0.05, rtol=0.02)
    assert not torch.equal(packed_logps, out.logps[:, :width])  # bf16 did run: not the fp32 numbers bit for bit

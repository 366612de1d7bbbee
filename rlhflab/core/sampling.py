"""Batched sampling with a KV cache: prefill each prompt once, decode k samples of it.

    prompts (left-padded)         prefill once            expand the cache k times
    [pad pad  p  p  p]  ──►  KV[B, H, P, D]  ──►  KV[B*k, H, P, D]  (repeat_interleave)
    [ p   p   p  p  p]                                   │
                                               decode: one token per step for all B*k rows

Row n of the output is sample n % k of prompt n // k (the k samples of a prompt are
contiguous). Prompts of different lengths are left-padded; the padding is masked and the
position ids count real tokens only, so every row sees the positions of its own unpadded
sequence. A row stops at its first EOS: the EOS is part of the response (response_mask 1),
everything after it is `pad_token_id` with response_mask 0 and logp 0.

Log-probs: `logps[n, t]` is log softmax(logits / temperature)[token] of the sampled token --
the temperature-scaled distribution *before* top-k / top-p truncation. That is what a trainer
recomputes with a forward at the same temperature (see `core.packing.packed_forward`), so the
two agree to float precision. With top-k or top-p the tokens are drawn from the truncated
distribution, which these logps do not describe exactly. With temperature 0 (greedy) the
logps are those of the untempered model (temperature 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache


@dataclass
class Samples:
    """N = len(prompts) * num_samples completions, grouped by prompt; T = longest completion."""

    prompt_index: torch.Tensor  # [N] long: which prompt each row continues
    completion_ids: torch.Tensor  # [N, T] long, pad after the end
    logps: torch.Tensor  # [N, T] float32 log-prob of each sampled token, 0 after the end
    response_mask: torch.Tensor  # [N, T] long: 1 up to and including EOS, 0 after
    truncated: torch.Tensor  # [N] bool: never emitted EOS within max_new_tokens

    def completions(self) -> list[list[int]]:
        """Completions as lists of ids, EOS included where it was emitted, no padding."""
        lengths = self.response_mask.sum(-1).tolist()
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), lengths, strict=True)]


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf; [N, V] -> [N, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the first is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from last-position logits [N, V]; return (tokens [N], logps [N])."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        logps = torch.log_softmax(logits, dim=-1)
    else:
        logits = logits / temperature
        logps = torch.log_softmax(logits, dim=-1)  # before truncation: see the module docstring
        filtered = _filter_logits(logits, top_k, top_p) if (top_k > 0 or top_p < 1.0) else logits
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5.x calls the cache argument `cache`; 4.x calls it `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while sampling (it would make the logps disagree with the trainer's); restore after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class _Prefilled:
    """State after the shared prefill; rows already repeated num_samples times."""

    cache: DynamicCache
    logits: torch.Tensor  # [N, V] next-token logits of every row
    attention_mask: torch.Tensor  # [N, P + max_new_tokens] long: 0 on left padding, 1 elsewhere
    lengths: torch.Tensor  # [N] prompt length of each row
    prompt_index: torch.Tensor  # [N]


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> Samples:
    """Sample `num_samples` completions for each prompt with a KV cache (see the module docstring).

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. The same `generator`
    state gives the same samples. The model is put in eval mode while sampling and restored.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample needs at least one prompt, and every prompt needs at least one token")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    pick = partial(_next_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with _eval_mode(model):
        state = _prefill(model, prompts, num_samples, max_new_tokens, pad_token_id)
        return _decode(model, state, pick, max_new_tokens, eos_token_id, pad_token_id)


def _prefill(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
) -> _Prefilled:
    """Left-padded forward over each prompt once, then every row repeated num_samples times."""
    device = next(model.parameters()).device
    num_prompts, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    input_ids = torch.full((num_prompts, width), pad_token_id, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        input_ids[b, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
    # One mask for the whole run, sliced each step (no per-step allocation): [B, P + max_new_tokens].
    attention_mask = torch.ones(num_prompts, width + max_new_tokens, dtype=torch.long, device=device)
    attention_mask[:, :width] = torch.arange(width, device=device) >= (width - lengths[:, None])
    position_ids = (attention_mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [B, P]: real tokens only
    cache = DynamicCache(config=model.config)  # the config tells it about sliding-window layers
    logits = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask[:, :width],
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_kwarg(model): cache},
    ).logits[:, -1]  # [B, V]
    # Share the prefill: the cache, last logits, mask and length of each prompt repeated k times.
    cache.batch_repeat_interleave(num_samples)
    return _Prefilled(
        cache=cache,
        logits=logits.repeat_interleave(num_samples, dim=0),  # [N, V]
        attention_mask=attention_mask.repeat_interleave(num_samples, dim=0),  # [N, P + max_new]
        lengths=lengths.repeat_interleave(num_samples),  # [N]
        prompt_index=torch.arange(num_prompts, device=device).repeat_interleave(num_samples),
    )


def _decode(
    model: torch.nn.Module,
    state: _Prefilled,
    pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Samples:
    """One token per step for all rows until every row has emitted EOS or the length limit."""
    logits, cache_kwarg = state.logits, _cache_kwarg(model)
    num_rows, device = logits.shape[0], logits.device
    prompt_width = state.attention_mask.shape[1] - max_new_tokens
    completion_ids = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
    response_mask = torch.zeros(num_rows, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(num_rows, dtype=torch.bool, device=device)
    # A host sync per step costs nothing on CPU but stalls an accelerator: check less often there.
    check_every = 1 if device.type == "cpu" else 8
    steps = max_new_tokens
    for t in range(max_new_tokens):
        tokens, token_logps = pick(logits)
        active = ~done
        completion_ids[:, t] = torch.where(active, tokens, pad_token_id)
        logps[:, t] = torch.where(active, token_logps, 0.0)
        response_mask[:, t] = active
        done = done | (tokens == eos_token_id)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            steps = t + 1
            break
        # The new token sits at cache slot P + t and at position (prompt length + t) of its row.
        logits = model(
            input_ids=completion_ids[:, t : t + 1],
            attention_mask=state.attention_mask[:, : prompt_width + t + 1],
            position_ids=(state.lengths + t)[:, None],
            use_cache=True,
            **{cache_kwarg: state.cache},
        ).logits[:, -1]  # [N, V]

    return Samples(
        prompt_index=state.prompt_index,
        completion_ids=completion_ids[:, :steps],
        logps=logps[:, :steps],
        response_mask=response_mask[:, :steps],
        truncated=~done,
    )

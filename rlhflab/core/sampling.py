"""Batched sampling with a KV cache: prefill each prompt once, decode k samples of it.

    prompts (left-padded)         prefill once            expand the cache k times
    [pad pad  p  p  p]  ──►  KV[B, H, P, D]  ──►  KV[B*k, H, P, D]  (repeat_interleave)
    [ p   p   p  p  p]                                   │
                                               decode: one token per step for all B*k rows

Row n of the output is sample n % k of prompt n // k (the k samples of a prompt are
contiguous). Prompts of different lengths are left-padded; the padding is masked and the
position ids count real tokens only, so every row sees the positions of its own unpadded
sequence. A row stops at its first stop token (any of `stop_token_ids`: the model's EOS, its chat
template's end-of-turn token, ...): the stop token is part of the response (response_mask 1), as the
collator ends a completion, and everything after it is `pad_token_id` with response_mask 0 and logp 0.

Decoding: Llama-layout models (Llama, Mistral, Qwen2 without a binding sliding window) run a
lean decode step with a static KV cache (`_StaticCacheLlama`); any other model runs its own
forward with a `DynamicCache`. Both give the same tokens and log-probs (tested). A model with peft
LoRA adapters keeps the lean path: each call folds W + (α/r)·B A into the sampler's own weights.

Randomness: each row's token at step t is drawn by inverse CDF from one uniform number u[n, t],
drawn before decoding starts. With `seeds` (one per prompt) the k rows of prompt i take their
numbers from a generator seeded by seeds[i] alone, so a prompt's samples do not depend on the
other prompts of the batch: one call over B prompts gives what B calls of one prompt give, and a
batch split over processes samples what one process would (up to float rounding of the logits,
which padding to another prompt length can change in the last bit).
With `generator` instead, all rows draw from it in one go (the same state gives the same samples).

Log-probs: `logps[n, t]` is log softmax(logits / temperature)[token] of the sampled token --
the temperature-scaled distribution *before* top-k / top-p truncation. That is what a trainer
recomputes with a forward at the same temperature (see `core.packing.packed_forward`), so the
two agree to float precision. With top-k or top-p the tokens are drawn from the truncated
distribution, which these logps do not describe exactly. With temperature 0 (greedy) the
logps are those of the untempered model (temperature 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class Samples:
    """N = len(prompts) * num_samples completions, grouped by prompt; T = longest completion."""

    prompt_index: torch.Tensor  # [N] long: which prompt each row continues
    completion_ids: torch.Tensor  # [N, T] long, pad after the end
    logps: torch.Tensor  # [N, T] float32 log-prob of each sampled token, 0 after the end
    response_mask: torch.Tensor  # [N, T] long: 1 up to and including the stop token, 0 after
    truncated: torch.Tensor  # [N] bool: never emitted a stop token within max_new_tokens

    def completions(self) -> list[list[int]]:
        """Completions as lists of ids, the stop token included where one was emitted, no padding."""
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
    uniform: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row from last-position logits [N, V] and uniforms [N] in [0, 1).

    Inverse CDF: the first token whose cumulative probability exceeds u · (total mass), so a token
    of probability 0 (cut by top-k / top-p) is never picked. Returns (tokens [N], logps [N]).
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        logps = torch.log_softmax(logits, dim=-1)
    else:
        logits = logits / temperature
        logps = torch.log_softmax(logits, dim=-1)  # before truncation: see the module docstring
        filtered = _filter_logits(logits, top_k, top_p) if (top_k > 0 or top_p < 1.0) else logits
        cdf = torch.softmax(filtered, dim=-1).cumsum(-1)  # [N, V]
        draw = (uniform * cdf[:, -1])[:, None]  # [N, 1]
        tokens = torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return tokens, logps.gather(-1, tokens[:, None]).squeeze(-1)


def _uniforms(
    num_prompts: int,
    num_samples: int,
    max_new_tokens: int,
    generator: torch.Generator | None,
    seeds: Sequence[int] | None,
) -> torch.Tensor:
    """The uniform numbers [N, max_new_tokens] that pick every token (see the module docstring)."""
    if seeds is None:
        return torch.rand(num_prompts * num_samples, max_new_tokens, generator=generator)
    if len(seeds) != num_prompts:
        raise ValueError(f"seeds needs one seed per prompt: {len(seeds)} seeds for {num_prompts} prompts")
    per_prompt = [torch.Generator().manual_seed(seed) for seed in seeds]
    return torch.cat([torch.rand(num_samples, max_new_tokens, generator=g) for g in per_prompt])


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
    """State after the shared prefill. The cache holds B prompt rows; everything else N = B * k rows."""

    cache: DynamicCache  # per layer keys/values [B, H_kv, P, D], not yet repeated
    num_samples: int  # k
    logits: torch.Tensor  # [N, V] next-token logits of every row
    attention_mask: torch.Tensor  # [N, P + max_new_tokens] long: 0 on left padding, 1 elsewhere
    lengths: torch.Tensor  # [N] prompt length of each row
    prompt_index: torch.Tensor  # [N]


# One decode step: (tokens [N, 1] at step t, t) -> next-token logits [N, V].
DecodeStep = Callable[[torch.Tensor, int], torch.Tensor]


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
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> Samples:
    """Sample `num_samples` completions for each prompt with a KV cache (see the module docstring).

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Randomness comes from
    `seeds` (one per prompt: each prompt's samples independent of the batch), else from `generator`
    (the same state gives the same samples), else from torch's global generator. The model is put
    in eval mode while sampling and restored.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sample needs at least one prompt, and every prompt needs at least one token")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}, top_k={top_k}")
    if seeds is not None and generator is not None:
        raise ValueError("give seeds or a generator, not both")
    if isinstance(stop_token_ids, int) or not len(stop_token_ids):
        raise ValueError(f"stop_token_ids must be a non-empty sequence of ids, got {stop_token_ids!r}")
    uniforms = _uniforms(len(prompts), num_samples, max_new_tokens, generator, seeds)  # [N, max_new_tokens]
    uniforms = uniforms.to(next(model.parameters()).device)
    pick = partial(_next_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    with _eval_mode(model):
        state = _prefill(model, prompts, num_samples, max_new_tokens, pad_token_id)
        if _has_llama_layout(model, state.attention_mask.shape[1]):
            step = _StaticCacheLlama(model, state, max_new_tokens)
        else:
            step = _generic_step(model, state, max_new_tokens)
        stops = torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=uniforms.device)  # [S]
        return _decode(state, step, pick, uniforms, max_new_tokens, stops, pad_token_id)


def _prefill(
    model: torch.nn.Module,
    prompts: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    pad_token_id: int,
) -> _Prefilled:
    """Left-padded forward over each prompt once; every row but the cache repeated num_samples times."""
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
    return _Prefilled(
        cache=cache,
        num_samples=num_samples,
        logits=logits.repeat_interleave(num_samples, dim=0),  # [N, V]
        attention_mask=attention_mask.repeat_interleave(num_samples, dim=0),  # [N, P + max_new]
        lengths=lengths.repeat_interleave(num_samples),  # [N]
        prompt_index=torch.arange(num_prompts, device=device).repeat_interleave(num_samples),
    )


def _generic_step(model: torch.nn.Module, state: _Prefilled, max_new_tokens: int) -> DecodeStep:
    """Any causal LM: the model's own forward on one token per row with the growing DynamicCache."""
    state.cache.batch_repeat_interleave(state.num_samples)  # [B, ...] -> [N, ...]
    cache_kwarg, prompt_width = _cache_kwarg(model), state.attention_mask.shape[1] - max_new_tokens

    def step(tokens: torch.Tensor, t: int) -> torch.Tensor:
        # The token of step t sits at cache slot P + t and at position (prompt length + t) of its row.
        return model(
            input_ids=tokens,
            attention_mask=state.attention_mask[:, : prompt_width + t + 1],
            position_ids=(state.lengths + t)[:, None],
            use_cache=True,
            **{cache_kwarg: state.cache},
        ).logits[:, -1]  # [N, V]

    return step


_LLAMA_LAYOUT = ("llama", "mistral", "qwen2")  # model types whose decoder layer is exactly Llama's


def _has_llama_layout(model: torch.nn.Module, total_len: int) -> bool:
    """Whether `_StaticCacheLlama` computes exactly what this model's forward computes.

    Checked by model type and by the class of every module it reads, so that wrapped projections
    (LoRA, quantised linears), extra norms, sliding windows that would bite or position-dependent
    RoPE (dynamic, longrope) fall back to the generic path.
    """
    config, inner = model.config, getattr(model, "model", None)
    if getattr(config, "model_type", None) not in _LLAMA_LAYOUT:
        return False
    if type(getattr(model, "lm_head", None)) is not torch.nn.Linear:
        return False
    window = getattr(config, "sliding_window", None)
    rope_type = str(getattr(getattr(inner, "rotary_emb", None), "rope_type", ""))
    if window is not None and window < total_len:
        return False
    if "dynamic" in rope_type or rope_type in ("", "longrope"):  # frequencies depend on the length
        return False
    if type(inner.embed_tokens) is not torch.nn.Embedding or not hasattr(inner.norm, "variance_epsilon"):
        return False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj)
        linears += (mlp.down_proj,)
        if set(dict(attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return False  # e.g. Qwen3's q_norm / k_norm
        if not all(type(m) is torch.nn.Linear or _is_plain_lora(m) for m in linears):
            return False
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if not all(hasattr(norm, "variance_epsilon") for norm in norms):
            return False
    return True


def _is_plain_lora(module: torch.nn.Module) -> bool:
    """A peft LoRA Linear whose output is exactly base(x) + Σ_a delta_a x over its active adapters (no DoRA, no
    LoRA bias, no other variant, not merged in place): what `_linear_weight` folds into one weight."""
    if not hasattr(module, "get_delta_weight") or type(getattr(module, "base_layer", None)) is not torch.nn.Linear:
        return False
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or module.merged:
        return False
    active = [] if module.disable_adapters else module.active_adapters
    return all(not module.use_dora.get(a, False) and module.lora_B[a].bias is None
               and not getattr(module, "lora_variant", {}).get(a) for a in active)


def _linear_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an nn.Linear, or of a LoRA Linear with its adapters folded in: W + (α/r)·B A.

    LoRA: peft's own `get_delta_weight` (what its merge adds), into a new tensor of the sampler's, so the
    model's weights are never changed in place (merging and unmerging would drift them by rounding). The
    adapted forward computes W x + (α/r)·B(A x): the two differ by float rounding only (tested)."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    base = module.base_layer
    weight = base.weight
    if not module.disable_adapters:
        for adapter in module.active_adapters:
            weight = weight + module.get_delta_weight(adapter)
    return weight, base.bias


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """LlamaRMSNorm: weight * (x / rms(x)), the normalisation in float32 as transformers does it."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def _fused_linear(*linears: torch.nn.Module, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of `linears` stacked along the output dimension, in `dtype` (None: as stored).

    One matmul then computes all their outputs side by side ([N, sum of outs]).
    """
    weights, biases = zip(*(_linear_weight(m) for m in linears), strict=True)  # LoRA: adapters folded in
    weight = torch.cat(weights) if len(linears) > 1 else weights[0]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases, strict=True)])
    if dtype is not None:
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
    return weight, bias


class _StaticCacheLlama:
    """Decode step for Llama-layout models that skips transformers' per-call machinery.

    Why: decoding a few rows of a small model is a few dozen MFLOP a step, so the model forward's
    per-call work -- mask building, cache concatenation, output dataclasses, module hooks -- is a
    large share of a step. This class runs the same maths on the model's own modules and weights
    (stacked as below): a preallocated KV tensor per layer written in place ([N, H_kv, P + max_new, D]),
    RoPE cos/sin for every row and step computed once by the model's own `rotary_emb` (so scaled
    RoPE variants stay correct), and `scaled_dot_product_attention` with an additive padding mask.
    The prefill used the model's forward; its cache is copied in here, shared by the k samples.

    Weights: q/k/v and gate/up are stacked once per call (2 matmuls a layer fewer per token).
    Under autocast they are also cast once per call to the autocast dtype: decoding reads every
    weight for only 8-64 rows, so it is bound by memory traffic, and autocast would otherwise
    re-cast each weight at every step (inference mode keeps no cast cache). The KV cache stays
    float32 and attention runs outside autocast: CPU attention over one query is ~4x slower in
    bf16, and autocast would cast the whole cache back to bf16 at every step.
    """

    def __init__(self, model: torch.nn.Module, state: _Prefilled, max_new_tokens: int) -> None:
        inner, config = model.model, model.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        first = inner.layers[0].self_attn
        self.head_dim, self.scale = first.head_dim, first.scaling
        self.embed, self.norm = inner.embed_tokens, inner.norm
        rows, k = state.lengths.shape[0], state.num_samples
        device_type = state.lengths.device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        self.attention_precision = torch.autocast(device_type, enabled=False) if cast is not None else nullcontext()
        total = state.attention_mask.shape[1]
        self.prompt_width = total - max_new_tokens  # P
        self.layers = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            prefilled = (state.cache.layers[i].keys, state.cache.layers[i].values)  # [B, H_kv, P, D] each
            kv = []
            for tensor in prefilled:
                dtype = torch.float32 if cast is not None else tensor.dtype
                static = tensor.new_empty(rows // k, k, self.kv_heads, total, self.head_dim, dtype=dtype)
                static[:, :, :, : self.prompt_width] = tensor[:, None]  # share the prompt: broadcast over k
                kv.append(static.view(rows, self.kv_heads, total, self.head_dim))  # [N, H_kv, P + max_new, D]
            self.layers.append(
                {
                    "norm_attn": layer.input_layernorm,
                    "norm_mlp": layer.post_attention_layernorm,
                    "qkv": _fused_linear(attn.q_proj, attn.k_proj, attn.v_proj, dtype=cast),
                    "o": _fused_linear(attn.o_proj, dtype=cast),
                    "gate_up": _fused_linear(mlp.gate_proj, mlp.up_proj, dtype=cast),
                    "down": _fused_linear(mlp.down_proj, dtype=cast),
                    "act": mlp.act_fn,
                    "keys": kv[0],
                    "values": kv[1],
                }
            )
        self.lm_head = _fused_linear(model.lm_head, dtype=cast)
        # Token t of row n sits at position lengths[n] + t (real tokens only, as in the prefill).
        steps = torch.arange(max_new_tokens, device=state.lengths.device)
        positions = state.lengths[:, None] + steps  # [N, T]
        cos, sin = inner.rotary_emb(self.embed.weight, position_ids=positions)  # [N, T, D] each
        half = self.head_dim // 2
        # rotate_half(x) * sin == flip_halves(x) * [-sin_1, sin_2]: one flip instead of a cat of a negation.
        self.cos, self.sin = cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        # Additive attention mask [N, 1, 1, P + max_new]: -inf on left padding (faster than a bool mask).
        padding = (state.attention_mask == 0)[:, None, None, :]
        self.mask = torch.zeros_like(padding, dtype=cos.dtype).masked_fill(padding, float("-inf"))

    def __call__(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Tokens [N, 1] of step t -> next-token logits [N, V]; writes their keys/values at slot P + t."""
        rows, slot, dim = tokens.shape[0], self.prompt_width + t, self.head_dim
        rotated_heads = self.heads + self.kv_heads
        cos, sin = self.cos[:, t, None, :], self.sin[:, t, None, :]  # [N, 1, D]
        mask = self.mask[..., : slot + 1]  # [N, 1, 1, L]
        x = F.embedding(tokens[:, 0], self.embed.weight)  # [N, C]
        for layer in self.layers:
            h = _rms_norm(x, layer["norm_attn"])
            qkv = F.linear(h, *layer["qkv"]).view(rows, -1, dim)  # [N, H + 2 H_kv, D]
            qk = qkv[:, :rotated_heads]  # q and k heads get RoPE together
            flipped = qk.unflatten(-1, (2, dim // 2)).flip(-2).flatten(-2)
            qk = qk * cos + flipped * sin  # [N, H + H_kv, D]
            layer["keys"][:, :, slot] = qk[:, self.heads :]
            layer["values"][:, :, slot] = qkv[:, rotated_heads:]
            with self.attention_precision:
                out = F.scaled_dot_product_attention(
                    qk[:, : self.heads, None].to(layer["keys"].dtype),  # [N, H, 1, D]
                    layer["keys"][:, :, : slot + 1],  # [N, H_kv, L, D]
                    layer["values"][:, :, : slot + 1],
                    attn_mask=mask,
                    scale=self.scale,
                    enable_gqa=self.heads != self.kv_heads,
                )  # [N, H, 1, D]
            x = x + F.linear(out.view(rows, -1), *layer["o"])
            h = _rms_norm(x, layer["norm_mlp"])
            gate, up = F.linear(h, *layer["gate_up"]).chunk(2, dim=-1)  # [N, I] each
            x = x + F.linear(layer["act"](gate) * up, *layer["down"])
        return F.linear(_rms_norm(x, self.norm), *self.lm_head)  # [N, V]


def _decode(
    state: _Prefilled,
    step: DecodeStep,
    pick: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    uniforms: torch.Tensor,
    max_new_tokens: int,
    stop_token_ids: torch.Tensor,
    pad_token_id: int,
) -> Samples:
    """One token per step for all rows until every row has emitted a stop token or the length limit."""
    logits = state.logits
    num_rows, device = logits.shape[0], logits.device
    completion_ids = torch.full((num_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
    response_mask = torch.zeros(num_rows, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(num_rows, dtype=torch.bool, device=device)
    # A host sync per step costs nothing on CPU but stalls an accelerator: check less often there.
    check_every = 1 if device.type == "cpu" else 8
    steps = max_new_tokens
    for t in range(max_new_tokens):
        tokens, token_logps = pick(logits, uniforms[:, t])
        active = ~done
        completion_ids[:, t] = torch.where(active, tokens, pad_token_id)
        logps[:, t] = torch.where(active, token_logps, 0.0)
        response_mask[:, t] = active
        done = done | torch.isin(tokens, stop_token_ids)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            steps = t + 1
            break
        logits = step(completion_ids[:, t : t + 1], t)  # [N, V]

    return Samples(
        prompt_index=state.prompt_index,
        completion_ids=completion_ids[:, :steps],
        logps=logps[:, :steps],
        response_mask=response_mask[:, :steps],
        truncated=~done,
    )

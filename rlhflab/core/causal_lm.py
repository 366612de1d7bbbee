"""A causal LM's log-probs without its [B, T, V] logits: the backbone once, the LM head in chunks.

    input_ids [B, T] ─► backbone ─► hidden [B, T, H] ─► gather the positions that predict a
    response token [N, H] ─► chunked_head_logps (LM head + log-softmax, C tokens at a time) ─► [N]

A full forward builds logits at every position, most of them prompt and padding positions whose
log-probs nobody reads, and keeps them (and a float32 copy) for the backward: for 8 pairs of 300
tokens and a 49k vocabulary that is 2 × 0.9 GB. Only the architectures in HEAD_ONLY_WHERE_NEEDED
are split this way, since for them the forward is exactly `lm_head(model.model(...))`; any other
model (logit soft-capping or scaling, a PEFT or DDP wrapper, a custom class) takes its own full
forward, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhflab.core.logprobs import HEAD_CHUNK_TOKENS, chunked_head_logps, token_logps

# Causal LMs whose forward is exactly `lm_head(model(...).last_hidden_state)` (no logit scaling or
# soft-capping). Matched by exact class name: a subclass or wrapper may change the forward.
HEAD_ONLY_WHERE_NEEDED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, LM head) of a model in HEAD_ONLY_WHERE_NEEDED; None for any other model."""
    if type(model).__name__ not in HEAD_ONLY_WHERE_NEEDED:
        return None
    return model.model, model.lm_head


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(N, N_trainable): the parameters a token's forward multiplies by, each counted once (a tied embedding
    is the output layer's weight); an embedding table used only for lookup costs no FLOPs and is left out."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lookup = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    total = trainable = 0
    for p in model.parameters():  # unique parameters: shared ones appear once
        if id(p) not in lookup:
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def attention_break_even(model: torch.nn.Module) -> int | None:
    """L0 = N_slot / (2 · layers · hidden): the row length at which a token's attention costs as much as its
    weight matmuls; None when the model's config does not name its layers and width.

    Per token, the weight matmuls cost 6·N_slot FLOPs (forward + backward) and attention over a row of L
    tokens 12·layers·hidden·L (forward QKᵀ and AV, 2·hidden·L each per layer, three times that with the
    backward; PaLM appendix B), so a token costs 6·N_slot·(1 + L / L0). N_slot counts the weights every row
    slot passes through (`matmul_params`): for HEAD_ONLY_WHERE_NEEDED models the LM head runs only on the
    gathered completion tokens, whatever the layout, so its weight is left out. SmolLM2-135M: N_slot =
    106.2M (30 layers of 3.54M), hidden 576, L0 = 3,073 (3,892 with the 28.3M tied head counted).
    """
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int) or layers <= 0 or hidden <= 0:
        return None
    n_slot = matmul_params(model)[0]
    parts = backbone_and_head(model)
    if parts is not None:
        n_slot -= sum(p.numel() for p in parts[1].parameters())
    return max(1, round(n_slot / (2 * layers * hidden)))


@dataclass
class ResponseLogps:
    """Per-token results of `padded_response_logps`, in the label frame of `token_logps` ([B, T - 1])."""

    token_logps: Tensor  # [B, T-1] log p(input_ids[:, t + 1]), 0 where the mask is False
    mask: Tensor  # [B, T-1] bool: response_mask[:, 1:]
    target_is_argmax: Tensor | None  # [B, T-1] bool, False off the mask; when asked for

    def sequence_logps(self) -> Tensor:
        """Sum of each row's response-token log-probs: [B]."""
        return self.token_logps.sum(-1)


def padded_response_logps(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    position_ids: Tensor | None = None,
    with_argmax: bool = False,
    chunk_size: int = HEAD_CHUNK_TOKENS,
) -> ResponseLogps:
    """log p(token) of every response token of padded rows (left or right padding), at `temperature`.

    The label shift is that of `token_logps`: position t predicts input_ids[:, t + 1], and the mask
    shifts with the labels (response_mask[:, 1:]). For HEAD_ONLY_WHERE_NEEDED models only the
    positions predicting a response token go through the LM head, in chunks (`chunked_head_logps`);
    other models run their full forward. `position_ids` is passed to the model as given (None: the
    model's default, right for right padding).

    Shapes: input_ids, attention_mask, response_mask [B, T] -> ResponseLogps of [B, T-1].
    """
    mask = response_mask[:, 1:].bool()  # [B, T-1]
    parts = backbone_and_head(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if parts is None:
        logits = model(**inputs).logits  # [B, T, V]
        logps = token_logps(logits, input_ids, temperature)  # [B, T-1]
        # where(), not multiply: a -inf log-prob off the mask must not turn into nan.
        logps = torch.where(mask, logps, torch.zeros_like(logps))
        hits = None
        if with_argmax:
            with torch.no_grad():
                hits = (logits[:, :-1].argmax(-1) == input_ids[:, 1:]) & mask
        return ResponseLogps(logps, mask, hits)
    backbone, head = parts
    hidden = backbone(**inputs).last_hidden_state  # [B, T, H]
    scored = chunked_head_logps(hidden[:, :-1][mask], head, input_ids[:, 1:][mask], temperature,
                                chunk_size=chunk_size, with_argmax=with_argmax)  # [N] each  # fmt: skip
    logps = torch.zeros(mask.shape, dtype=scored.logps.dtype, device=mask.device).masked_scatter(mask, scored.logps)
    hits = None
    if scored.target_is_argmax is not None:
        hits = torch.zeros_like(mask).masked_scatter(mask, scored.target_is_argmax)
    return ResponseLogps(logps, mask, hits)

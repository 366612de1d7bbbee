"""Token and sequence log-probabilities of a causal LM, with the exact label shift.

The shift, once, in a picture (T = 5, prompt of 2 tokens, response of 3 ending in EOS):

    position t        0     1     2     3     4
    input_ids         p0    p1    r0    r1    EOS
    response_mask     0     0     1     1     1
    logits[:, t]      predicts input_ids[:, t + 1]  ->  the last position predicts nothing
    token_logps       lp(p1) lp(r0) lp(r1) lp(EOS)        (T - 1 entries)
    response_mask[:, 1:]  0     1     1     1             (the mask shifts with the labels)

So ``sequence_logps`` sums log p(r0 | p0 p1) + log p(r1 | .. r0) + log p(EOS | .. r1): every response
token including the EOS that ends it, never a prompt token, never padding (whose mask is 0).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logps(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probability of each next token: ``out[:, t] = log p(input_ids[:, t + 1] | logits[:, t])``.

    Formula: log softmax(z / tau)[y] = z[y] / tau - logsumexp(z / tau), with z = logits[:, t],
    y = input_ids[:, t + 1] and tau the sampling temperature. Computed as gathered logit minus
    logsumexp, so no [B, T, V] log-softmax copy is made (only the temperature division copies, and
    only when tau != 1). Half-precision logits are upcast to float32 first, since logsumexp over a
    large vocabulary in bfloat16 loses about two significant digits.

    Shapes: logits [B, T, V], input_ids [B, T] -> [B, T - 1].
    """
    logits = logits[:, :-1]  # [B, T-1, V]; position t predicts token t + 1
    labels = input_ids[:, 1:]  # [B, T-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    average: bool = False,
    temperature: float = 1.0,
) -> Tensor:
    """Sum (or mean) of log p(token) over the response tokens of each sequence.

    Formula: log pi(y | x) = sum_{t : m[t+1] = 1} log p(input_ids[t + 1] | input_ids[: t + 1]),
    with m = response_mask aligned with input_ids (1 on response tokens including the EOS that ends
    the response, 0 on prompt and padding). ``average=True`` divides by the number of response
    tokens (the length-normalised log-prob of SimPO, ORPO and TRL's IPO).

    Shapes: logits [B, T, V], input_ids [B, T], response_mask [B, T] -> [B].
    """
    logps = token_logps(logits, input_ids, temperature)  # [B, T-1]
    mask = response_mask[:, 1:].bool()  # shifts with the labels
    # where(), not multiply: a -inf log-prob on a masked-out position must not turn into nan.
    total = torch.where(mask, logps, torch.zeros_like(logps)).sum(dim=-1)
    if not average:
        return total
    return total / mask.sum(dim=-1).clamp(min=1)


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of the next-token distribution at every position (a metric for RL: `entropy`).

    Formula: H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v, with p = softmax(z), z = logits / tau.
    The logsumexp form never takes log of a probability that underflowed to 0.

    Shapes: logits [B, T, V] -> [B, T].
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(logits, dim=-1)
    # p * z is 0 * -inf = nan for masked-out vocabulary entries; those contribute 0 to the entropy.
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(probs))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)


# Tokens per LM-head chunk in `chunked_head_logps`. A chunk's backward holds about five [C, V] float32 buffers
# (logits, exp, softmax, gathered gradient, their sum): 5 × 48 MiB at C = 256 and SmolLM2's V = 49,152. Measured
# on that model (docs/notes.md, issue 13), one DPO forward+backward of 8 pairs: peak RSS 5,739 MiB unchunked, 5,309
# at 1024, 4,834 at 512, 4,593 at 256; the head's CPU time is the same (±4%) from 128 to 1024 tokens a chunk.
HEAD_CHUNK_TOKENS = 256


class HeadLogps(NamedTuple):
    """Output of `chunked_head_logps`: [N] tensors, the optional ones None unless asked for."""

    logps: Tensor  # [N] float32: log p(target)
    entropy: Tensor | None  # [N] float32: entropy of the next-token distribution, nats
    target_is_argmax: Tensor | None  # [N] bool: the target is the most likely token (a metric, no gradient)


def chunked_head_logps(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    target_ids: Tensor,
    temperature: float = 1.0,
    chunk_size: int = HEAD_CHUNK_TOKENS,
    with_entropy: bool = False,
    with_argmax: bool = False,
) -> HeadLogps:
    """Log-probs of `target_ids` under the LM head, chunk_size tokens at a time: no [N, V] tensor is kept.

    Per chunk of hidden states h [C, H]: z = head(h) (half precision upcast to float32) / tau, then

        logp = z[y] - logsumexp(z)                      (= log softmax(z)[y])
        H    = logsumexp(z) - sum_v softmax(z)_v z_v     (entropy, when asked for)

    the same formulas as `token_logps` / `token_entropy`, on gathered positions instead of [B, T, V].
    With autograd on, each chunk runs under non-reentrant `torch.utils.checkpoint`: its [C, V]
    logits are not saved but recomputed in the backward, so what the graph keeps is [C, V]-free and
    the backward holds one chunk's [C, V] buffers at a time. The price is a second head matmul per
    token in the backward (measured in docs/notes.md). Under no_grad it is a plain loop.

    Shapes: hidden [N, H], target_ids [N] -> HeadLogps of [N] tensors (N = 0 gives empty ones).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    score = partial(_head_chunk, head=head, temperature=temperature, with_entropy=with_entropy,
                    with_argmax=with_argmax)  # fmt: skip
    chunks = []
    for start in range(0, max(hidden.shape[0], 1), chunk_size):  # N = 0: one empty chunk keeps the graph
        hidden_chunk, target_chunk = hidden[start : start + chunk_size], target_ids[start : start + chunk_size]
        if torch.is_grad_enabled():
            chunks.append(checkpoint(score, hidden_chunk, target_chunk, use_reentrant=False))
        else:
            chunks.append(score(hidden_chunk, target_chunk))
    logps, entropy, hits = (torch.cat(parts) if parts[0] is not None else None for parts in zip(*chunks, strict=True))
    return HeadLogps(logps, entropy, hits)


def _head_chunk(
    hidden: Tensor, target_ids: Tensor, *, head: Callable[[Tensor], Tensor], temperature: float,
    with_entropy: bool, with_argmax: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:  # fmt: skip
    """One chunk of `chunked_head_logps`: [C, H], [C] -> [C] log-probs, entropy, argmax hits."""
    logits = head(hidden)  # [C, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)  # [C]
    logps = logits.gather(-1, target_ids[:, None]).squeeze(-1) - log_norm
    entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1) if with_entropy else None
    hits = (logits.argmax(-1) == target_ids) if with_argmax else None
    return logps, entropy, hits

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

import torch
from torch import Tensor


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

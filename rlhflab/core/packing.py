"""Prefix-shared packed forward: one prompt, many completions, one pass.

DPO scores (prompt, chosen, rejected) and GRPO scores (prompt, k completions). Padding every
prompt+completion pair to the longest one recomputes each prompt n times and wastes compute on
padding. Here every *group* (one prompt and its n completions) is laid out once in a row, and
several groups share a row:

    row 0:  [ P0 P0 P0 | a a a e | b b e | P1 P1 | c c c e | pad pad ]
             prompt 0    compl 0   compl 1  prompt 1  compl 2
    pos:      0  1  2    3 4 5 6   3 4 5    0  1     2 3 4 5   0   0

    who may attend to whom (row 0, the first group; 1 = allowed):

              P0 P0 P0  a  a  a  e  b  b  e
        P0  [ 1                              ]   prompt: causal within the prompt
        P0  [ 1  1                           ]
        P0  [ 1  1  1                        ]
        a   [ 1  1  1   1                    ]   completion: its prompt + itself, causally
        a   [ 1  1  1   1  1                 ]
        ...
        b   [ 1  1  1               1        ]   ...never the sibling completion
        b   [ 1  1  1               1  1     ]

Position ids restart after the prompt for every completion (completion j's first token has
position len(prompt)) and restart at 0 for every group, so each completion sees exactly the
positions and keys it would see in its own unpadded forward. Nothing attends across groups.
Padding attends only to itself (a fully masked row would give NaNs).

Log-prob convention: logits at position t predict the token at t+1. Completion token i of a
completion is predicted by the previous token of that completion, except token 0, which is
predicted by the *last prompt token* -- the same position for every completion of a group.

The attention mask is a 4D float additive mask ``[R, 1, L, L]`` (0 = allowed, dtype min =
masked), which transformers passes through unchanged to the attention kernel:

- ``sdpa``: float additive masks (and boolean ones) are handled by
  ``torch.nn.functional.scaled_dot_product_attention``.
- ``eager``: the mask is *added* to the attention scores, so it must be additive float; a
  boolean mask is silently added as 0/1 and gives wrong logits (errors ~0.3). Hence float.
- anything else (flash attention, flex attention, ...) ignores or rejects a dense 4D mask and
  raises an error here.

API::

    packed = pack_groups([(prompt_ids, [completion_ids, ...]), ...], max_row_tokens=1024)
    out = packed_forward(model, packed.to(device), temperature=1.0)
    out.sequence_logps          # [N_seq] sum of log p over each completion, input order
    values, mask = to_padded(out.token_logps, packed)   # [N_seq, T] for per-token losses
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, fields

import torch

from rlhflab.core.causal_lm import backbone_and_head
from rlhflab.core.logprobs import HEAD_CHUNK_TOKENS, chunked_head_logps

SUPPORTED_ATTENTION = ("sdpa", "eager")

# Rows are padded to a multiple of this many tokens. The matmul shapes (rows × row length) then
# repeat from step to step, so oneDNN reuses its compiled bf16 kernels instead of building new
# ones for every new length and keeping them all cached: at 30M, DPO bf16 ran 4% faster with
# 250 MiB less peak RSS, and fp32 7% faster (benchmarks/README.md).
ROW_MULTIPLE = 16

Group = tuple[list[int], list[list[int]]]


@dataclass
class PackedBatch:
    """Packed groups and the indices that gather every completion token's log-prob.

    N_seq completions are numbered 0..N_seq-1 in input order (group by group, completion by
    completion); N_tok is the total number of completion tokens.
    """

    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long
    attention_mask: torch.Tensor  # [R, 1, L, L] float additive: 0 allowed, finfo.min masked
    logit_index: torch.Tensor  # [N_tok] flat index into R*L of the position predicting each token
    target_ids: torch.Tensor  # [N_tok] the completion tokens
    sequence_index: torch.Tensor  # [N_tok] which completion each token belongs to
    token_position: torch.Tensor  # [N_tok] index of the token within its completion
    token_index: torch.Tensor  # [N_tok] flat index into R*L of the token's own slot; -1 if trimmed (not laid out)
    completion_lengths: torch.Tensor  # [N_seq] long
    group_index: torch.Tensor  # [N_seq] which group (prompt) each completion belongs to
    num_tokens: int  # real tokens laid out (each prompt once)
    num_computed_tokens: int  # R * L: what the model actually processes, row padding included
    num_naive_tokens: int  # N_seq * longest prompt+completion: one padded row per pair

    def to(self, device: torch.device | str) -> PackedBatch:
        """Move every tensor to `device`; counts are kept."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedBatch(**moved)

    @property
    def num_sequences(self) -> int:
        return int(self.completion_lengths.numel())


@dataclass
class PackedLogps:
    """Output of `packed_forward`."""

    token_logps: torch.Tensor  # [N_tok]
    token_entropy: torch.Tensor | None  # [N_tok], when asked for
    sequence_logps: torch.Tensor  # [N_seq] sum over each completion's tokens
    sequence_lengths: torch.Tensor  # [N_seq] token counts (== packed.completion_lengths)


def _first_fit_rows(lengths: list[int], max_row_tokens: int) -> list[list[int]]:
    """Assign groups (by length) to rows, first fit in input order; a long group gets its own row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g, length in enumerate(lengths):
        for r in range(len(rows)):
            if room[r] >= length:
                rows[r].append(g)
                room[r] -= length
                break
        else:
            rows.append([g])
            room.append(max_row_tokens - length)  # negative for an oversize group: nothing else fits
    return rows


def _round_up(tokens: int, multiple: int) -> int:
    """A row of `tokens` tokens padded to a multiple of `multiple` (see ROW_MULTIPLE)."""
    return -(-tokens // multiple) * multiple


def _spread_rows(lengths: list[int], num_rows: int) -> list[list[int]]:
    """Longest group first into the currently shortest of `num_rows` rows (LPT)."""
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    fills = [(0, r) for r in range(num_rows)]  # a heap of (tokens, row)
    for g in sorted(range(len(lengths)), key=lambda g: -lengths[g]):
        fill, r = heapq.heappop(fills)
        rows[r].append(g)
        heapq.heappush(fills, (fill + lengths[g], r))
    return [row for row in rows if row]


def _balanced_rows(lengths: list[int], max_row_tokens: int, row_multiple: int,
                   attention_break_even: int | None = None) -> list[list[int]]:
    """The cheapest layout within the budget: fewest token slots (rows × padded row length W), or with
    `attention_break_even` L0 the fewest slots · (1 + W / L0), which counts attention's cost too.

    Every row is padded to the longest, so first fit can waste a lot: of groups of 290, 288, 286,
    284, 282, 280, 250 and 240 tokens in rows of 512 (GRPO groups of similar length), first fit
    pairs only the last two, and that pair pads all seven rows to 496 (3,472 slots), where one
    group a row takes 8 × 304 = 2,432. So: first fit gives the fewest rows; then, for that many
    rows and every larger count, groups are spread longest first into the shortest row, and the
    cheapest layout wins (ties: the shorter rows). Rows keep their groups in input order and are
    ordered by their first group (sequence numbering never depends on rows).

    A slot's matmuls cost the same in any row, but its attention is ∝ W: the dense 4D mask lets no
    kernel skip the masked blocks, so a row of several groups pays for attention across all of them
    (see `core.causal_lm.attention_break_even` for L0). Measured on SmolLM2-135M (L0 = 3,073), DPO,
    8 pairs of ≈ 328 tokens in rows of 1,024: slots alone pick 4 × 656 (2,624 slots) over 8 × 336
    (2,688), and a policy forward + backward took 31.6 s on one CPU thread against 28.5 s for 8 × 336.
    """
    rows = _first_fit_rows(lengths, max_row_tokens)
    longest_group = max(lengths)
    if longest_group > max_row_tokens or (len(rows) == 1 and attention_break_even is None):
        return rows  # an oversize group sets the width; one row has the fewest slots
    # cost ∝ slots · (L0 + W) (the 1 + W / L0 above, times L0: integers, so ties are exact), then W.
    break_even = attention_break_even

    def lower_bound(num_rows: int) -> int:  # every row is at least the longest group long
        return num_rows * longest_group * (longest_group + break_even if break_even else 1)

    def cost(layout: list[list[int]]) -> tuple[int, int]:
        width = _round_up(max(sum(lengths[g] for g in row) for row in layout), row_multiple)
        return len(layout) * width * (width + break_even if break_even else 1), width

    best, best_cost = rows, cost(rows)
    for num_rows in range(len(rows), len(lengths) + 1):
        if lower_bound(num_rows) >= best_cost[0]:
            break
        spread = _spread_rows(lengths, num_rows)
        if max(sum(lengths[g] for g in row) for row in spread) <= max_row_tokens and cost(spread) < best_cost:
            best, best_cost = spread, cost(spread)
    return sorted((sorted(row) for row in best), key=lambda row: row[0])


def pack_groups(
    groups: list[Group],
    max_row_tokens: int = 1024,
    pad_token_id: int = 0,
    dtype: torch.dtype = torch.float32,
    trim_final_tokens: bool = False,
    row_multiple: int = ROW_MULTIPLE,
    attention_break_even: int | None = None,
) -> PackedBatch:
    """Pack (prompt, [completion, ...]) groups into rows with a prefix-sharing attention mask.

    Each group is ``prompt + c1 + ... + cn`` laid out contiguously (see the module docstring);
    rows are filled up to `max_row_tokens` (first fit, then balanced) and padded with `pad_token_id` to the
    longest row, rounded up to a multiple of `row_multiple`. `dtype` is the attention mask's dtype and must match the model's.
    `attention_break_even` (L0, `core.causal_lm.attention_break_even(model)`) makes the layout cost
    slots · (1 + row length / L0) instead of slots alone (None); see `_balanced_rows`.
    Prompts must be non-empty (the first completion token needs a position to predict it);
    completions may be empty (they get a log-prob of 0 and length 0).

    `trim_final_tokens` leaves each completion's last token out of the rows: it is only a target
    (predicted by the token before it), predicts nothing itself and nothing attends to it, so
    dropping it changes no log-prob and saves one token per completion. Use it when only the
    completion log-probs are needed (DPO); `num_tokens` still counts every token of the groups.
    """
    if not groups:
        raise ValueError("pack_groups needs at least one group")
    if attention_break_even is not None and attention_break_even <= 0:
        raise ValueError(f"attention_break_even must be a positive row length, got {attention_break_even}")
    for g, (prompt, completions) in enumerate(groups):
        if len(prompt) == 0:
            raise ValueError(f"group {g}: empty prompt; the first completion token needs a prompt token")
        if len(completions) == 0:
            raise ValueError(f"group {g}: no completions")
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in groups]
    cut = int(trim_final_tokens)  # tokens of each completion left out of the rows
    laid_out = [len(p) + sum(max(len(c) - cut, 0) for c in cs) for p, cs in groups]
    rows = _balanced_rows(laid_out, max_row_tokens, row_multiple, attention_break_even)
    num_rows = len(rows)
    row_len = _round_up(max(sum(laid_out[g] for g in row) for row in rows), row_multiple)

    input_ids = torch.full((num_rows, row_len), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, row_len), dtype=torch.long)
    # Per-token tags from which the mask is computed in one vectorised step:
    # which group in the row (-1 = padding) and which segment (0 = prompt, j + 1 = completion j).
    group_tag = torch.full((num_rows, row_len), -1, dtype=torch.long)
    segment_tag = torch.zeros((num_rows, row_len), dtype=torch.long)

    # Sequence numbering follows input order, whatever row a group lands in.
    first_sequence = [0]
    for _, completions in groups:
        first_sequence.append(first_sequence[-1] + len(completions))
    num_sequences = first_sequence[-1]
    completion_lengths = torch.zeros(num_sequences, dtype=torch.long)
    group_index = torch.zeros(num_sequences, dtype=torch.long)

    logit_index: list[int] = []
    target_ids: list[int] = []
    sequence_index: list[int] = []
    token_position: list[int] = []
    token_index: list[int] = []
    for r, row in enumerate(rows):
        start = 0
        for g in row:
            prompt, completions = groups[g]
            n_prompt = len(prompt)
            input_ids[r, start : start + n_prompt] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, start : start + n_prompt] = torch.arange(n_prompt)
            group_tag[r, start : start + laid_out[g]] = g
            last_prompt = r * row_len + start + n_prompt - 1  # flat index; predicts every c[0]
            offset = start + n_prompt
            for j, completion in enumerate(completions):
                n = len(completion)
                seq = first_sequence[g] + j
                completion_lengths[seq] = n
                group_index[seq] = g
                width = max(n - cut, 0)  # slots this completion takes in the row
                if width:
                    input_ids[r, offset : offset + width] = torch.tensor(completion[:width], dtype=torch.long)
                position_ids[r, offset : offset + width] = torch.arange(n_prompt, n_prompt + width)
                segment_tag[r, offset : offset + width] = j + 1
                # token i is predicted by token i-1 of the same completion, token 0 by the prompt.
                flat = r * row_len + offset
                if n:
                    logit_index += [last_prompt, *range(flat, flat + n - 1)]
                target_ids += completion
                sequence_index += [seq] * n
                token_position += list(range(n))
                token_index += [*range(flat, flat + width), *[-1] * (n - width)]
                offset += width
            start = offset

    attention_mask = _additive_mask(group_tag, segment_tag, dtype)
    longest_pair = max(len(p) + len(c) for p, cs in groups for c in cs)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        logit_index=torch.tensor(logit_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        sequence_index=torch.tensor(sequence_index, dtype=torch.long),
        token_position=torch.tensor(token_position, dtype=torch.long),
        token_index=torch.tensor(token_index, dtype=torch.long),
        completion_lengths=completion_lengths,
        group_index=group_index,
        num_tokens=sum(lengths),
        num_computed_tokens=num_rows * row_len,
        num_naive_tokens=num_sequences * longest_pair,
    )


def _additive_mask(group_tag: torch.Tensor, segment_tag: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[R, L] tags -> [R, 1, L, L] additive mask (0 allowed, dtype min masked).

    Query q may see key k when both are in the same group, k <= q, and k is in the prompt or in
    q's own segment. Since a group's prompt comes first, this is causal attention within the
    prompt and "prompt + own prefix" for a completion. Padding (tag -1) sees only itself.
    """
    row_len = group_tag.shape[1]
    q_group, k_group = group_tag[:, :, None], group_tag[:, None, :]  # [R, L, 1], [R, 1, L]
    q_seg, k_seg = segment_tag[:, :, None], segment_tag[:, None, :]
    causal = torch.ones(row_len, row_len, dtype=torch.bool).tril()  # [L, L]
    allowed = (q_group == k_group) & (q_group >= 0) & causal & ((k_seg == 0) | (k_seg == q_seg))
    is_pad = group_tag < 0  # [R, L]
    allowed |= torch.diag_embed(is_pad)  # padding attends to itself only
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]  # [R, 1, L, L]


def check_attention_implementation(model: torch.nn.Module) -> str:
    """Return the model's attention implementation; raise if a dense 4D mask is not verified for it."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"packed_forward needs a dense 4D additive attention mask, verified for {SUPPORTED_ATTENTION}; "
            f"this model uses attn_implementation={impl!r}. Load it with attn_implementation='sdpa'."
        )
    return impl


def packed_forward(
    model: torch.nn.Module,
    packed: PackedBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = HEAD_CHUNK_TOKENS,
) -> PackedLogps:
    """Run `model` once over the packed rows and gather every completion token's log-prob.

    log p(token) = logit[token] / T - logsumexp(logits / T), computed only on the gathered
    positions (never a log_softmax over all R*L positions). Differentiable; the caller picks
    train/eval mode and grad mode. Entropy (nats, at temperature T) is returned when asked.

    For the architectures of `core.causal_lm.HEAD_ONLY_WHERE_NEEDED` the backbone's hidden states
    are gathered at the predicting positions ([N_tok, H]) and the LM head runs on them in chunks of
    `chunk_size` tokens (`chunked_head_logps`: no [N_tok, V] tensor is kept for the backward). Any
    other model takes its full forward ([R, L, V] logits) and the same formulas on the gathered rows.
    """
    check_attention_implementation(model)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    inputs = {"input_ids": packed.input_ids, "attention_mask": mask_for(model, packed),
              "position_ids": packed.position_ids, "use_cache": False}  # fmt: skip
    parts = backbone_and_head(model)
    if parts is not None:
        backbone, head = parts
        hidden = backbone(**inputs).last_hidden_state.flatten(0, 1)[packed.logit_index]  # [N_tok, H]
    else:  # the full forward's logits at the gathered positions act as the hidden states of an identity head
        hidden, head = model(**inputs).logits.flatten(0, 1)[packed.logit_index], torch.nn.Identity()  # [N_tok, V]
    scored = chunked_head_logps(hidden, head, packed.target_ids, temperature, chunk_size=chunk_size,
                                with_entropy=with_entropy)  # fmt: skip
    sequence_logps = torch.zeros(
        packed.num_sequences, dtype=scored.logps.dtype, device=scored.logps.device
    ).scatter_add(0, packed.sequence_index, scored.logps)
    return PackedLogps(
        token_logps=scored.logps,
        token_entropy=scored.entropy,
        sequence_logps=sequence_logps,
        sequence_lengths=packed.completion_lengths,
    )


def mask_for(model: torch.nn.Module, packed: PackedBatch) -> torch.Tensor:
    """The packed attention mask in the model's dtype (0 / dtype min re-expressed when they differ)."""
    mask, dtype = packed.attention_mask, next(model.parameters()).dtype
    if mask.dtype == dtype:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask != 0, torch.finfo(dtype).min)


def to_padded(
    values: torch.Tensor, packed: PackedBatch, pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values [N_tok] -> ([N_seq, T], mask [N_seq, T]) with T the longest completion.

    Row s holds completion s's values left-aligned; mask is True on real tokens. Differentiable.
    """
    mask = completion_mask(packed).to(values.device)
    padded = values.new_full(mask.shape, pad_value)
    padded = padded.index_put((packed.sequence_index, packed.token_position), values)
    return padded, mask


def completion_mask(packed: PackedBatch) -> torch.Tensor:
    """[N_seq, T] bool, True on completion s's tokens (left-aligned; T the longest completion)."""
    width = int(packed.completion_lengths.max()) if packed.num_sequences else 0
    lengths = packed.completion_lengths
    return torch.arange(width, device=lengths.device) < lengths[:, None]

"""Tokenization and collation: the one place where response masks are built.

One sequence is `prompt_ids + completion_ids`, padded to the longest in the batch:

    right padding   input_ids       <bos> p1 p2 | c1 c2 <eos> | <pad> <pad>
                    attention_mask    1   1  1  |  1  1   1   |   0     0
                    response_mask     0   0  0  |  1  1   1   |   0     0
                    position_ids      0   1  2  |  3  4   5   |   0     0

    left padding    input_ids       <pad> <pad> | <bos> p1 p2 | c1 c2 <eos>
                    response_mask     0     0   |   0   0  0  |  1  1   1
                    position_ids      0     0   |   0   1  2  |  3  4   5

`response_mask` is aligned with `input_ids` (1 on every completion token, EOS included); the
log-prob code shifts it together with the labels. Padding is never counted, even when pad == eos,
because the mask is built from the token lists' lengths, never from token ids.

Rules:
- BOS: the prompt is tokenized without special tokens, then the tokenizer's BOS (if it has one) is
  prepended unless the text already starts with it (a chat template that writes `{{ bos_token }}`),
  so there is exactly one BOS.
- EOS: string completions get the tokenizer's EOS appended unless they already end with it.
  Conversational completions are the chat template's rendering of the whole conversation minus its
  rendering of the prompt (with `add_generation_prompt=True`); they end at the template's own end
  token, exactly as the template emits it: anything after the last end-of-turn token
  (`template_end_token`, e.g. ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`) or EOS -- template
  whitespace such as ChatML's trailing newline -- is dropped, since generation stops at that token
  (`models.loading.stop_token_ids`); a template that writes no such token gets EOS appended.
  Sampled and collated completions so end the same way, and the end token is part of the response.
- Truncation: a prompt longer than `max_prompt_tokens` keeps its last tokens (left truncation), with
  its BOS kept in front and counted in the budget; a completion longer than `max_completion_tokens`
  is cut at the end and then has no EOS. Each example records whether it was truncated; a
  `TruncationCounter` passed as `counter=` (or `truncation_report` afterwards) turns the counts into
  the one warning the caller prints, e.g. "12 of 2400 prompts truncated to 64 tokens".
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rlhflab.core.packing import PackedBatch, pack_groups
from rlhflab.data.loading import Content, PreferenceExample, SFTExample
from rlhflab.errors import InputError


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one prompt and its completion (completion empty for prompt-only examples)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    truncated_prompt: bool = False
    truncated_completion: bool = False


Pair = tuple[TokenizedExample, TokenizedExample]  # (chosen, rejected) of one preference pair, same prompt ids


@dataclass
class TruncationCounter:
    """Counts tokenized sequences and truncations, for the one warning the caller prints.

    Pass it as `counter=` to the tokenize functions, then print `message()` if it is not None.
    """

    sequences: int = 0
    prompts_truncated: int = 0
    completions_truncated: int = 0
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None

    def add(
        self, example: TokenizedExample, max_prompt_tokens: int | None, max_completion_tokens: int | None
    ) -> None:
        """Count one tokenized sequence made under these budgets."""
        self.sequences += 1
        self.prompts_truncated += example.truncated_prompt
        self.completions_truncated += example.truncated_completion
        self.max_prompt_tokens, self.max_completion_tokens = max_prompt_tokens, max_completion_tokens

    def message(self) -> str | None:
        """E.g. "12 of 2400 prompts truncated to 64 tokens (kept the last ones)", or None if none were."""
        parts = []
        if self.prompts_truncated:
            parts.append(
                f"{self.prompts_truncated} of {self.sequences} prompts truncated to {self.max_prompt_tokens} "
                "tokens (kept the last ones)"
            )
        if self.completions_truncated:
            parts.append(
                f"{self.completions_truncated} of {self.sequences} completions truncated to "
                f"{self.max_completion_tokens} tokens (cut at the end, so they have no EOS)"
            )
        return "; ".join(parts) or None


def _render(tokenizer: Any, prompt: Content, completion: Content | None) -> tuple[str, str]:
    """(prompt text, completion text); conversations are rendered with the tokenizer's chat template."""
    if isinstance(prompt, str) and (completion is None or isinstance(completion, str)):
        return prompt, completion or ""
    if not isinstance(prompt, list) or not (completion is None or isinstance(completion, list)):
        raise InputError("prompt and completion must both be strings or both be lists of messages")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("conversational data needs a tokenizer with a chat template")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if completion is None:
            return prompt_text, ""
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    except Exception as exc:  # jinja errors (e.g. "roles must alternate") are data problems
        raise InputError(f"the chat template failed on this conversation: {exc}") from None
    if not full_text.startswith(prompt_text):
        raise InputError(
            "the chat template does not render the prompt (with the generation prompt) as a prefix of the "
            "whole conversation, so the completion cannot be cut out of it"
        )
    return prompt_text, full_text[len(prompt_text) :]


def _prompt_ids(tokenizer: Any, text: str, max_tokens: int | None) -> tuple[list[int], bool]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    if bos is not None and ids[0] == bos:
        return [bos, *ids[len(ids) - (max_tokens - 1) :]], True
    return ids[len(ids) - max_tokens :], True


# The template probe's assistant turn; what the template writes after it is how it ends a turn.
_PROBE = "rlhflab-end-of-turn-probe"
_END_TOKENS: weakref.WeakKeyDictionary[Any, tuple[str, int | None]] = weakref.WeakKeyDictionary()


def template_end_token(tokenizer: Any) -> int | None:
    """The id of the special token with which the chat template ends an assistant turn, or None.

    Found by rendering a probe conversation (user, assistant) and reading the first special token the
    template writes after the assistant's text: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>`
    (EOS) for Mistral; None for a template that writes no special token there (plain "role: text" turns).
    Cached per tokenizer and template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    cached = _END_TOKENS.get(tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that cannot render this conversation has no end token we can read
        text = ""
    tail = text[text.rfind(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    special.discard(tokenizer.unk_token_id)  # text the vocabulary lacks (a newline in a tiny BPE) ends nothing
    found = next((i for i in tokenizer.encode(tail, add_special_tokens=False) if i in special), None)
    _END_TOKENS[tokenizer] = (template, found)
    return found


def _completion_ids(
    tokenizer: Any, text: str, conversational: bool, max_tokens: int | None
) -> tuple[list[int], bool]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no EOS token; completions need one to learn to stop")
    ids = tokenizer.encode(text, add_special_tokens=False)
    ends = {eos, template_end_token(tokenizer)} if conversational else set()
    last_end = max((i for i, token in enumerate(ids) if token in ends), default=None)
    if last_end is not None:
        ids = ids[: last_end + 1]  # drop template whitespace after the turn's end token
    elif not ids or ids[-1] != eos:
        ids = [*ids, eos]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    return ids[:max_tokens], True


def _check_budget(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1 (or None for no limit), got {value}")


def tokenize_prompt_completion(
    tokenizer: Any,
    prompt: Content,
    completion: Content,
    max_prompt_tokens: int | None,
    max_completion_tokens: int | None,
    *,
    counter: TruncationCounter | None = None,
) -> TokenizedExample:
    """Tokenize one prompt and completion (strings, or lists of messages) by the module's rules.

    `tokenizer` is a `transformers.PreTrainedTokenizerFast` with an EOS token (and a chat template for
    conversations). A budget of None means no limit; `counter`, if given, counts truncations. Raises InputError (without a location: callers
    holding an example add it) when a conversation cannot be rendered.
    """
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    _check_budget("max_completion_tokens", max_completion_tokens)
    prompt_text, completion_text = _render(tokenizer, prompt, completion)
    prompt_ids, truncated_prompt = _prompt_ids(tokenizer, prompt_text, max_prompt_tokens)
    completion_ids, truncated_completion = _completion_ids(
        tokenizer, completion_text, isinstance(completion, list), max_completion_tokens
    )
    example = TokenizedExample(prompt_ids, completion_ids, truncated_prompt, truncated_completion)
    if counter is not None:
        counter.add(example, max_prompt_tokens, max_completion_tokens)
    return example


def tokenize_prompt(
    tokenizer: Any,
    prompt: Content,
    max_prompt_tokens: int | None,
    *,
    counter: TruncationCounter | None = None,
) -> TokenizedExample:
    """Tokenize a prompt for generation (same BOS and truncation rules; `completion_ids` is empty)."""
    _check_budget("max_prompt_tokens", max_prompt_tokens)
    prompt_text, _ = _render(tokenizer, prompt, None)
    prompt_ids, truncated = _prompt_ids(tokenizer, prompt_text, max_prompt_tokens)
    example = TokenizedExample(prompt_ids, [], truncated, False)
    if counter is not None:
        counter.add(example, max_prompt_tokens, None)
    return example


def tokenize_sft(
    tokenizer: Any,
    example: SFTExample,
    max_prompt_tokens: int | None,
    max_completion_tokens: int | None,
    *,
    counter: TruncationCounter | None = None,
) -> TokenizedExample:
    """`tokenize_prompt_completion` for a loaded example; errors name the example's file and line/row."""
    try:
        return tokenize_prompt_completion(
            tokenizer,
            example.prompt,
            example.completion,
            max_prompt_tokens,
            max_completion_tokens,
            counter=counter,
        )
    except InputError as exc:
        raise example.input_error(str(exc)) from None


def tokenize_preference(
    tokenizer: Any,
    example: PreferenceExample,
    max_prompt_tokens: int | None,
    max_completion_tokens: int | None,
    *,
    counter: TruncationCounter | None = None,
) -> tuple[TokenizedExample, TokenizedExample]:
    """(chosen, rejected), each the shared prompt plus one response; the counter counts both sequences."""
    budgets = (max_prompt_tokens, max_completion_tokens)
    try:
        chosen = tokenize_prompt_completion(
            tokenizer, example.prompt, example.chosen, *budgets, counter=counter
        )
        rejected = tokenize_prompt_completion(
            tokenizer, example.prompt, example.rejected, *budgets, counter=counter
        )
    except InputError as exc:
        raise example.input_error(str(exc)) from None
    return chosen, rejected


def truncation_report(
    examples: Sequence[TokenizedExample], max_prompt_tokens: int | None, max_completion_tokens: int | None
) -> str | None:
    """`TruncationCounter.message()` for sequences already tokenized (counts are per sequence)."""
    counter = TruncationCounter()
    for example in examples:
        counter.add(example, max_prompt_tokens, max_completion_tokens)
    return counter.message()


def collate_sequences(
    examples: Sequence[TokenizedExample], pad_token_id: int, padding_side: Literal["left", "right"] = "right"
) -> dict[str, Any]:
    """Pad prompt + completion sequences into one batch; see the module docstring for the layout.

    Returns `input_ids`, `attention_mask`, `response_mask`, `position_ids` (all LongTensor [B, T];
    positions count real tokens only, so they are right for left padding too) and
    `num_response_tokens` (int, counted from the token lists, for the runtime check against
    `response_mask.sum()`).
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(example.prompt_ids) + len(example.completion_ids) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    response_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = [*example.prompt_ids, *example.completion_ids]
        start = length - len(ids) if padding_side == "left" else 0
        end = start + len(ids)
        input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, start:end] = 1
        response_mask[row, start + len(example.prompt_ids) : end] = 1
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0) * attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "position_ids": position_ids,
        "num_response_tokens": sum(len(example.completion_ids) for example in examples),
    }


def pack_pairs(pairs: Sequence[Pair], max_row_tokens: int, pad_token_id: int, trim_final_tokens: bool = False,
               attention_break_even: int | None = None) -> PackedBatch:
    """Pair i becomes group i = (prompt, [chosen, rejected]): packed sequences 2i (chosen) and 2i + 1 (rejected).

    The prompt is laid out once per pair (core/packing.py). `trim_final_tokens`: leave out each response's
    last token, a target and never an input (for log-probs; a reward model scores that token, so keeps it).
    `attention_break_even`: the model's L0, to weigh attention in the row layout (`pack_groups`).
    """
    return pack_groups(pair_groups(pairs), max_row_tokens, pad_token_id, trim_final_tokens=trim_final_tokens,
                       attention_break_even=attention_break_even)


def pair_groups(pairs: Sequence[Pair]) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, [chosen ids, rejected ids]) of each pair: the groups `pack_pairs` lays out."""
    return [(c.prompt_ids, [c.completion_ids, r.completion_ids]) for c, r in pairs]


def render_mask(
    tokenizer: Any, input_ids: torch.Tensor | Sequence[Any], response_mask: torch.Tensor | Sequence[Any]
) -> str:
    """Each token beside its response-mask bit, one per line (a 2-D batch gets one block per row).

    For debugging and for the `logps.mask_mismatch` message:
        pos mask      id  token
          0    0       2  '<bos>'
          3    1       9  'great'
    """
    ids = torch.as_tensor(input_ids)
    mask = torch.as_tensor(response_mask)
    if ids.shape != mask.shape or ids.dim() not in (1, 2):
        raise ValueError(
            f"input_ids {tuple(ids.shape)} and response_mask {tuple(mask.shape)} must match, 1-D or 2-D"
        )
    if ids.dim() == 1:
        rows = [_render_row(tokenizer, ids.tolist(), mask.tolist())]
    else:
        rows = [
            f"row {row}:\n" + _render_row(tokenizer, ids[row].tolist(), mask[row].tolist())
            for row in range(len(ids))
        ]
    return "\n".join(rows)


def _render_row(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    tokens = tokenizer.convert_ids_to_tokens(ids)
    lines = [" pos mask      id  token"]
    lines += [
        f"{pos:>4} {bit:>4} {tid:>7}  {token!r}"
        for pos, (tid, bit, token) in enumerate(zip(ids, mask, tokens, strict=True))
    ]
    return "\n".join(lines)

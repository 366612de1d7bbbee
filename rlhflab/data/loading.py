"""Load and validate TRL-format datasets: SFT, preference pairs and prompt-only.

Formats (TRL's names; "standard" means strings, "conversational" means lists of
`{"role": ..., "content": ...}` messages):

| kind | fields | example becomes |
|---|---|---|
| SFT, language modelling | `text` | prompt "" + completion text (every token is trained on) |
| SFT, prompt-completion | `prompt`, `completion` (both strings or both message lists) | as given |
| SFT, conversational | `messages` | prompt = all messages but the last; completion = the last |
| preference, explicit prompt | `prompt`, `chosen`, `rejected` | as given |
| preference, implicit prompt | `chosen`, `rejected` | prompt = their shared prefix (see `split_implicit_prompt`) |
| prompt-only | `prompt` | prompt; every other field is kept in `extra` (for reward functions) |

Validation rules, each an `InputError` naming the file, the line (JSON Lines, 1-based) or row
(JSON list, parquet, `datasets`, in-memory: 0-based) and the field:
- a missing field, a wrong type, or a field set to null (parquet and `datasets` fill absent columns with
  null, so null counts as missing);
- an empty or whitespace-only response (completion, chosen, rejected, the text of `text`), or an empty
  prompt in a prompt-only dataset (string prompts may be empty for SFT and preferences);
- a message that is not an object, has a role outside `ROLES`, has no string `content`, or has any
  other non-null key (dropping e.g. `tool_calls` silently would change the example);
- a conversational response whose last message is not from the assistant;
- fields of two formats in one record (ambiguous), or two formats in one file (e.g. standard and
  conversational rows, or explicit and implicit prompts): the first example fixes the file's format;
- an empty file, invalid JSON or UTF-8, duplicate keys (see `rlhflab.data.sources`).
Fields outside the format are ignored for SFT and preferences. Blank lines in JSON Lines are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhflab.data.sources import Where, read_records
from rlhflab.errors import InputError

Message = dict[str, str]
Content = str | list[Message]
ROLES = ("system", "user", "assistant", "tool")
Kind = Literal["sft", "preference", "prompt"]


class _Located:
    """Mixin: an example remembers where it came from, so later stages can point at it."""

    source: str
    line: int | None
    row: int | None

    @property
    def where(self) -> Where:
        return Where(self.source, line=self.line, row=self.row)

    def input_error(self, message: str, field: str | None = None) -> InputError:
        """An InputError naming this example's file, line or row, and `field`."""
        return self.where.error(message, field)


@dataclass(frozen=True)
class SFTExample(_Located):
    """One SFT example; the loss covers `completion` only (for `text`, the prompt is empty)."""

    prompt: Content
    completion: Content
    format: Literal["language_modeling", "prompt_completion", "messages"]
    conversational: bool
    source: str = "<memory>"
    line: int | None = None
    row: int | None = None


@dataclass(frozen=True)
class PreferenceExample(_Located):
    """One preference pair; `chosen` and `rejected` are responses to `prompt` (prompt excluded)."""

    prompt: Content
    chosen: Content
    rejected: Content
    conversational: bool
    implicit_prompt: bool
    source: str = "<memory>"
    line: int | None = None
    row: int | None = None


@dataclass(frozen=True)
class PromptExample(_Located):
    """One prompt for on-policy training or evaluation; `extra` holds the record's other fields."""

    prompt: Content
    conversational: bool
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"
    line: int | None = None
    row: int | None = None


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string"}
    names |= {list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _string(value: Any, name: str, where: Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"expected a string, got {_type_name(value)}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise where.error("invalid Unicode (a lone surrogate such as '\\ud800')", name) from None
    return value


def _messages(value: Any, name: str, where: Where) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise where.error(f"expected a non-empty list of messages, got {_type_name(value)}", name)
    messages = []
    for index, message in enumerate(value):
        at = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise where.error(f"expected a message {{role, content}}, got {_type_name(message)}", at)
        extra = [str(key) for key, v in message.items() if key not in ("role", "content") and v is not None]
        if extra:
            raise where.error(f"unsupported message keys {extra}; a message has 'role' and 'content'", at)
        role = message.get("role")
        if role not in ROLES:
            got = "missing" if role is None else repr(role)
            raise where.error(f"bad role {got}; expected one of {', '.join(ROLES)}", f"{at}.role")
        if message.get("content") is None:
            raise where.error("missing field", f"{at}.content")
        messages.append({"role": role, "content": _string(message["content"], f"{at}.content", where)})
    return messages


def _content(value: Any, name: str, where: Where) -> tuple[Content, bool]:
    """A string (standard) or a list of messages (conversational), and which one it is."""
    if isinstance(value, list):
        return _messages(value, name, where), True
    if isinstance(value, str):
        return _string(value, name, where), False
    raise where.error(f"expected a string or a list of messages, got {_type_name(value)}", name)


def _check_response(response: Content, name: str, where: Where, hint: str = "") -> None:
    """A response must have text; a conversational one must end with the assistant's turn."""
    if isinstance(response, str):
        if not response.strip():
            raise where.error(f"empty response{hint}", name)
        return
    last = f"{name}[{len(response) - 1}]"
    if response[-1]["role"] != "assistant":
        raise where.error(
            f"the last message must be the assistant's, got '{response[-1]['role']}'", f"{last}.role"
        )
    if not response[-1]["content"].strip():
        raise where.error(f"empty response{hint}", f"{last}.content")


def _require(record: dict[str, Any], names: Iterable[str], where: Where, hint: str = "") -> None:
    for name in names:
        if record.get(name) is None:
            raise where.error(f"missing field{hint}", name)


def _same_type(a: bool, b: bool, names: str, where: Where, name: str) -> None:
    if a != b:
        raise where.error(f"{names} must all be strings or all be lists of messages", name)


def _sft(record: dict[str, Any], where: Where) -> SFTExample:
    present = {name for name in ("text", "prompt", "completion", "messages") if record.get(name) is not None}
    place = {"source": where.source, "line": where.line, "row": where.row}
    if present == {"text"}:
        text = _string(record["text"], "text", where)
        _check_response(text, "text", where)
        return SFTExample("", text, "language_modeling", False, **place)
    if present == {"messages"}:
        messages = _messages(record["messages"], "messages", where)
        _check_response(messages, "messages", where)
        if len(messages) < 2:
            raise where.error(
                "a conversation needs a prompt message before the assistant's reply", "messages"
            )
        return SFTExample(messages[:-1], messages[-1:], "messages", True, **place)
    if present <= {"prompt", "completion"} and present:
        hint = " (this looks like a preference dataset)" if "chosen" in record else ""
        _require(record, ("prompt", "completion"), where, hint)
        prompt, conversational = _content(record["prompt"], "prompt", where)
        completion, completion_conversational = _content(record["completion"], "completion", where)
        _same_type(conversational, completion_conversational, "prompt and completion", where, "completion")
        _check_response(completion, "completion", where)
        return SFTExample(prompt, completion, "prompt_completion", conversational, **place)
    if not present:
        raise where.error(
            "missing field: an SFT example needs 'text', 'prompt' + 'completion', or 'messages'"
        )
    fields = ", ".join(f"'{name}'" for name in sorted(present))
    raise where.error(
        f"ambiguous example: fields {fields} belong to different SFT formats", sorted(present)[0]
    )


def split_implicit_prompt(chosen: Content, rejected: Content) -> tuple[Content, Content, Content]:
    """(prompt, chosen response, rejected response) from a pair whose prompt is implicit.

    Conversational: the prompt is every message but the last, which must be the same in both (else
    ValueError); the responses are the last messages. Strings: the prompt is the longest common
    prefix; when the character before the first difference is a space, that space goes to the
    responses instead (TRL's `extract_prompt` rule, so " great" stays one token in BPE vocabularies).
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(
                "chosen and rejected must share every message but the last (the implicit prompt)"
            )
        return chosen[:-1], chosen[-1:], rejected[-1:]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise ValueError("chosen and rejected must both be strings or both be lists of messages")
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if 0 < end < min(len(chosen), len(rejected)) and chosen[end - 1] == " ":
        end -= 1
    return chosen[:end], chosen[end:], rejected[end:]


def _preference(record: dict[str, Any], where: Where) -> PreferenceExample:
    place = {"source": where.source, "line": where.line, "row": where.row}
    _require(record, ("chosen", "rejected"), where)
    chosen, conversational = _content(record["chosen"], "chosen", where)
    rejected, rejected_conversational = _content(record["rejected"], "rejected", where)
    _same_type(conversational, rejected_conversational, "chosen and rejected", where, "rejected")
    if record.get("prompt") is not None:
        prompt, prompt_conversational = _content(record["prompt"], "prompt", where)
        _same_type(conversational, prompt_conversational, "prompt, chosen and rejected", where, "prompt")
        _check_response(chosen, "chosen", where)
        _check_response(rejected, "rejected", where)
        return PreferenceExample(prompt, chosen, rejected, conversational, False, **place)
    if conversational and min(len(chosen), len(rejected)) < 2:
        name = "chosen" if len(chosen) < 2 else "rejected"
        raise where.error(
            "with no 'prompt' field, a conversation needs a prompt message before the reply", name
        )
    try:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    except ValueError as exc:
        raise where.error(str(exc), "rejected") from None
    hint = (
        ""
        if conversational
        else " after removing the implicit prompt (the common prefix of chosen and rejected)"
    )
    _check_response(chosen, "chosen", where, hint)
    _check_response(rejected, "rejected", where, hint)
    return PreferenceExample(prompt, chosen, rejected, conversational, True, **place)


def _prompt(record: dict[str, Any], where: Where) -> PromptExample:
    _require(record, ("prompt",), where)
    prompt, conversational = _content(record["prompt"], "prompt", where)
    if not conversational and not prompt.strip():
        raise where.error("empty prompt", "prompt")
    extra = {key: value for key, value in record.items() if key != "prompt"}
    return PromptExample(prompt, conversational, extra, where.source, where.line, where.row)


def _format_of(example: SFTExample | PreferenceExample | PromptExample) -> tuple[str, str]:
    """(format name, the field that names it) — one file holds one format."""
    style = "conversational" if example.conversational else "standard"
    if isinstance(example, SFTExample):
        first_field = {"language_modeling": "text", "prompt_completion": "prompt", "messages": "messages"}
        return f"{example.format} ({style})", first_field[example.format]
    if isinstance(example, PreferenceExample):
        prompt = "implicit prompt" if example.implicit_prompt else "explicit prompt"
        return f"{prompt} ({style})", "chosen" if example.implicit_prompt else "prompt"
    return f"prompt-only ({style})", "prompt"


_PARSERS: dict[str, Callable[[dict[str, Any], Where], Any]] = {
    "sft": _sft,
    "preference": _preference,
    "prompt": _prompt,
}


def _examples(records: list[tuple[Any, Where]], kind: Kind, source: str) -> list[Any]:
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    if not records:
        raise InputError("empty dataset: no examples (empty file)", file=source)
    examples = []
    first: tuple[str, Where] | None = None
    for record, where in records:
        if not isinstance(record, dict):
            raise where.error(f"expected a JSON object, got {_type_name(record)}")
        example = _PARSERS[kind](record, where)
        name, name_field = _format_of(example)
        if first is None:
            first = (name, where)
        elif name != first[0]:
            raise where.error(
                f"mixed formats: this example is {name} but {first[1].describe()} is {first[0]}; "
                "use one format per dataset",
                name_field,
            )
        examples.append(example)
    return examples


def load_sft(path: str | os.PathLike[str], *, split: str = "train") -> list[SFTExample]:
    """Validated SFT examples from a file, a `datasets` folder or a Hub id (see the module docstring)."""
    return _examples(read_records(path, split), "sft", str(path))


def load_preferences(path: str | os.PathLike[str], *, split: str = "train") -> list[PreferenceExample]:
    """Validated preference pairs (explicit or implicit prompt) from a file, folder or Hub id."""
    return _examples(read_records(path, split), "preference", str(path))


def load_prompts(path: str | os.PathLike[str], *, split: str = "train") -> list[PromptExample]:
    """Validated prompts (other fields kept in `extra`) from a file, folder or Hub id."""
    return _examples(read_records(path, split), "prompt", str(path))


def from_records(records: Iterable[Any], kind: Kind, source: str = "<memory>") -> list[Any]:
    """Validate in-memory records (e.g. from a built-in task) exactly as a file's; rows are 0-based.

    `kind` is "sft", "preference" or "prompt"; returns SFTExample, PreferenceExample or PromptExample.
    """
    rows = [(record, Where(source, row=index)) for index, record in enumerate(records)]
    return _examples(rows, kind, source)

"""Property tests: whatever bytes or records arrive, every loader returns valid examples or raises
InputError — never another exception, never an example that breaks the format's promises."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhflab.data.collate import TokenizedExample, collate_sequences
from rlhflab.data.loading import (
    ROLES,
    PreferenceExample,
    PromptExample,
    SFTExample,
    from_records,
    load_preferences,
    load_prompts,
    load_sft,
)
from rlhflab.errors import InputError

datasets.disable_progress_bars()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOADERS = {"sft": load_sft, "preference": load_preferences, "prompt": load_prompts}
FIELDS = ["text", "prompt", "completion", "messages", "chosen", "rejected", "answer"]

# ---------------------------------------------------------------- strategies

texts = st.text(max_size=12) | st.sampled_from(["", " ", "the movie", "the movie was great", "\ud800"])
# allow_subnormal=False: a training run earlier in the process sets flush-to-zero (training.loop.set_threads),
# after which hypothesis refuses to draw subnormal floats
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_subnormal=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from([*ROLES, "bot", ""]) | json_values, "content": texts | json_values},
        optional={"tool_calls": json_values, "name": st.none()},
    )
    | json_values,
    max_size=3,
)
good_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": texts}), min_size=1, max_size=3
)
field_values = texts | messages | good_messages | json_values
records = st.dictionaries(st.sampled_from(FIELDS), field_values, max_size=4) | json_values
kinds = st.sampled_from(sorted(LOADERS))


def assert_valid(example: Any) -> None:
    """The promises a loaded example keeps, whatever the input was."""

    def check_response(response: Any) -> None:
        if example.conversational:
            assert isinstance(response, list) and response[-1]["role"] == "assistant"
            assert response[-1]["content"].strip()
        else:
            assert isinstance(response, str) and response.strip()

    def check_prompt(prompt: Any) -> None:
        if example.conversational:
            assert isinstance(prompt, list) and prompt
            assert all(set(m) == {"role", "content"} and m["role"] in ROLES for m in prompt)
        else:
            assert isinstance(prompt, str)
        (prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)).encode("utf-8")

    check_prompt(example.prompt)
    if isinstance(example, SFTExample):
        check_response(example.completion)
    elif isinstance(example, PreferenceExample):
        check_response(example.chosen)
        check_response(example.rejected)
    else:
        assert isinstance(example, PromptExample)
        assert example.conversational or example.prompt.strip()


def load_or_input_error(load: Any, *args: Any, **kwargs: Any) -> None:
    try:
        examples = load(*args, **kwargs)
    except InputError as exc:
        str(exc).encode("utf-8")  # the message can be printed
        return
    assert examples
    styles = {(type(example), example.conversational) for example in examples}
    assert len(styles) == 1  # one format per dataset
    for example in examples:
        assert_valid(example)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- in-memory records


@FUZZ
@given(rows=st.lists(records, max_size=4), kind=kinds)
def test_records_load_or_raise_input_error(rows: list[Any], kind: str) -> None:
    load_or_input_error(from_records, rows, kind)


@FUZZ
@given(
    first=st.fixed_dictionaries({"prompt": texts, "completion": texts, "chosen": texts, "rejected": texts}),
    second=st.fixed_dictionaries(
        {
            "prompt": good_messages,
            "completion": good_messages,
            "chosen": good_messages,
            "rejected": good_messages,
        }
    ),
    kind=kinds,
)
def test_mixed_standard_and_conversational_rows(first: dict, second: dict, kind: str) -> None:
    with pytest.raises(InputError):  # a bad row, or else "mixed formats"
        from_records([first, second], kind)


# ---------------------------------------------------------------- files


@FUZZ
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json"]), kind=kinds)
def test_random_bytes(folder: Path, data: bytes, suffix: str, kind: str) -> None:
    path = folder / f"bytes{suffix}"
    path.write_bytes(data)
    load_or_input_error(LOADERS[kind], path)


@FUZZ
@given(
    rows=st.lists(records, min_size=1, max_size=4),
    cut=st.integers(min_value=0, max_value=400),
    noise=st.sampled_from([b"", b"\xff", b"\xc3", b"\n\n", b'"', b"}"]),
    kind=kinds,
)
def test_truncated_and_corrupted_jsonl(
    folder: Path, rows: list[Any], cut: int, noise: bytes, kind: str
) -> None:
    data = "\n".join(json.dumps(row) for row in rows).encode("utf-8", "surrogatepass")
    path = folder / "rows.jsonl"
    path.write_bytes(data[:cut] + noise + data[cut:] if cut % 2 else data[:cut])
    load_or_input_error(LOADERS[kind], path)


@FUZZ
@given(
    rows=st.lists(records, max_size=4), cut=st.none() | st.integers(min_value=0, max_value=300), kind=kinds
)
def test_json_list_files(folder: Path, rows: list[Any], cut: int | None, kind: str) -> None:
    data = json.dumps(rows).encode("utf-8", "surrogatepass")
    path = folder / "rows.json"
    path.write_bytes(data if cut is None else data[:cut])
    load_or_input_error(LOADERS[kind], path)


@FUZZ
@given(key=st.sampled_from(FIELDS), first=texts, second=texts, nested=st.booleans(), kind=kinds)
def test_duplicate_keys_are_errors(
    folder: Path, key: str, first: str, second: str, nested: bool, kind: str
) -> None:
    pair = f"{json.dumps(key)}: {json.dumps(first)}, {json.dumps(key)}: {json.dumps(second)}"
    line = f'{{"messages": [{{{pair}}}]}}' if nested else f"{{{pair}}}"
    path = folder / "dup.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="duplicate key"):
        LOADERS[kind](path)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(
        st.fixed_dictionaries({}, optional={name: st.none() | st.text(max_size=8) for name in FIELDS}),
        min_size=1,
        max_size=3,
    ),
    columnar=st.sampled_from(["parquet", "datasets"]),
    kind=kinds,
)
def test_columnar_files(folder: Path, rows: list[dict], columnar: str, kind: str) -> None:
    if columnar == "parquet":
        path = folder / "rows.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        path = folder / f"saved{abs(hash(str(rows)))}"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    load_or_input_error(LOADERS[kind], path)


@FUZZ
@given(data=st.binary(max_size=100), kind=kinds)
def test_random_parquet_bytes(folder: Path, data: bytes, kind: str) -> None:
    path = folder / "bytes.parquet"
    path.write_bytes(data)
    with pytest.raises(InputError):
        LOADERS[kind](path)


# ---------------------------------------------------------------- collation invariants

token_lists = st.lists(st.integers(min_value=0, max_value=50), max_size=6)
tokenized = st.builds(TokenizedExample, token_lists, token_lists)


@FUZZ
@given(examples=st.lists(tokenized, min_size=1, max_size=4), pad=st.integers(min_value=0, max_value=50))
def test_collated_masks_match_the_token_lists(examples: list[TokenizedExample], pad: int) -> None:
    right = collate_sequences(examples, pad, "right")
    left = collate_sequences(examples, pad, "left")
    for batch in (right, left):
        assert batch["num_response_tokens"] == int(batch["response_mask"].sum())
        assert (batch["response_mask"] <= batch["attention_mask"]).all()
        for row, example in enumerate(examples):
            keep = batch["attention_mask"][row].bool()
            assert batch["input_ids"][row][keep].tolist() == example.prompt_ids + example.completion_ids
            assert (
                batch["input_ids"][row][batch["response_mask"][row].bool()].tolist() == example.completion_ids
            )
            assert batch["position_ids"][row][keep].tolist() == list(range(int(keep.sum())))

"""Data loading, validation and collation: every TRL format from every container, every malformed
input as one InputError naming file, line/row and field, and the response-mask rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.data.collate import (
    TokenizedExample,
    TruncationCounter,
    collate_sequences,
    render_mask,
    tokenize_preference,
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_sft,
    truncation_report,
)
from rlhflab.data.loading import (
    from_records,
    load_preferences,
    load_prompts,
    load_sft,
    split_implicit_prompt,
)
from rlhflab.errors import InputError

# ---------------------------------------------------------------- writers for every container


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_json(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def write_parquet(path: Path, records: list[Any]) -> Path:
    path = path.with_suffix(".parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), path)
    return path


def write_saved_dataset(path: Path, records: list[Any]) -> Path:
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


WRITERS = {
    "jsonl": write_jsonl,
    "json": write_json,
    "parquet": write_parquet,
    "datasets": write_saved_dataset,
}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def location(example: Any, container: str, index: int) -> None:
    if container == "jsonl":
        assert (example.line, example.row) == (index + 1, None)
    else:
        assert (example.line, example.row) == (None, index)


# ---------------------------------------------------------------- every format loads from every container


SFT_CASES = {
    "language_modeling": (
        [{"text": "the movie was great"}, {"text": "the food was bad"}],
        [("", "the movie was great"), ("", "the food was bad")],
        False,
    ),
    "prompt_completion": (
        [
            {"prompt": "the movie was", "completion": " great"},
            {"prompt": "the food", "completion": " was bad"},
        ],
        [("the movie was", " great"), ("the food", " was bad")],
        False,
    ),
    "messages": (
        [
            {"messages": [user("hello"), assistant("the movie")]},
            {"messages": [user("hi"), assistant("world")]},
        ],
        [([user("hello")], [assistant("the movie")]), ([user("hi")], [assistant("world")])],
        True,
    ),
    "conversational_prompt_completion": (
        [{"prompt": [user("hello")], "completion": [assistant("great")]}],
        [([user("hello")], [assistant("great")])],
        True,
    ),
}


@pytest.mark.parametrize("container", sorted(WRITERS))
@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_sft_formats_load_from_every_container(tmp_path: Path, container: str, case: str) -> None:
    records, expected, conversational = SFT_CASES[case]
    path = WRITERS[container](tmp_path / "sft", records)
    examples = load_sft(path)
    assert [(example.prompt, example.completion) for example in examples] == expected
    assert all(example.conversational == conversational for example in examples)
    assert examples[0].source == str(path)
    for index, example in enumerate(examples):
        location(example, container, index)


PREFERENCE_CASES = {
    "explicit": (
        [{"prompt": "the movie was", "chosen": " great", "rejected": " bad", "score": 1.0}],
        [("the movie was", " great", " bad")],
        (False, False),
    ),
    "explicit_conversational": (
        [{"prompt": [user("hi")], "chosen": [assistant("great")], "rejected": [assistant("bad")]}],
        [([user("hi")], [assistant("great")], [assistant("bad")])],
        (True, False),
    ),
    "implicit": (
        [{"chosen": "the movie was great", "rejected": "the movie was bad"}],
        [("the movie was", " great", " bad")],
        (False, True),
    ),
    "implicit_conversational": (
        [{"chosen": [user("hi"), assistant("great")], "rejected": [user("hi"), assistant("bad")]}],
        [([user("hi")], [assistant("great")], [assistant("bad")])],
        (True, True),
    ),
}


@pytest.mark.parametrize("container", sorted(WRITERS))
@pytest.mark.parametrize("case", sorted(PREFERENCE_CASES))
def test_preference_formats_load_from_every_container(tmp_path: Path, container: str, case: str) -> None:
    records, expected, (conversational, implicit) = PREFERENCE_CASES[case]
    examples = load_preferences(WRITERS[container](tmp_path / "pref", records))
    assert [(example.prompt, example.chosen, example.rejected) for example in examples] == expected
    assert [(example.conversational, example.implicit_prompt) for example in examples] == [
        (conversational, implicit)
    ]
    location(examples[0], container, 0)


@pytest.mark.parametrize("container", sorted(WRITERS))
@pytest.mark.parametrize("conversational", [False, True])
def test_prompt_formats_load_from_every_container(
    tmp_path: Path, container: str, conversational: bool
) -> None:
    prompts = [[user("2+2=")], [user("3+5=")]] if conversational else ["2+2=", "3+5="]
    records = [{"prompt": prompts[0], "answer": "4"}, {"prompt": prompts[1], "answer": "8"}]
    examples = load_prompts(WRITERS[container](tmp_path / "prompts", records))
    assert [example.prompt for example in examples] == prompts
    assert [example.extra for example in examples] == [{"answer": "4"}, {"answer": "8"}]
    assert all(example.conversational == conversational for example in examples)
    location(examples[1], container, 1)


def test_saved_dataset_dict_uses_the_split(tmp_path: Path) -> None:
    train = datasets.Dataset.from_list([{"prompt": "a"}])
    test = datasets.Dataset.from_list([{"prompt": "b"}, {"prompt": "c"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert [example.prompt for example in load_prompts(tmp_path / "dd")] == ["a"]
    assert [example.prompt for example in load_prompts(tmp_path / "dd", split="test")] == ["b", "c"]
    with pytest.raises(InputError, match="no split 'validation'"):
        load_prompts(tmp_path / "dd", split="validation")


def test_from_records_numbers_rows_and_validates() -> None:
    examples = from_records([{"prompt": "a"}, {"prompt": "b"}], "prompt", source="task:arithmetic")
    assert [(example.source, example.row) for example in examples] == [
        ("task:arithmetic", 0),
        ("task:arithmetic", 1),
    ]
    with pytest.raises(InputError) as info:
        from_records([{"prompt": "a"}, {"prompt": ""}], "prompt", source="task:arithmetic")
    assert str(info.value) == "file task:arithmetic, row 1, field 'prompt': empty prompt"
    assert (info.value.file, info.value.field, info.value.row) == ("task:arithmetic", "prompt", 1)
    with pytest.raises(ValueError, match="kind"):
        from_records([{"prompt": "a"}], "rl")  # type: ignore[arg-type]


def test_blank_lines_are_skipped_and_line_numbers_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"text": "a"}\n   \n\r\n{"text": "b"}\n\n{"text": ""}\n', encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert info.value.line == 7
    path.write_text('\n{"text": "a"}\n   \n{"text": "b"}\n\n', encoding="utf-8")
    assert [example.line for example in load_sft(path)] == [2, 4]


def test_huge_line_loads(tmp_path: Path) -> None:
    text = "word " * 400_000
    [example] = load_sft(write_jsonl(tmp_path / "big", [{"text": text}]))
    assert example.completion == text


def test_implicit_prompt_rule() -> None:
    assert split_implicit_prompt("the movie was great", "the movie was bad") == (
        "the movie was",
        " great",
        " bad",
    )
    assert split_implicit_prompt("abcd", "abxy") == ("ab", "cd", "xy")  # mid-word, as TRL does
    assert split_implicit_prompt("no", "yes") == ("", "no", "yes")
    chosen, rejected = [user("q"), assistant("a")], [user("q"), assistant("b")]
    assert split_implicit_prompt(chosen, rejected) == ([user("q")], [assistant("a")], [assistant("b")])
    with pytest.raises(ValueError, match="share every message but the last"):
        split_implicit_prompt([user("q"), assistant("a")], [user("r"), assistant("b")])


# ---------------------------------------------------------------- malformed input: one InputError each


def jsonl_lines(tmp_path: Path, lines: list[str | bytes]) -> Path:
    path = tmp_path / "bad.jsonl"
    raw = [line if isinstance(line, bytes) else line.encode("utf-8") for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def assert_names(error: InputError, path: Path, line: int | None, field: str | None, words: str) -> None:
    text = str(error)
    assert str(path) in text and error.file == str(path)
    if line is not None:
        assert f"line {line}" in text and error.line == line
    if field is not None:
        assert f"field '{field}'" in text and error.field == field
    assert words in text


GOOD_SFT = '{"prompt": "the movie", "completion": " was great"}'

MALFORMED_SFT = {
    "missing_field": ('{"prompt": "the movie"}', "completion", "missing field"),
    "null_field": ('{"prompt": "the movie", "completion": null}', "completion", "missing field"),
    "wrong_type": ('{"prompt": 3, "completion": "x"}', "prompt", "expected a string or a list of messages"),
    "empty_response": ('{"prompt": "the movie", "completion": "  "}', "completion", "empty response"),
    "empty_text": ('{"text": ""}', "text", "empty response"),
    "bad_role": (
        '{"messages": [{"role": "robot", "content": "hi"}]}',
        "messages[0].role",
        "bad role 'robot'",
    ),
    "missing_role": ('{"messages": [{"content": "hi"}]}', "messages[0].role", "bad role missing"),
    "missing_content": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}',
        "messages[1].content",
        "missing field",
    ),
    "content_not_string": (
        '{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}',
        "messages[0].content",
        "expected a string",
    ),
    "message_not_object": ('{"messages": ["hi"]}', "messages[0]", "expected a message"),
    "extra_message_key": (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [1]}]}',
        "messages[1]",
        "unsupported message keys ['tool_calls']",
    ),
    "last_turn_not_assistant": (
        '{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}',
        "messages[1].role",
        "must be the assistant's",
    ),
    "only_one_message": (
        '{"messages": [{"role": "assistant", "content": "hi"}]}',
        "messages",
        "prompt message",
    ),
    "empty_messages": ('{"messages": []}', "messages", "non-empty list of messages"),
    "mixed_types_in_example": (
        '{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}',
        "completion",
        "must all be strings or all be lists",
    ),
    "ambiguous": ('{"text": "a", "prompt": "b", "completion": "c"}', "completion", "ambiguous example"),
    "duplicate_key": ('{"prompt": "a", "completion": "b", "prompt": "c"}', "prompt", "duplicate key"),
    "lone_surrogate": ('{"prompt": "a", "completion": "b\\ud800"}', "completion", "invalid Unicode"),
    "mixed_formats": ('{"text": "the movie was great"}', "text", "mixed formats"),
    "mixed_conversational": (
        '{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "x"}]}',
        "prompt",
        "mixed formats: this example is prompt_completion (conversational) but",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SFT))
def test_malformed_sft_line_is_one_input_error(tmp_path: Path, case: str) -> None:
    bad, field, words = MALFORMED_SFT[case]
    path = jsonl_lines(tmp_path, [GOOD_SFT, "", bad])
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert_names(info.value, path, 3, field, words)


def test_invalid_utf8_names_line_and_field(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path, [GOOD_SFT, b'{"prompt": "a", "completion": "caf\xe9"}'])
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert_names(info.value, path, 2, "completion", "invalid UTF-8")


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path, [GOOD_SFT, GOOD_SFT, '{"prompt": "a", "completion": "b"'])
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert_names(info.value, path, 3, None, "invalid JSON")


def test_non_object_line(tmp_path: Path) -> None:
    path = jsonl_lines(tmp_path, ['["the movie", "great"]'])
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert_names(info.value, path, 1, None, "expected a JSON object, got list")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_sft(path)
    assert_names(info.value, path, None, None, "no examples")


def test_empty_json_list(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no examples"):
        load_prompts(write_json(tmp_path / "empty", []))


MALFORMED_PREFERENCES = {
    "missing_rejected": ({"prompt": "a", "chosen": "b"}, "rejected", "missing field"),
    "wrong_type": ({"prompt": "a", "chosen": "b", "rejected": 7}, "rejected", "got number"),
    "empty_chosen": ({"prompt": "a", "chosen": "", "rejected": "c"}, "chosen", "empty response"),
    "identical_implicit": (
        {"chosen": "same", "rejected": "same"},
        "chosen",
        "after removing the implicit prompt",
    ),
    "prefix_implicit": ({"chosen": "the movie", "rejected": "the movie was bad"}, "chosen", "empty response"),
    "different_prompts": (
        {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
        "rejected",
        "share every message but the last",
    ),
    "no_prompt_message": (
        {"chosen": [assistant("x")], "rejected": [user("b"), assistant("y")]},
        "chosen",
        "prompt message before the reply",
    ),
    "mixed_chosen_rejected": (
        {"chosen": [user("a"), assistant("x")], "rejected": "y"},
        "rejected",
        "must all be",
    ),
    "implicit_after_explicit": (
        {"chosen": "the movie was great", "rejected": "the movie was bad"},
        "chosen",
        "mixed",
    ),
}


@pytest.mark.parametrize("container", sorted(WRITERS))
@pytest.mark.parametrize("case", sorted(MALFORMED_PREFERENCES))
def test_malformed_preferences_name_row(tmp_path: Path, container: str, case: str) -> None:
    bad, field, words = MALFORMED_PREFERENCES[case]
    if container in ("parquet", "datasets") and case in ("wrong_type", "mixed_chosen_rejected"):
        pytest.skip("a columnar file cannot hold two types in one column")
    first: dict[str, Any] = {"prompt": "the movie", "chosen": " was great", "rejected": " was bad"}
    if isinstance(bad["chosen"], list):  # columnar files need one type per column
        first = {"chosen": [user("q"), assistant("x")], "rejected": [user("q"), assistant("y")]}
    records = [first, bad]
    path = WRITERS[container](tmp_path / "pref", records)
    with pytest.raises(InputError) as info:
        load_preferences(path)
    error = info.value
    assert_names(error, path, 2 if container == "jsonl" else None, field, words)
    if container != "jsonl":
        assert "row 1" in str(error) and error.row == 1


def test_malformed_prompts(tmp_path: Path) -> None:
    for bad, field, words in [
        ({"question": "a"}, "prompt", "missing field"),
        ({"prompt": "   "}, "prompt", "empty prompt"),
        ({"prompt": {"text": "a"}}, "prompt", "got object"),
    ]:
        path = write_json(tmp_path / "p", [{"prompt": "fine"}, bad])
        with pytest.raises(InputError) as info:
            load_prompts(path)
        assert_names(info.value, path, None, field, words)
        assert "row 1" in str(info.value)


def test_json_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n {"prompt": "a"},\n {"prompt": "b",}\n]')
    with pytest.raises(InputError, match="invalid JSON: .* at line 3"):
        load_prompts(path)
    path.write_bytes(b'[{"prompt": "a"}, {"prompt": "\xff"}]')
    with pytest.raises(InputError) as info:
        load_prompts(path)
    assert_names(info.value, path, None, "prompt", "invalid UTF-8")
    assert info.value.row == 1
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')  # JSON Lines in a .json file
    assert [example.line for example in load_prompts(path)] == [1, 2]


def test_unreadable_sources(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("prompt\na\n")
    with pytest.raises(InputError, match="unsupported file type"):
        load_prompts(tmp_path / "d.csv")
    with pytest.raises(InputError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read parquet"):
        load_prompts(tmp_path / "bad.parquet")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="save_to_disk"):
        load_prompts(tmp_path / "folder")


# ---------------------------------------------------------------- a tiny tokenizer with a chat template

SENTENCES = ["the movie was great", "the food was bad", "hello world", "hi there how are you"]
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def make_tokenizer(pad_is_eos: bool = False, bos_in_template: bool = False) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over SENTENCES with <bos>/<eos>/<pad> and a jinja chat template."""
    specials = ["<pad>", "<unk>", "<bos>", "<eos>", "<user>", "<assistant>", "<system>"]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>" if pad_is_eos else "<pad>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = ("{{ bos_token }}" if bos_in_template else "") + TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_prompt_gets_one_bos_and_completion_one_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    example = tokenize_prompt_completion(tokenizer, "the movie was", "great", None, None)
    assert example.prompt_ids == [bos, *ids(tokenizer, "the movie was")]
    assert example.completion_ids == [*ids(tokenizer, "great"), eos]
    already = tokenize_prompt_completion(tokenizer, "<bos> the movie was", "great <eos>", None, None)
    assert already == example  # BOS and EOS already in the text are not duplicated


def test_first_response_token_and_eos_are_masked_in(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_prompt_completion(tokenizer, "the movie was", "great", None, None)
    batch = collate_sequences([example], tokenizer.pad_token_id)
    mask, input_ids = batch["response_mask"][0], batch["input_ids"][0]
    first = int(mask.nonzero()[0])
    assert first == len(example.prompt_ids)  # exactly the first completion token
    assert input_ids[first] == ids(tokenizer, "great")[0]
    assert mask.tolist() == [0, 0, 0, 0, 1, 1]
    assert input_ids[mask.bool()].tolist()[-1] == tokenizer.eos_token_id
    assert batch["num_response_tokens"] == int(mask.sum()) == 2


def test_pad_equal_to_eos_counts_only_the_real_eos() -> None:
    tokenizer = make_tokenizer(pad_is_eos=True)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    examples = [
        tokenize_prompt_completion(tokenizer, "the", "movie was great", None, None),
        tokenize_prompt_completion(tokenizer, "hello", "world", None, None),
    ]
    for side in ("right", "left"):
        batch = collate_sequences(examples, tokenizer.pad_token_id, padding_side=side)
        is_eos = batch["input_ids"] == eos
        assert int(is_eos.sum()) == 4  # two real EOS, two pads
        assert (is_eos & batch["response_mask"].bool()).sum(dim=1).tolist() == [1, 1]
        assert batch["num_response_tokens"] == int(batch["response_mask"].sum()) == 4 + 2
        assert (batch["response_mask"] <= batch["attention_mask"]).all()


def test_bos_in_chat_template_is_not_duplicated() -> None:
    tokenizer = make_tokenizer(bos_in_template=True)
    example = tokenize_prompt_completion(tokenizer, [user("hello")], [assistant("the movie")], None, None)
    assert (
        example.prompt_ids.count(tokenizer.bos_token_id) == 1
        and example.prompt_ids[0] == tokenizer.bos_token_id
    )
    assert example.prompt_ids == ids(tokenizer, "<bos><user> hello <assistant> ")


def test_conversational_completion_is_the_rendered_remainder(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_prompt_completion(tokenizer, [user("hello")], [assistant("the movie")], None, None)
    assert example.prompt_ids == [tokenizer.bos_token_id, *ids(tokenizer, "<user> hello <assistant>")]
    assert example.completion_ids == ids(tokenizer, "the movie <eos>")  # template's EOS, not a second one
    prompt_only = tokenize_prompt(tokenizer, [user("hello")], None)
    assert prompt_only.prompt_ids == example.prompt_ids and prompt_only.completion_ids == []


def test_left_and_right_padding_give_the_same_masks(tokenizer: PreTrainedTokenizerFast) -> None:
    examples = [
        tokenize_prompt_completion(tokenizer, "the movie was", "great", None, None),
        tokenize_prompt_completion(tokenizer, "hi", "there how are you", None, None),
        tokenize_prompt_completion(tokenizer, "", "hello world", None, None),
    ]
    right = collate_sequences(examples, tokenizer.pad_token_id, "right")
    left = collate_sequences(examples, tokenizer.pad_token_id, "left")
    for row in range(len(examples)):
        keep_right, keep_left = right["attention_mask"][row].bool(), left["attention_mask"][row].bool()
        for key in ("input_ids", "response_mask", "position_ids"):
            assert right[key][row][keep_right].tolist() == left[key][row][keep_left].tolist()
        assert left["position_ids"][row][keep_left].tolist() == list(range(int(keep_left.sum())))
    assert right["num_response_tokens"] == left["num_response_tokens"] == int(left["response_mask"].sum())
    assert left["input_ids"][:, -1].tolist() == [tokenizer.eos_token_id] * 3


def test_truncation_rules_and_report(tokenizer: PreTrainedTokenizerFast) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long_prompt = tokenize_prompt_completion(tokenizer, "hi there how are you", "great", 3, 8)
    assert long_prompt.prompt_ids == [bos, *ids(tokenizer, "are you")]  # last tokens, BOS kept
    assert (long_prompt.truncated_prompt, long_prompt.truncated_completion) == (True, False)
    long_completion = tokenize_prompt_completion(tokenizer, "the", "movie was great", 8, 2)
    assert long_completion.completion_ids == ids(tokenizer, "movie was")  # cut at the end: no EOS
    assert eos not in long_completion.completion_ids
    fits = tokenize_prompt_completion(tokenizer, "the", "movie was great", 2, 4)
    assert not (fits.truncated_prompt or fits.truncated_completion)
    report = truncation_report([long_prompt, long_completion, fits], 3, 2)
    assert report is not None
    assert "1 of 3 prompts truncated to 3 tokens" in report
    assert "1 of 3 completions truncated to 2 tokens" in report
    assert truncation_report([fits], 2, 4) is None
    with pytest.raises(ValueError, match="at least 1"):
        tokenize_prompt_completion(tokenizer, "the", "movie", 0, 4)


def test_language_modelling_example_trains_on_every_token_after_bos(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    [example] = from_records([{"text": "the movie was great"}], "sft")
    tokenized = tokenize_sft(tokenizer, example, 16, 16)
    assert tokenized.prompt_ids == [tokenizer.bos_token_id]
    assert tokenized.completion_ids == [*ids(tokenizer, "the movie was great"), tokenizer.eos_token_id]


def test_conversation_without_template_names_the_example() -> None:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    [example] = from_records([{"messages": [user("hi"), assistant("there")]}], "sft", source="d.jsonl")
    with pytest.raises(InputError, match="file d.jsonl, row 0: .*chat template"):
        tokenize_sft(tokenizer, example, 8, 8)


def test_render_mask_shows_tokens_beside_bits(tokenizer: PreTrainedTokenizerFast) -> None:
    example = tokenize_prompt_completion(tokenizer, "the movie was", "great", None, None)
    batch = collate_sequences(
        [example, TokenizedExample([tokenizer.bos_token_id], [3])], tokenizer.pad_token_id
    )
    text = render_mask(tokenizer, batch["input_ids"][0], batch["response_mask"][0])
    lines = text.splitlines()
    assert lines[1].split() == ["0", "0", str(tokenizer.bos_token_id), "'<bos>'"]
    assert lines[5].split()[1] == "1" and lines[5].endswith("'great'")
    assert lines[6].endswith("'<eos>'") and lines[6].split()[1] == "1"
    both = render_mask(tokenizer, batch["input_ids"], batch["response_mask"])
    assert both.startswith("row 0:") and "row 1:" in both and "'<pad>'" in both
    assert torch.equal(batch["position_ids"][1], torch.tensor([0, 1, 0, 0, 0, 0]))


def test_truncation_counter_counts_across_calls(tokenizer: PreTrainedTokenizerFast) -> None:
    counter = TruncationCounter()
    examples = from_records(
        [{"prompt": "hi there how are you", "chosen": " great", "rejected": " bad"}] * 3, "preference"
    )
    for example in examples:
        tokenize_preference(tokenizer, example, 4, 8, counter=counter)
    tokenize_prompt_completion(tokenizer, "hi", "there", 4, 8, counter=counter)
    assert counter.message() == "6 of 7 prompts truncated to 4 tokens (kept the last ones)"
    assert TruncationCounter().message() is None

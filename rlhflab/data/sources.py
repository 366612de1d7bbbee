"""Read raw records (one dict per example) from JSONL, JSON, parquet, a `datasets` folder or the Hub.

This module only turns bytes into records and says where each record came from; what a record
must contain is checked in `rlhflab.data.loading`.

Rules:
- JSON Lines (`.jsonl`, or a `.json` file whose first non-blank character is not `[`): one object per
  line; blank (whitespace-only) lines are skipped; positions are 1-based *lines* of the file.
- JSON (`.json` starting with `[`): a list of objects; positions are 0-based *rows* of the list.
- parquet (`.parquet`), a `datasets.save_to_disk` folder, or a Hub id: positions are 0-based *rows*.
  A `DatasetDict` folder or Hub dataset is read at `split` (default "train"; a dict with a single
  split uses that split).
- A Hub id is tried only when `path` does not exist locally and does not look like a file path.
- Duplicate keys in a JSON object, invalid UTF-8 and invalid JSON are errors, never guessed around.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhflab.errors import InputError

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Where:
    """Where a record came from: a 1-based file `line` (JSON Lines) or a 0-based `row` (everything else)."""

    source: str
    line: int | None = None
    row: int | None = None

    def describe(self) -> str:
        """'data.jsonl line 3' or 'data.parquet row 2'."""
        if self.line is not None:
            return f"{self.source} line {self.line}"
        return f"{self.source} row {self.row}" if self.row is not None else self.source

    def error(self, message: str, field: str | None = None) -> InputError:
        """An InputError naming this file, line or row, and `field`."""
        message, field = _printable(message), None if field is None else _printable(field)
        return InputError(message, file=self.source, line=self.line, row=self.row, field=field)


Record = tuple[Any, Where]


def _printable(text: str) -> str:
    """`text` with lone surrogates (from bad bytes or '\\ud800' escapes) as '?', so it can be printed."""
    return text.encode("utf-8", "replace").decode("utf-8")


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _parse_json(text: str, where: Where) -> Any:
    """json.loads with duplicate keys rejected; every failure becomes an InputError at `where`."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise where.error("duplicate key in a JSON object", field=exc.key) from None
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if where.line is None else f"column {exc.colno}"
        raise where.error(f"invalid JSON: {exc.msg} at {at}") from None
    except RecursionError:
        raise where.error("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise where.error(f"invalid JSON: {exc}") from None


def _has_escaped_byte(value: Any) -> bool:
    """True if `value` holds a string with a byte that was not UTF-8 (decoded as a lone surrogate)."""
    if isinstance(value, str):
        return any("\udc80" <= char <= "\udcff" for char in value)
    if isinstance(value, list):
        return any(_has_escaped_byte(item) for item in value)
    if isinstance(value, dict):
        return any(_has_escaped_byte(key) or _has_escaped_byte(item) for key, item in value.items())
    return False


def _locate_bad_bytes(data: bytes) -> tuple[int | None, str | None]:
    """(row, field) holding the first non-UTF-8 bytes of a JSON object or list, where they can be found."""
    try:
        parsed = json.loads(data.decode("utf-8", "surrogateescape"))
    except Exception:  # the bytes are broken anyway: report what we can without a field
        return None, None
    rows = parsed if isinstance(parsed, list) else [parsed]
    for row, record in enumerate(rows):
        if isinstance(record, dict):
            for key, value in record.items():
                if _has_escaped_byte(key) or _has_escaped_byte(value):
                    return row, key
    return None, None


def _strip_bom(data: bytes) -> bytes:
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _read_jsonl_bytes(data: bytes, source: str) -> list[Record]:
    records: list[Record] = []
    for number, raw in enumerate(_strip_bom(data).split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines are skipped (documented)
        where = Where(source, line=number)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _, field = _locate_bad_bytes(raw)
            raise where.error(f"invalid UTF-8 (byte {exc.start} of the line)", field) from None
        records.append((_parse_json(text, where), where))
    return records


def _read_json_file(path: Path, source: str) -> list[Record]:
    data = _strip_bom(path.read_bytes())
    if not data.lstrip().startswith(b"["):
        return _read_jsonl_bytes(data, source)  # a .json file holding JSON Lines, as `datasets` accepts
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        row, field = _locate_bad_bytes(data)
        if row is not None:
            raise Where(source, row=row).error("invalid UTF-8", field) from None
        line = data[: exc.start].count(b"\n") + 1
        raise InputError("invalid UTF-8", file=source, line=line) from None
    rows = _parse_json(text, Where(source))
    if not isinstance(rows, list):
        raise InputError("a .json file must hold a list of objects (or one object per line)", file=source)
    return [(record, Where(source, row=index)) for index, record in enumerate(rows)]


def _read_parquet(path: Path, source: str) -> list[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"cannot read parquet: {exc}", file=source) from None
    return [(record, Where(source, row=index)) for index, record in enumerate(rows)]


def _pick_split(dataset: Any, split: str, source: str) -> Any:
    import datasets

    if not isinstance(dataset, datasets.DatasetDict):
        return dataset
    if split in dataset:
        return dataset[split]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise InputError(f"no split '{split}'; the dataset has {sorted(dataset)}", file=source)


def _dataset_records(dataset: Any, source: str) -> list[Record]:
    return [(record, Where(source, row=index)) for index, record in enumerate(dataset.to_list())]


def _read_saved_dataset(path: Path, source: str, split: str) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for "not a saved dataset"
        raise InputError(f"not a `datasets` save_to_disk folder: {exc}", file=source) from None
    return _dataset_records(_pick_split(dataset, split, source), source)


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing repo, bad split: all a user fixes the same way
        raise InputError(
            f"not a local file or folder, and loading it from the Hugging Face Hub failed: {exc}", file=name
        ) from None
    return _dataset_records(dataset, name)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(_FILE_SUFFIXES)


def read_records(path: str | os.PathLike[str], split: str = "train") -> list[Record]:
    """Every record of `path` with where it came from; raises InputError for unreadable input.

    Accepts `.jsonl`, `.json`, `.parquet`, a `datasets.save_to_disk` folder, or (when nothing exists at
    `path`) a Hugging Face Hub dataset id read at `split`. Records are returned as parsed: checking
    their fields is the caller's job.
    """
    source = str(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_saved_dataset(local, source, split)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl_bytes(local.read_bytes(), source)
        if suffix == ".json":
            return _read_json_file(local, source)
        if suffix == ".parquet":
            return _read_parquet(local, source)
        raise InputError(
            "unsupported file type; use .jsonl, .json, .parquet or a `datasets` save_to_disk folder",
            file=source,
        )
    if _looks_like_path(source):
        raise InputError("no such file or folder", file=source)
    return _read_hub(source, split)

"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class InputError(Exception):
    """Bad input: names the file, the line (text files, 1-based) or row (tables, 0-based) and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, row: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.row, self.field = file, line, row, field
        where = ", ".join(
            part
            for part in (
                f"file {file}" if file else "",
                f"line {line}" if line is not None else "",
                f"row {row}" if row is not None else "",
                f"field '{field}'" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)

"""report.md: the same sections as report.html, with the figures linked as files beside it."""

from __future__ import annotations

import os
from pathlib import Path

from rlhflab.report.content import Figure, Section, Table


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def table(t: Table) -> str:
    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render(title: str, sections: list[Section], folder: Path) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(table(block))
            elif isinstance(block, Figure):
                parts.append(f"![{block.title}]({Path(os.path.relpath(block.path, folder)).as_posix()})")
            else:
                parts.append(block)
    return "\n\n".join(parts) + "\n"

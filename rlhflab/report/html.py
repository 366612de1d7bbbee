"""report.html: one self-contained page (inline CSS, images as base64 data URIs, no external assets)."""

from __future__ import annotations

import base64
import html
import re

from rlhflab.report.content import Figure, Section, Table

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1400px;
       color: #1d1d1f; background: #fff; padding: 0 16px; }
h1 { font-size: 26px; border-bottom: 3px solid #1f77b4; padding-bottom: 6px; }
h2 { font-size: 20px; margin-top: 32px; color: #1f3b57; }
table { border-collapse: collapse; margin: 10px 0 18px; font-size: 13px; }
th { background: #1f3b57; color: #fff; text-align: left; padding: 6px 9px; }
td { border-bottom: 1px solid #dde3ea; padding: 5px 9px; vertical-align: top; white-space: pre-wrap; }
tr:nth-child(even) td { background: #f4f7fa; }
figure { margin: 12px 0 24px; } figcaption { font-weight: 600; margin-bottom: 6px; }
img { max-width: 100%; border: 1px solid #dde3ea; }
code { background: #eef2f6; padding: 1px 4px; border-radius: 3px; }
"""


def inline(text: str) -> str:
    """Escape, then the two bits of markdown the content uses: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(f: Figure) -> str:
    data = base64.b64encode(f.path.read_bytes()).decode("ascii")
    title = html.escape(f.title)
    return f'<figure><figcaption>{title}</figcaption><img alt="{title}" src="data:image/png;base64,{data}"></figure>'


def render(title: str, sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(table(block))
            elif isinstance(block, Figure):
                parts.append(figure(block))
            else:
                parts.append(f"<p>{inline(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)

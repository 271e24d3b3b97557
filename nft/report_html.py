"""One self-contained HTML page: the report's tables and its plots inlined as base64 PNG."""
from __future__ import annotations

import base64
import html
import os

from .io import atomic_write_text
from .report import Section, detail_table, efficiency_table, settings_md, table1
from .report_claims import claims_table

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}table.t1 tr:last-child td{font-weight:600}
p.note{font-size:12px;color:#555;max-width:900px}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
figure{margin:1em 0}figcaption{font-size:12px;color:#555}code{font-size:12px}"""


def table_html(t, bold_last: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    rows = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    style = ' class="t1"' if bold_last else ""
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3><table{style}><tr>{head}</tr>{rows}</table>{note}"


def _cell(text: str) -> str:
    """A table cell; Markdown **bold** (a verdict that is not met) becomes <b>."""
    if len(text) > 4 and text.startswith("**") and text.endswith("**"):
        return f"<b>{html.escape(text[2:-2])}</b>"
    return html.escape(text)


def _img(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def write_html(path: str, secs: list[Section], figures: dict, results: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>nft benchmark report</title>"
             f"<style>{CSS}</style></head><body><h1>nft benchmark report</h1>"
             f"<p>{sum(len(s.records) for s in secs)} records from <code>{html.escape(os.path.abspath(results))}"
             "</code>. Made from records and saved artifacts only.</p>"]
    for sec in secs:
        settings = "".join(f"<li>{html.escape(line[2:])}</li>" for line in settings_md(sec).splitlines() if line)
        parts.append(f"<h2>{html.escape(sec.name)}</h2><ul>{settings}</ul>")
        claims = claims_table(sec)
        if claims:
            parts.append(table_html(claims))
        parts.append(table_html(table1(sec), bold_last=True))
        parts.append(table_html(detail_table(sec)))
        parts.append(table_html(efficiency_table(sec)))
        for p, cap in figures.get(sec.name, []):
            if os.path.isfile(p):
                parts.append(f"<figure><img src='{_img(p)}' alt='{html.escape(cap)}'>"
                             f"<figcaption>{html.escape(cap)}</figcaption></figure>")
    parts.append("</body></html>")
    atomic_write_text("\n".join(parts), path)
    return path

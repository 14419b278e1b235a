"""The rich notebook view of a `Result`: its chart, the first rows, and what replay did."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from florql.api import Result

HTML_ROWS = 20


def result_html(result: Result) -> str:
    table = result.arrow()
    parts = []
    chart = result.chart()
    if chart is not None:
        parts.append(chart.svg())
    head = "".join(f"<th>{escape(n)}</th>" for n in table.column_names)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in row.values()) + "</tr>"
        for row in table.slice(0, HTML_ROWS).to_pylist()
    )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    shown = min(HTML_ROWS, table.num_rows)
    parts.append(f"<p>{shown} of {table.num_rows} row{'s' if table.num_rows != 1 else ''}</p>")
    if result.plan is not None:
        parts.append(f"<p>replayed:</p><pre>{escape(result.plan.describe())}</pre>")
    parts += [f"<p>warning: {escape(note)}</p>" for note in result.warnings]
    return "<div>" + "".join(parts) + "</div>"


def _cell(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)

"""Charts of florql answers: which columns make the x axis, which the lines, logged or replayed.

One model serves every picture: the web UI draws it with uPlot (`Chart.to_json`), notebooks and
`florql query --format svg|png` draw it with `florql.ui.svg`. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

MAX_POINTS = 20_000  # per line; longer lines are thinned, and the chart says so


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float | None]
    replayed: bool = False  # values florql replayed in hindsight (drawn dashed, in another colour)
    thinned_from: int | None = None  # how many points the line had before thinning


@dataclass
class Chart:
    title: str
    x_label: str
    series: list[Series]
    x_labels: list[str] | None = None  # a categorical x axis: xs are 0..n-1, these are their names
    notes: list[str] = field(default_factory=list)

    def points(self) -> int:
        return sum(sum(y is not None for y in s.ys) for s in self.series)

    def aligned(self) -> tuple[list[float], list[list[float | None]]]:
        """One x array shared by every line (uPlot's data layout), None where a line has no point."""
        xs = sorted({x for s in self.series for x in s.xs})
        where = {x: i for i, x in enumerate(xs)}
        columns: list[list[float | None]] = []
        for s in self.series:
            column: list[float | None] = [None] * len(xs)
            for x, y in zip(s.xs, s.ys):
                column[where[x]] = y
            columns.append(column)
        return xs, columns

    def to_json(self) -> dict[str, Any]:
        xs, columns = self.aligned()
        return {
            "title": self.title,
            "x_label": self.x_label,
            "x_labels": self.x_labels,
            "x": xs,
            "series": [{"label": s.label, "replayed": s.replayed, "values": c} for s, c in zip(self.series, columns)],
            "notes": self.notes,
        }

    def svg(self, width: int = 640, height: int = 320) -> str:
        from florql.ui.svg import render

        return render(self, width, height)

    def png(self, width: int = 640, height: int = 320) -> bytes:
        from florql.ui.svg import to_png

        return to_png(self.svg(width, height))

    def save(self, path: str) -> None:
        """Write the chart as SVG or PNG, by the file's extension."""
        from florql.errors import UsageError

        if path.lower().endswith(".svg"):
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.svg())
        elif path.lower().endswith(".png"):
            with open(path, "wb") as f:
                f.write(self.png())
        else:
            raise UsageError(f"cannot tell the picture format of {path!r}: name it .svg or .png")

    def _repr_svg_(self) -> str:
        return self.svg()


def loop_positions(coords: Sequence[Sequence[int | None]]) -> list[float | None]:
    """Nested loop coordinates laid out on one axis, in units of the outer loop: step 2 of the 4
    steps of epoch 3 is 3.5. Each inner loop's length is read per enclosing iteration."""
    complete = [tuple(int(v) for v in c) if all(v is not None for v in c) else None for c in coords]  # type: ignore[arg-type]
    lengths: dict[tuple[int, ...], int] = {}
    for row in filter(None, complete):
        for depth in range(1, len(row)):
            lengths[row[:depth]] = max(lengths.get(row[:depth], 0), row[depth] + 1)
    out: list[float | None] = []
    for c in complete:
        if c is None:
            out.append(None)
            continue
        fraction = 0.0
        for depth in range(len(c) - 1, 0, -1):
            fraction = (c[depth] + fraction) / lengths[c[:depth]]
        out.append(c[0] + fraction)
    return out


def position_sql(loop_path: Sequence[str]) -> str:
    """`loop_positions` as a SQL expression over a run table's loop columns: each inner loop's
    length is its largest index + 1 within the enclosing iteration, as in the Python version."""
    cols = [_quote(n) for n in loop_path]
    fraction = "CAST(0 AS DOUBLE)"
    for depth in range(len(cols) - 1, 0, -1):
        length = f"(max({cols[depth]}) OVER (PARTITION BY {', '.join(cols[:depth])}) + 1)"
        fraction = f"((CAST({cols[depth]} AS DOUBLE) + {fraction}) / {length})"
    return f"(CAST({cols[0]} AS DOUBLE) + {fraction})"


def line_sql(table: str, name: str, loop_path: Sequence[str], max_points: int | None = None) -> str:
    """One name's line as (x, value, points) rows, ordered by x. A line of more than `max_points`
    points is cut into `max_points // 4` buckets of consecutive points and each keeps its first,
    last, lowest and highest point, so spikes and the line's shape survive. The engine does the
    thinning: a run of millions of values never crosses into Python whole."""
    max_points = MAX_POINTS if max_points is None else max_points
    buckets = max(1, max_points // 4)
    value = _quote(name)
    return f"""
WITH points AS (
    SELECT {position_sql(loop_path)} AS x, CAST({value} AS DOUBLE) AS v FROM {table} WHERE {value} IS NOT NULL
), ranked AS (
    SELECT x, v, row_number() OVER (ORDER BY x) - 1 AS i, count(*) OVER () AS n FROM points
), kept AS (
    SELECT unnest([min(i), max(i), arg_min(i, v), arg_max(i, v)]) AS i FROM ranked GROUP BY (i * {buckets}) // n
)
SELECT x, v, n FROM ranked WHERE n <= {max_points} OR i IN (SELECT i FROM kept) ORDER BY i"""


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    return None


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def _is_decimal(dtype: pa.DataType) -> bool:
    return pa.types.is_decimal(dtype)


def chart_of(
    table: pa.Table,
    coordinates: Iterable[str] = (),
    hindsight: Iterable[str] = (),
    title: str = "",
) -> Chart | None:
    """The automatic chart of a query's answer, or None when it has nothing to draw.

    x axis: the leading loop-coordinate columns laid out as one axis (`loop_positions`), else the
    first numeric column, else the first column as categories. Lines: every other numeric column,
    split by `run_id` when the answer holds several runs. `hindsight` names are drawn as replayed.
    """
    names = table.column_names
    if not names or table.num_rows == 0:
        return None
    coordinates, hindsight = set(coordinates), set(hindsight)
    columns = {n: table.column(n).to_pylist() for n in names}
    # run_id names lines (one per run), never an axis or a line of its own
    numeric = [
        n
        for n in names
        if n != "run_id" and (_is_numeric(table.schema.field(n).type) or _is_decimal(table.schema.field(n).type))
    ]
    group = "run_id" if "run_id" in names and len(set(columns["run_id"])) > 1 else None

    leading = []
    for n in names:
        if n == "run_id":
            continue
        if n in coordinates and pa.types.is_integer(table.schema.field(n).type):
            leading.append(n)
        else:
            break
    x_labels: list[str] | None = None
    if leading:
        xs = loop_positions(list(zip(*(columns[n] for n in leading))))
        x_label = leading[0] + (f" ({', '.join(leading[1:])} within)" if len(leading) > 1 else "")
        used = set(leading)
    elif names[0] in numeric:
        xs = [_number(v) for v in columns[names[0]]]
        x_label, used = names[0], {names[0]}
    else:  # categories, e.g. one bar-like point per run or per learning rate
        x_labels = [str(v) for v in columns[names[0]]]
        xs = [float(i) for i in range(table.num_rows)]
        x_label, used, group = names[0], {names[0]}, None
    ys_names = [n for n in numeric if n not in used and n not in coordinates]
    if not ys_names:
        return None

    series: list[Series] = []
    groups = sorted(set(columns[group]), key=lambda v: (v is None, v)) if group else [None]
    for key in groups:
        rows = [i for i in range(table.num_rows) if group is None or columns[group][i] == key]
        for n in ys_names:
            label = n if group is None else f"{n} · run {key}"
            series.append(_series(label, [xs[i] for i in rows], [columns[n][i] for i in rows], n in hindsight))
    chart = Chart(title, x_label, [s for s in series if s.xs], x_labels)
    _thin(chart)
    return chart if chart.series else None


def _series(label: str, xs: list[float | None], values: list[Any], replayed: bool) -> Series:
    pairs = sorted(((x, _number(v)) for x, v in zip(xs, values) if x is not None), key=lambda p: p[0])
    return Series(label, [p[0] for p in pairs], [p[1] for p in pairs], replayed)


def _thin(chart: Chart) -> None:
    for s in chart.series:
        if len(s.xs) > MAX_POINTS:
            keep = kept_points(s.ys, MAX_POINTS)
            s.thinned_from = len(s.xs)
            s.xs, s.ys = [s.xs[i] for i in keep], [s.ys[i] for i in keep]
    chart.notes.extend(thinning_notes(chart.series))


def kept_points(ys: Sequence[float | None], max_points: int) -> list[int]:
    """The indices `line_sql` keeps, for a line already in memory: the first, last, lowest and
    highest point of each of `max_points // 4` buckets of consecutive points."""
    n, buckets = len(ys), max(1, max_points // 4)
    if n <= max_points:
        return list(range(n))
    keep: set[int] = set()
    start = 0
    for b in range(buckets):
        end = start
        while end < n and (end * buckets) // n == b:
            end += 1
        if end > start:
            keep.update((start, end - 1))
            present = [i for i in range(start, end) if ys[i] is not None]
            if present:
                keep.add(min(present, key=lambda i: ys[i]))  # type: ignore[arg-type, return-value]
                keep.add(max(present, key=lambda i: ys[i]))  # type: ignore[arg-type, return-value]
        start = end
    return sorted(keep)


def thinning_notes(series: Iterable[Series]) -> list[str]:
    return [
        f"{s.label}: {len(s.xs):,} of {s.thinned_from:,} points shown (each stretch's first, last, lowest and highest)"
        for s in series
        if s.thinned_from is not None
    ]

"""The chart model, the SVG writer, Result.plot / _repr_html_ and `florql query --format svg|png`."""

from __future__ import annotations

import math
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

import florql
from florql.cli import main
from florql.errors import UsageError
from florql.ui.charts import MAX_POINTS, chart_of, kept_points, line_sql, loop_positions
from florql.ui.svg import nice_ticks, render
from store_support import Store

SVG = "{http://www.w3.org/2000/svg}"

# No torch: a quick run that logs per step and per epoch.
SCRIPT = """
import florql
for epoch in florql.loop("epoch", range(3)):
    for step in florql.loop("step", range(4)):
        florql.log("loss", 1.0 / (1 + epoch * 4 + step))
    florql.log("val_acc", 0.5 + 0.1 * epoch)
"""


def dots(svg: str) -> list[ET.Element]:
    return ET.fromstring(svg).findall(f"{SVG}circle")


def test_loop_positions_lay_inner_loops_within_the_outer_one() -> None:
    assert loop_positions([(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]) == [0, 0.5, 1, 1.25, 1.5, 1.75]
    assert loop_positions([(2,), (3,)]) == [2, 3]
    assert loop_positions([(0, 1, 1), (0, 0, 0), (0, 0, 1)]) == [0.75, 0, 0.25]
    assert loop_positions([(0, None)]) == [None]


def test_chart_of_uses_loop_coordinates_as_x_and_splits_runs() -> None:
    table = pa.table(
        {"run_id": [1, 1, 2, 2], "epoch": [0, 1, 0, 1], "val_acc": [0.5, 0.6, 0.4, None], "tag": list("abcd")}
    )
    chart = chart_of(table, coordinates={"epoch"}, hindsight={"val_acc"})
    assert chart is not None and chart.x_label == "epoch"
    assert [(s.label, s.xs, s.ys, s.replayed) for s in chart.series] == [
        ("val_acc · run 1", [0, 1], [0.5, 0.6], True),
        ("val_acc · run 2", [0, 1], [0.4, None], True),
    ]
    assert chart.points() == 3


def test_chart_of_falls_back_to_a_numeric_or_categorical_x() -> None:
    numeric = chart_of(pa.table({"lr": [0.1, 0.01], "acc": [0.9, 0.8]}))
    assert numeric is not None and numeric.x_label == "lr" and numeric.series[0].xs == [0.01, 0.1]
    categories = chart_of(pa.table({"optimizer": ["sgd", "adam"], "acc": [0.9, 0.8]}))
    assert categories is not None and categories.x_labels == ["sgd", "adam"] and categories.series[0].ys == [0.9, 0.8]
    assert chart_of(pa.table({"name": ["a"], "text": ["b"]})) is None  # nothing numeric to draw
    assert chart_of(pa.table({"epoch": pa.array([], pa.int64()), "x": pa.array([], pa.float64())})) is None


def test_long_lines_are_thinned_keeping_each_stretchs_extremes_and_the_chart_says_so() -> None:
    n = MAX_POINTS * 3
    ys = [math.sin(i / 500) for i in range(n)]
    ys[12_345], ys[45_678] = 50.0, -50.0  # one-point spikes thinning must not lose
    chart = chart_of(pa.table({"step": list(range(n)), "loss": ys}), coordinates={"step"})
    assert chart is not None
    (line,) = chart.series
    assert len(line.xs) <= MAX_POINTS and line.xs == sorted(line.xs)
    assert line.xs[0] == 0 and line.xs[-1] == n - 1
    assert max(line.ys) == 50.0 and min(line.ys) == -50.0  # type: ignore[type-var]
    assert line.ys == [ys[int(x)] for x in line.xs]
    assert chart.notes == [
        f"loss: {len(line.xs):,} of {n:,} points shown (each stretch's first, last, lowest and highest)"
    ]


def test_sql_positions_and_thinning_match_the_python_ones() -> None:
    """`line_sql` runs in the engine what `loop_positions` and `kept_points` do in memory, point for point:
    uneven inner loops (an epoch cut short, steps of varying token counts), values without ties."""
    rng = random.Random(7)
    rows = [(e, s, t, rng.random()) for e in range(5) for s in range(3 + e % 2) for t in range(1 + (e + s) % 4)]
    con = duckdb.connect()
    con.execute("CREATE TABLE run_1 (epoch INT, step INT, tok INT, loss DOUBLE)")
    con.executemany("INSERT INTO run_1 VALUES (?, ?, ?, ?)", rows)
    con.execute("INSERT INTO run_1 VALUES (5, 0, 0, NULL)")  # no value: not a point
    xs = loop_positions([r[:3] for r in rows])
    ys = [r[3] for r in rows]
    for max_points in (len(rows), 16, 4):
        got = con.execute(line_sql("run_1", "loss", ["epoch", "step", "tok"], max_points)).fetchall()
        keep = kept_points(ys, max_points)
        assert [(x, v) for x, v, _ in got] == [(xs[i], ys[i]) for i in keep], max_points
        assert {n for _, _, n in got} == {len(rows)}


def test_svg_draws_every_point_dashes_replayed_lines_and_escapes_labels() -> None:
    table = pa.table({"epoch": [0, 1, 2], "acc<&>": [0.1, 0.2, None], "grad_norm": [1.0, 2.0, 3.0]})
    chart = chart_of(table, coordinates={"epoch"}, hindsight={"grad_norm"}, title="t")
    assert chart is not None
    svg = render(chart)
    root = ET.fromstring(svg)  # well-formed, labels escaped
    assert len(dots(svg)) == 5  # the missing value draws no dot
    dashed = [p for p in root.findall(f"{SVG}polyline") if p.get("stroke-dasharray")]
    assert len(dashed) == 1 and len(dashed[0].get("points", "").split()) == 3
    assert "acc<&>" in "".join(root.itertext()) and "grad_norm (replayed)" in "".join(root.itertext())


def test_nice_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3, 3) == [3]
    assert nice_ticks(-7, 42, 5) == [0, 10, 20, 30, 40]


@pytest.fixture
def run(store: Store) -> Store:
    store.run(SCRIPT)
    return store


def test_result_plot_and_notebook_view(run: Store, tmp_path: Path) -> None:
    db = florql.connect(run.home)
    result = db.sql("SELECT epoch, step, loss FROM run_1 ORDER BY epoch, step")
    chart = result.plot(str(tmp_path / "loss.svg"))
    assert chart.x_label == "epoch (step within)" and chart.points() == 12
    assert len(dots((tmp_path / "loss.svg").read_text())) == 12
    html = result._repr_html_()
    assert html.count("<circle") == 12 and html.count("<tr>") == 1 + 12 and "12 of 12 rows" in html
    with pytest.raises(UsageError, match="nothing to plot"):
        db.sql("SELECT script FROM runs").plot()
    with pytest.raises(UsageError, match=r"\.svg or \.png"):
        result.plot(str(tmp_path / "loss.gif"))


def test_cli_writes_svg_and_png_charts(run: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "val.svg"
    sql = "SELECT epoch, val_acc FROM run_1"
    assert main(["--store", str(run.home), "query", sql, "--format", "svg", "-o", str(out)]) == 0
    assert len(dots(out.read_text())) == 3
    assert "3 points in 1 line(s)" in capsys.readouterr().err
    assert main(["--store", str(run.home), "query", sql, "--format", "svg"]) == 0  # to stdout
    assert len(dots(capsys.readouterr().out)) == 3
    pytest.importorskip("cairosvg", reason="PNG charts need cairosvg: pip install 'florql[png]'")
    png = tmp_path / "val.png"
    assert main(["--store", str(run.home), "query", sql, "-o", str(png)]) == 0  # format from the extension
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--store", str(run.home), "query", sql, "--format", "png"]) == 2
    assert "--format png needs -o" in capsys.readouterr().err

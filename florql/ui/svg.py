"""A small SVG line-chart writer for `Chart` (notebooks, `florql query --format svg|png`).

Self-contained SVG 1.1: no scripts, no fonts to fetch, so it renders offline in Jupyter, in a
browser and through cairosvg alike. Logged lines are solid; replayed (hindsight) lines are dashed.
"""

from __future__ import annotations

import math
from html import escape

from florql.errors import UsageError
from florql.ui.charts import Chart

LOGGED_COLOURS = ("#1f6fb4", "#2a9d4b", "#7b4fb0", "#17908f", "#555555")
REPLAYED_COLOURS = ("#e0701a", "#c7402d", "#b8860b", "#d94f9b")
MARKERS_UP_TO = 200  # points per line drawn as dots as well; more would only blur the line


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high == low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def render(chart: Chart, width: int = 640, height: int = 320) -> str:
    left, right, top, bottom = 64, 16, 44, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in chart.series for x in s.xs]
    ys = [y for s in chart.series for y in s.ys if y is not None]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(chart.title)}</text>',
    ]
    out += _axes(chart, left, top, plot_w, plot_h, x0, x1, y0, y1, sx, sy)
    logged = replayed = 0
    legend_x = left
    for s in chart.series:
        if s.replayed:
            colour, dash = REPLAYED_COLOURS[replayed % len(REPLAYED_COLOURS)], ' stroke-dasharray="6 3"'
            replayed += 1
        else:
            colour, dash = LOGGED_COLOURS[logged % len(LOGGED_COLOURS)], ""
            logged += 1
        for run in _runs(s.xs, s.ys):
            points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{points}"/>')
        if len(s.xs) <= MARKERS_UP_TO:
            out += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}"><title>{escape(s.label)}: '
                f"{_fmt(y)} at {_fmt(x)}</title></circle>"
                for x, y in zip(s.xs, s.ys)
                if y is not None
            ]
        label = s.label + (" (replayed)" if s.replayed else "")
        out.append(
            f'<line x1="{legend_x}" y1="30" x2="{legend_x + 18}" y2="30" stroke="{colour}" stroke-width="2"{dash}/>'
        )
        out.append(f'<text x="{legend_x + 22}" y="34">{escape(label)}</text>')
        legend_x += 30 + 7 * len(label)
    for i, note in enumerate(chart.notes):
        out.append(f'<text x="{left}" y="{height - 4 - 12 * i}" fill="#777">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _axes(chart: Chart, left, top, plot_w, plot_h, x0, x1, y0, y1, sx, sy) -> list[str]:
    out = [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>']
    for y in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{left + plot_w}" y2="{sy(y):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{_fmt(y)}</text>')
    if chart.x_labels is not None:
        every = max(1, math.ceil(len(chart.x_labels) / 10))
        x_ticks = [(float(i), label) for i, label in enumerate(chart.x_labels)][::every]
    else:
        x_ticks = [(x, _fmt(x)) for x in nice_ticks(x0, x1, 8)]
    for x, label in x_ticks:
        out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 14}" text-anchor="middle">{escape(label)}</text>')
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 30}" text-anchor="middle">{escape(chart.x_label)}</text>'
    )
    return out


def _runs(xs: list[float], ys: list[float | None]) -> list[list[tuple[float, float]]]:
    """Stretches of a line without missing values (a gap breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in zip(xs, ys):
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [r for r in runs if r]


def to_png(svg: str) -> bytes:
    try:
        import cairosvg
    except (ImportError, OSError):  # OSError: the package is there but the system's libcairo is not
        raise UsageError(
            "PNG charts need cairosvg and the cairo library: pip install 'florql[png]' "
            "(and apt-get install libcairo2 where it is missing), or ask for --format svg"
        ) from None
    return cairosvg.svg2png(bytestring=svg.encode())

"""A small bar chart as inline SVG, drawn on the server: no script, no library.

Pure: day-by-day series in, SVG text out (every label escaped). Two series share one
axis, drawn side by side per day; the chart scales to its container's width.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import date, timedelta

WIDTH, HEIGHT = 600, 180
LEFT, BOTTOM, TOP = 8, 20, 14
COLORS = ("#1f6feb", "#2da44e")


def bars(days: list[date], series: list[tuple[str, dict[date, int]]], label: str = "",
         fmt: Callable[[int], str] = str) -> str:
    """Bars per day for each of ``series`` (name, day → value), over ``days`` in order;
    ``label`` titles the chart, ``fmt`` writes a value. Drawn to scale; zero draws nothing."""
    top = max([v for _, values in series for v in values.values()] + [1])
    n = max(len(days), 1)
    slot = (WIDTH - LEFT) / n
    bar = max(slot / (len(series) + 1), 1.0)
    plot = HEIGHT - BOTTOM - TOP
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" class="chart" preserveAspectRatio="none">',
             f"<title>{html.escape(label)}</title>",
             f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH}" y2="{HEIGHT - BOTTOM}" '
             'stroke="#999" stroke-width="1"/>',
             f'<text x="{LEFT}" y="11" font-size="11" fill="#555">max '
             f"{html.escape(fmt(top))}</text>"]
    for i, day in enumerate(days):
        for j, (name, values) in enumerate(series):
            value = values.get(day, 0)
            if not value:
                continue
            h = max(plot * value / top, 1.0)
            x = LEFT + i * slot + j * bar + bar / 2
            parts.append(f'<rect x="{x:.1f}" y="{HEIGHT - BOTTOM - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{COLORS[j % len(COLORS)]}">'
                         f"<title>{html.escape(f'{day} {name}: {fmt(value)}')}</title></rect>")
    for i in (0, n - 1) if days else ():
        anchor = "start" if i == 0 else "end"
        x = LEFT if i == 0 else WIDTH
        parts.append(f'<text x="{x}" y="{HEIGHT - 5}" font-size="11" text-anchor="{anchor}" '
                     f'fill="#555">{html.escape(days[i].isoformat())}</text>')
    parts.append("</svg>")
    return "".join(parts)


def day_range(last: date, days: int) -> list[date]:
    """The ``days`` calendar days up to and including ``last``."""
    return [last - timedelta(days=days - 1 - i) for i in range(days)]

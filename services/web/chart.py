"""The balance-over-time chart as SVG, drawn on the server: one polyline per asset.

Pure: points in, numbers for the template out. Coordinates are floats, which is right for
pixels; the figures shown as text stay Decimals.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from services.web.reads import Point

WIDTH, HEIGHT, PAD = 640, 180, 8
COLOURS = ("#7b3fe4", "#1f9d55", "#d9480f", "#1971c2", "#c2255c", "#5c940d")


@dataclass(frozen=True)
class Line:
    asset: str
    colour: str
    points: str  # the polyline's "x,y x,y ..."
    low: Decimal
    high: Decimal
    last: Decimal


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    lines: list[Line]
    first_at: str
    last_at: str
    samples: int


def chart(points: list[Point], assets: list[str] | None = None) -> Chart | None:
    """One line per asset over the sampled states (x: when it was recorded), or None if empty."""
    if not points:
        return None
    names = assets or sorted({a for p in points for a in p.balances})
    start, end = points[0].at.timestamp(), points[-1].at.timestamp()
    span = (end - start) or 1.0
    lines = []
    for i, asset in enumerate(names):
        values = [p.balances.get(asset, Decimal(0)) for p in points]
        low, high = min(values), max(values)
        range_ = float(high - low) or 1.0
        coords = " ".join(
            f"{PAD + (p.at.timestamp() - start) / span * (WIDTH - 2 * PAD):.1f},"
            f"{HEIGHT - PAD - float(v - low) / range_ * (HEIGHT - 2 * PAD):.1f}"
            for p, v in zip(points, values, strict=True)
        )
        lines.append(Line(asset, COLOURS[i % len(COLOURS)], coords, low, high, values[-1]))
    return Chart(
        WIDTH,
        HEIGHT,
        lines,
        points[0].at.isoformat(timespec="seconds"),
        points[-1].at.isoformat(timespec="seconds"),
        len(points),
    )

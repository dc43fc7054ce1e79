"""Every projection by name."""

from __future__ import annotations

from typing import Any

from shared.projections import balance, leaderboard, pnl, portfolio
from shared.projections.model import ReadModel

PROJECTIONS: dict[str, ReadModel[Any]] = {
    m.name: m for m in (balance.MODEL, pnl.MODEL, portfolio.MODEL, leaderboard.MODEL)
}


class UnknownProjection(KeyError):
    def __str__(self) -> str:
        return f"unknown projection {self.args[0]!r}; choose one of {', '.join(PROJECTIONS)}"


def projection(name: str) -> ReadModel[Any]:
    try:
        return PROJECTIONS[name]
    except KeyError:
        raise UnknownProjection(name) from None

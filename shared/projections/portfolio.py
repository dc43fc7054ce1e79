"""portfolio per (agent, asset): available (= balance), in_escrow, total = available + in_escrow."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from shared.events import Event, money_effect
from shared.projections.model import ZERO, AgentState, ReadModel


@dataclass(slots=True)
class Holding:
    available: Decimal = ZERO
    in_escrow: Decimal = ZERO

    @property
    def total(self) -> Decimal:
        return self.available + self.in_escrow


def apply(state: AgentState[Holding], event: Event) -> None:
    effect = money_effect(event)
    for asset, delta in effect.balance:
        state.setdefault(asset, Holding()).available += delta
    for asset, delta in effect.escrow:
        state.setdefault(asset, Holding()).in_escrow += delta


MODEL: ReadModel[Holding] = ReadModel(
    name="portfolio",
    table="portfolio",
    columns=(("available", "numeric"), ("in_escrow", "numeric"), ("total", "numeric")),
    apply=apply,
    to_row=lambda h: (h.available, h.in_escrow, h.total),
    from_row=lambda row: Holding(row["available"], row["in_escrow"]),
)


def as_dict(state: AgentState[Holding]) -> dict[str, Any]:
    return {
        asset: {"available": h.available, "in_escrow": h.in_escrow, "total": h.total}
        for asset, h in sorted(state.items())
    }

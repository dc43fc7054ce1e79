"""pnl per (agent, asset): wagered = Σ BetPlaced, won = Σ BetWon, fees = Σ FeeCharged.

net_pnl = won − wagered − fees; win_rate = wins ÷ bets; roi = net_pnl ÷ wagered (0 when
nothing was wagered). Ratios are kept to 18 places, rounded half-even.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from shared.events import BetPlaced, BetWon, Event, FeeCharged
from shared.projections.model import ZERO, AgentState, ReadModel, ratio


@dataclass(slots=True)
class Pnl:
    total_wagered: Decimal = ZERO
    total_won: Decimal = ZERO
    total_fees: Decimal = ZERO
    bet_count: int = 0
    win_count: int = 0

    @property
    def net_pnl(self) -> Decimal:
        return self.total_won - self.total_wagered - self.total_fees

    @property
    def win_rate(self) -> Decimal:
        return ratio(Decimal(self.win_count), Decimal(self.bet_count))

    @property
    def roi(self) -> Decimal:
        return ratio(self.net_pnl, self.total_wagered)


def apply(state: AgentState[Pnl], event: Event) -> None:
    match event:
        case BetPlaced(amount=amount, asset=asset):
            row = state.setdefault(asset, Pnl())
            row.total_wagered += amount
            row.bet_count += 1
        case BetWon(amount=amount, asset=asset):
            row = state.setdefault(asset, Pnl())
            row.total_won += amount
            row.win_count += 1
        case FeeCharged(amount=amount, asset=asset):
            state.setdefault(asset, Pnl()).total_fees += amount


def to_row(p: Pnl) -> tuple[Any, ...]:
    return (
        p.total_wagered,
        p.total_won,
        p.total_fees,
        p.bet_count,
        p.win_count,
        p.net_pnl,
        p.win_rate,
        p.roi,
    )


def from_row(row: Any) -> Pnl:
    return Pnl(row["total_wagered"], row["total_won"], row["total_fees"], row["bet_count"], row["win_count"])


MODEL: ReadModel[Pnl] = ReadModel(
    name="pnl",
    table="pnl",
    columns=(
        ("total_wagered", "numeric"),
        ("total_won", "numeric"),
        ("total_fees", "numeric"),
        ("bet_count", "bigint"),
        ("win_count", "bigint"),
        ("net_pnl", "numeric"),
        ("win_rate", "numeric"),
        ("roi", "numeric"),
    ),
    apply=apply,
    to_row=to_row,
    from_row=from_row,
)


def as_dict(state: AgentState[Pnl]) -> dict[str, Any]:
    names = MODEL.column_names
    return {asset: dict(zip(names, to_row(p), strict=True)) for asset, p in sorted(state.items())}

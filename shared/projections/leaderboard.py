"""leaderboard entries per (agent, asset): P&L figures plus volume; the ``leaderboard`` view ranks
agents by net_pnl within each asset. volume = Σ BetPlaced + Σ TradeExecuted notional."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from shared.events import BetPlaced, BetWon, Event, FeeCharged, TradeExecuted
from shared.projections import pnl
from shared.projections.model import ZERO, AgentState, ReadModel


@dataclass(slots=True)
class Entry:
    pnl: pnl.Pnl = field(default_factory=pnl.Pnl)
    volume: Decimal = ZERO


def apply(state: AgentState[Entry], event: Event) -> None:
    match event:
        case BetPlaced() | BetWon() | FeeCharged():
            entry = state.setdefault(event.asset, Entry())
            pnl.apply({event.asset: entry.pnl}, event)
            if isinstance(event, BetPlaced):
                entry.volume += event.amount
        case TradeExecuted(amount=amount, asset=asset):
            state.setdefault(asset, Entry()).volume += amount


def to_row(e: Entry) -> tuple[Any, ...]:
    p = e.pnl
    return (
        p.net_pnl,
        p.roi,
        p.win_rate,
        e.volume,
        p.total_wagered,
        p.total_won,
        p.total_fees,
        p.bet_count,
        p.win_count,
    )


def from_row(row: Any) -> Entry:
    return Entry(
        pnl.Pnl(
            row["total_wagered"], row["total_won"], row["total_fees"], row["bet_count"], row["win_count"]
        ),
        row["volume"],
    )


MODEL: ReadModel[Entry] = ReadModel(
    name="leaderboard",
    table="leaderboard_entries",
    columns=(
        ("net_pnl", "numeric"),
        ("roi", "numeric"),
        ("win_rate", "numeric"),
        ("volume", "numeric"),
        ("total_wagered", "numeric"),
        ("total_won", "numeric"),
        ("total_fees", "numeric"),
        ("bet_count", "bigint"),
        ("win_count", "bigint"),
    ),
    apply=apply,
    to_row=to_row,
    from_row=from_row,
)

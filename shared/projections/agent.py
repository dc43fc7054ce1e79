"""One agent's whole state: the balance, P&L and portfolio folds, plus what commands decide on.

This composite is what snapshots store and what time travel, what-if and the command handler
compute. Each part is folded by the very ``apply`` its projector runs, so an answer computed
here agrees with the read models to the last digit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any

import msgspec

from shared.events import AgentRegistered, EscrowLocked, EscrowReleased, Event
from shared.projections import balance, pnl, portfolio
from shared.projections.model import ZERO, AgentState

SNAPSHOT_TYPE = "agent"
# Bump when the fold or the JSON below changes meaning: older snapshots are then ignored (never
# misread) and rebuilt by the writer's snapshotter from the events.
SNAPSHOT_SCHEMA_VERSION = 1

# The events whose effect depends on the state before them: which escrow ids are open, whether
# the agent registered. Every other event adds amounts and counts to sums that no earlier event
# changes (balance, P&L, portfolio), so its effect can be taken out again (AgentFold.without).
STATEFUL_EVENTS = (AgentRegistered, EscrowLocked, EscrowReleased)


@dataclass(slots=True)
class EscrowLock:
    asset: str
    amount: Decimal


@dataclass(slots=True)
class AgentFold:
    """The state of one agent after some events; ``apply`` is pure (no I/O)."""

    registered: bool = False
    balance: AgentState[Decimal] = field(default_factory=dict)
    pnl: AgentState[pnl.Pnl] = field(default_factory=dict)
    portfolio: AgentState[portfolio.Holding] = field(default_factory=dict)
    # Open escrow locks by escrow id: what ReleaseEscrow(escrow_id) may release.
    escrows: dict[str, EscrowLock] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        balance.apply(self.balance, event)
        pnl.apply(self.pnl, event)
        portfolio.apply(self.portfolio, event)
        match event:
            case AgentRegistered():
                self.registered = True
            case EscrowLocked(escrow_id=str(escrow_id), asset=asset, amount=amount):
                held = self.escrows.get(escrow_id)
                if held is not None and held.asset == asset:
                    held.amount += amount
                else:
                    self.escrows[escrow_id] = EscrowLock(asset, amount)
            case EscrowReleased(escrow_id=str(escrow_id), asset=asset, amount=amount):
                held = self.escrows.get(escrow_id)
                if held is not None and held.asset == asset:
                    held.amount -= amount
                    if held.amount <= 0:
                        del self.escrows[escrow_id]

    def copy(self) -> AgentFold:
        return AgentFold(
            registered=self.registered,
            balance=dict(self.balance),
            pnl={asset: replace(row) for asset, row in self.pnl.items()},
            portfolio={asset: replace(holding) for asset, holding in self.portfolio.items()},
            escrows={escrow_id: replace(lock) for escrow_id, lock in self.escrows.items()},
        )

    def without(self, events: Iterable[Event]) -> AgentFold | None:
        """This state with ``events`` (each folded into it once) taken out, without a refold.

        Exact, because balance, P&L and portfolio are sums of what each event adds, and money
        arithmetic is exact (shared.money). None when only a refold can tell: one of the events
        is in ``STATEFUL_EVENTS``, or a row they touched is left all zero (a fold without them
        might have no such row at all).
        """
        events = list(events)
        if any(isinstance(event, STATEFUL_EVENTS) for event in events):
            return None
        part = AgentFold()
        for event in events:
            part.apply(event)
        result = self.copy()
        for asset, amount in part.balance.items():
            if asset not in result.balance:
                return None
            result.balance[asset] -= amount
            if not result.balance[asset]:
                return None
        for rows, taken in ((result.pnl, part.pnl), (result.portfolio, part.portfolio)):
            for asset, gone in taken.items():
                row = rows.get(asset)
                if row is None or _take_out(row, gone):
                    return None
        return result

    def available(self, asset: str) -> Decimal:
        return self.balance.get(asset, ZERO)

    def in_escrow(self, asset: str) -> Decimal:
        holding = self.portfolio.get(asset)
        return holding.in_escrow if holding is not None else ZERO

    def balances(self) -> dict[str, Decimal]:
        return dict(sorted(self.balance.items()))

    def pnl_rows(self) -> dict[str, dict[str, Any]]:
        return pnl.as_dict(self.pnl)

    def portfolio_rows(self) -> dict[str, dict[str, Any]]:
        return portfolio.as_dict(self.portfolio)


def _take_out(row: Any, part: Any) -> bool:
    """``row -= part`` field by field (a P&L row, a holding); True if ``row`` is left all zero."""
    names = [f.name for f in fields(row)]
    for name in names:
        setattr(row, name, getattr(row, name) - getattr(part, name))
    return not any(getattr(row, name) for name in names)


class _SnapshotState(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON of a snapshot (schema ``SNAPSHOT_SCHEMA_VERSION``); Decimals travel as strings."""

    registered: bool
    balance: dict[str, Decimal]
    # (total_wagered, total_won, total_fees, bet_count, win_count)
    pnl: dict[str, tuple[Decimal, Decimal, Decimal, int, int]]
    # (available, in_escrow)
    portfolio: dict[str, tuple[Decimal, Decimal]]
    escrows: dict[str, tuple[str, Decimal]]


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(_SnapshotState)


def to_json(state: AgentFold) -> str:
    return _encoder.encode(
        _SnapshotState(
            registered=state.registered,
            balance=dict(state.balance),
            pnl={
                a: (p.total_wagered, p.total_won, p.total_fees, p.bet_count, p.win_count)
                for a, p in state.pnl.items()
            },
            portfolio={a: (h.available, h.in_escrow) for a, h in state.portfolio.items()},
            escrows={i: (e.asset, e.amount) for i, e in state.escrows.items()},
        )
    ).decode()


def from_json(text: str | bytes) -> AgentFold:
    # str(Decimal) keeps the exponent, so a restored amount has the very digits it was saved with.
    raw = _decoder.decode(text)
    return AgentFold(
        registered=raw.registered,
        balance=dict(raw.balance),
        pnl={a: pnl.Pnl(*row) for a, row in raw.pnl.items()},
        portfolio={a: portfolio.Holding(*row) for a, row in raw.portfolio.items()},
        escrows={i: EscrowLock(asset, amount) for i, (asset, amount) in raw.escrows.items()},
    )

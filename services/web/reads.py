"""What the explorer reads from Postgres, as the read-only role: read models, the log, snapshots.

Figures now come from the read models (what the projectors applied); figures as of a point or
under a what-if come from :mod:`shared.history`; the chart's points from snapshots (the same
fold's states) and, for short streams, from folding the events themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from shared.events import Event
from shared.history import AsOf, UnknownAgent, current_state, decoded, stream_head, view
from shared.projections import pnl, portfolio
from shared.projections.agent import SNAPSHOT_SCHEMA_VERSION, SNAPSHOT_TYPE, AgentFold, from_json
from shared.store import RecordedEvent, fetch_stream

Rows = dict[str, dict[str, Any]]
PNL_COLUMNS = tuple(pnl.MODEL.column_names)
PORTFOLIO_COLUMNS = tuple(portfolio.MODEL.column_names)
# Streams up to this long are charted from every event; longer ones from their snapshots.
FOLD_FOR_CHART = 2000


async def leaderboard(pool: asyncpg.Pool, top: int, agent_id: str | None = None) -> dict[str, list[Any]]:
    """Per asset, the first ``top`` places (or only ``agent_id``'s place)."""
    rows = await pool.fetch(
        """SELECT asset, rank, agent_id, net_pnl, roi, win_rate, volume, bet_count FROM (
               SELECT *, row_number() OVER (PARTITION BY asset ORDER BY rank, agent_id) AS place
               FROM leaderboard) ranked
           WHERE ($2::text IS NULL AND place <= $1) OR agent_id = $2
           ORDER BY asset, rank, agent_id""",
        top,
        agent_id,
    )
    boards: dict[str, list[Any]] = {}
    for r in rows:
        boards.setdefault(r["asset"], []).append(r)
    return boards


async def read_models(pool: asyncpg.Pool, agent_id: str) -> dict[str, Rows]:
    """The agent's balances, portfolio and P&L rows as the projectors stored them."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        balances = await conn.fetch("SELECT asset, balance FROM balances WHERE agent_id = $1", agent_id)
        holdings = await conn.fetch(
            f"SELECT asset, {', '.join(PORTFOLIO_COLUMNS)} FROM portfolio WHERE agent_id = $1", agent_id
        )
        pnl_rows = await conn.fetch(
            f"SELECT asset, {', '.join(PNL_COLUMNS)} FROM pnl WHERE agent_id = $1", agent_id
        )
    return {
        "balances": {r["asset"]: {"balance": r["balance"]} for r in sorted(balances, key=_asset)},
        "portfolio": {r["asset"]: {c: r[c] for c in PORTFOLIO_COLUMNS} for r in sorted(holdings, key=_asset)},
        "pnl": {r["asset"]: {c: r[c] for c in PNL_COLUMNS} for r in sorted(pnl_rows, key=_asset)},
    }


def _asset(row: asyncpg.Record) -> str:
    return str(row["asset"])


def state_rows(state: AgentFold) -> dict[str, Rows]:
    """A fold's figures in the shape of :func:`read_models`."""
    return {
        "balances": {a: {"balance": v} for a, v in state.balances().items()},
        "portfolio": state.portfolio_rows(),
        "pnl": state.pnl_rows(),
    }


@dataclass(frozen=True)
class EventFilter:
    types: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class EventPage:
    events: list[asyncpg.Record]
    older: int | None  # the ``before`` of the next page, None at the first event


async def events_page(
    pool: asyncpg.Pool, agent_id: str, before: int | None, limit: int, only: EventFilter
) -> EventPage:
    """Newest first: up to ``limit`` events with a version below ``before`` that pass ``only``."""
    rows = await pool.fetch(
        """SELECT position, event_id, event_type, version, data::text AS data, metadata::text AS metadata,
                  occurred_at, recorded_at, hash
           FROM events
           WHERE stream_id = $1 AND version < $2
             AND (cardinality($3::text[]) = 0 OR event_type = ANY($3))
             AND ($4::timestamptz IS NULL OR occurred_at >= $4)
             AND ($5::timestamptz IS NULL OR occurred_at <= $5)
           ORDER BY version DESC LIMIT $6""",
        agent_id,
        before if before is not None else 2**62,
        list(only.types),
        only.since,
        only.until,
        limit + 1,
    )
    older = rows[limit - 1]["version"] if len(rows) > limit else None
    return EventPage(list(rows[:limit]), older)


async def events_by_id(pool: asyncpg.Pool, agent_id: str, ids: Sequence[uuid.UUID]) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            """SELECT event_id, event_type, version, data::text AS data, occurred_at FROM events
               WHERE stream_id = $1 AND event_id = ANY($2::uuid[]) ORDER BY version""",
            agent_id,
            list(ids),
        )
    )


@dataclass(frozen=True)
class Contribution:
    version: int
    event_id: uuid.UUID
    event_type: str
    occurred_at: datetime
    amount: Decimal  # this event's part of the figure
    running: Decimal  # the figure after this event


@dataclass(frozen=True)
class Explanation:
    figure: Decimal  # the figure now, folded from the events
    contributions: list[Contribution]  # newest first
    older: int | None  # the ``before`` of the next page, None when the first event is shown


# What each explainable figure is in the agent fold, and what one event alone adds to it (the
# figure's own fold applied to that event): one definition for "now", "then" and "this event".
def _balance(state: AgentFold, asset: str) -> Decimal:
    return state.balance.get(asset, Decimal(0))


def _escrow(state: AgentFold, asset: str) -> Decimal:
    return state.in_escrow(asset)


def _pnl_figure(figure: str) -> Any:
    def value(state: AgentFold, asset: str) -> Decimal:
        row = state.pnl.get(asset)
        return Decimal(getattr(row, figure)) if row is not None else Decimal(0)

    return value


FIGURES = {
    "balance": _balance,
    "available": _balance,
    "in_escrow": _escrow,
    **{name: _pnl_figure(name) for name in ("net_pnl", "total_wagered", "total_won", "total_fees")},
    "bet_count": _pnl_figure("bet_count"),
    "win_count": _pnl_figure("win_count"),
}
_SCAN = 2000  # versions read per step, newest first


def part_of(figure: str, event: Event, asset: str) -> Decimal:
    """What ``event`` alone adds to ``figure`` of ``asset``."""
    alone = AgentFold()
    alone.apply(event)
    return FIGURES[figure](alone, asset)


async def explain(
    pool: asyncpg.Pool, agent_id: str, asset: str, figure: str, limit: int, before: int | None = None
) -> Explanation:
    """The newest ``limit`` events (below version ``before``) that moved ``figure`` of ``asset``,
    each with its part and the figure after it.

    The candidates are the events naming the asset (as ``asset``, ``instrument`` or
    ``to_asset``), read backwards a window at a time; the running figure is anchored on the
    fold's state just before the oldest one shown (``shared.history``, snapshot-assisted), so
    a long history costs a page, not a full scan.
    """
    value = FIGURES[figure]
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await stream_head(conn, agent_id)
        if head == 0:
            raise UnknownAgent(agent_id)
        found: list[tuple[RecordedEvent, Decimal]] = []
        top = min(head, (before or head + 1) - 1)
        low = top + 1
        while low > 1 and len(found) < limit:
            low = max(1, low - _SCAN)
            window = await fetch_stream(conn, agent_id, low, min(top, low + _SCAN - 1), naming_asset=asset)
            for recorded in reversed(window):
                event = decoded(recorded)
                if event is not None and (amount := part_of(figure, event, asset)) != 0:
                    found.append((recorded, amount))
            top = low - 1
        found = found[:limit]
        first = found[-1][0].version if found else top + 1
        anchor = await view(conn, agent_id, AsOf(version=max(0, first - 1)))
        now = await view(conn, agent_id)
    running = value(anchor.state, asset)
    contributions = []
    for recorded, amount in reversed(found):
        running += amount
        contributions.append(
            Contribution(
                recorded.version,
                recorded.event_id,
                recorded.event_type,
                recorded.occurred_at,
                amount,
                running,
            )
        )
    contributions.reverse()
    older = first if found and len(found) == limit and first > 1 else None
    return Explanation(value(now.state, asset), contributions, older)


@dataclass(frozen=True)
class Point:
    version: int
    at: datetime
    balances: dict[str, Decimal]


async def balance_points(pool: asyncpg.Pool, agent_id: str, points: int) -> list[Point]:
    """At most about ``points`` states of the agent's balances, spread over its history, with the
    state now last. Short streams are folded event by event; long ones are sampled from their
    trusted snapshots (a snapshot is the fold's state at its version), then the tail is folded."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        head = await stream_head(conn, agent_id)
        if head == 0:
            return []
        if head <= FOLD_FOR_CHART:
            return _sampled(await _folded(conn, agent_id), points)
        sampled = await conn.fetch(
            """WITH s AS (
                   SELECT version, state, event_hash,
                          row_number() OVER (ORDER BY version) AS n, count(*) OVER () AS total
                   FROM snapshots
                   WHERE stream_id = $1 AND snapshot_type = $2 AND schema_version = $3)
               SELECT s.version, s.state::text AS state, e.recorded_at
               FROM s JOIN events e ON e.stream_id = $1 AND e.version = s.version AND e.hash = s.event_hash
               WHERE (s.n - 1) % greatest(1, ceil(s.total / $4::numeric)::int) = 0
               ORDER BY s.version""",
            agent_id,
            SNAPSHOT_TYPE,
            SNAPSHOT_SCHEMA_VERSION,
            max(1, points - 1),
        )
        state, version = await current_state(conn, agent_id)
        last_at = await conn.fetchval(
            "SELECT recorded_at FROM events WHERE stream_id = $1 AND version = $2", agent_id, version
        )
    result = [Point(r["version"], r["recorded_at"], from_json(r["state"]).balances()) for r in sampled]
    if not result:
        # No snapshot yet (the snapshotter is behind): fold it all, once.
        async with pool.acquire() as conn:
            return _sampled(await _folded(conn, agent_id), points)
    return [*result, Point(version, last_at, state.balances())]


async def _folded(conn: asyncpg.Connection, agent_id: str) -> list[Point]:
    state, result = AgentFold(), []
    for recorded in await fetch_stream(conn, agent_id):
        if (event := decoded(recorded)) is not None:
            state.apply(event)
        result.append(Point(recorded.version, recorded.recorded_at, state.balances()))
    return result


def _sampled(all_points: list[Point], points: int) -> list[Point]:
    if len(all_points) <= points:
        return all_points
    step = -(-len(all_points) // max(1, points - 1))
    return [*all_points[:-1:step], all_points[-1]]

"""Time travel and what-if over one agent's stream: exact, read-only, snapshot-assisted.

Every answer is a fold of stored events (upcast on read, see ``fetch_stream``) by the composite
fold of :mod:`shared.projections.agent`. Nothing here writes: a what-if leaves events, snapshots
and read models exactly as they were.

Which events an answer includes:

* ``AsOf(version=N)``: versions 1..N.
* ``AsOf(at=T, by="recorded")``: events with ``recorded_at <= T``. ``recorded_at`` grows with
  position (appends are serialised by one lock), so that is a version prefix too.
* ``AsOf(at=T, by="occurred")``: events with ``occurred_at <= T``, the source's clock. That need
  not be a prefix (an ingester may deliver an older transaction late), so the answer is the
  prefix before the first event that occurred after T, plus the later events that occurred by T.
* ``without``: those events are skipped; ``add``: hypothetical events folded after the rest.

Snapshots are used for the longest version prefix that is folded in full, and only then.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import msgspec

from shared.events import Event, UnknownEventType, decode_data
from shared.projections.agent import (
    SNAPSHOT_SCHEMA_VERSION,
    SNAPSHOT_TYPE,
    AgentFold,
    from_json,
    to_json,
)
from shared.store import EventStore, RecordedEvent, Snapshot, fetch_stream, load_trusted_snapshot
from shared.upcasting import UnreadableEvent

TimeBasis = Literal["occurred", "recorded"]
TIME_BASES: tuple[TimeBasis, ...] = ("occurred", "recorded")


class UnknownAgent(LookupError):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} has no events: check the id (pflea leaderboard lists agents)")
        self.agent_id = agent_id


class HistoryError(ValueError):
    """A question that has no answer as asked (a version past the end, a foreign event id)."""


class AsOf(msgspec.Struct, frozen=True, kw_only=True):
    """Which point of the stream to answer for; the default is now (every event)."""

    version: int | None = None
    at: datetime | None = None
    by: TimeBasis = "occurred"

    def __post_init__(self) -> None:
        if self.version is not None and self.at is not None:
            raise HistoryError("as of: give a version or a time, not both")
        if self.version is not None and self.version < 0:
            raise HistoryError(f"version: must be 0 or more, got {self.version}")
        if self.at is not None and self.at.tzinfo is None:
            raise HistoryError(f"at: {self.at.isoformat()} has no time zone; say which (e.g. +00:00)")
        if self.by not in TIME_BASES:
            raise HistoryError(f"by: choose occurred or recorded, got {self.by!r}")

    @property
    def is_now(self) -> bool:
        return self.version is None and self.at is None


NOW = AsOf()


def parse_time(text: str, field: str = "--at") -> datetime:
    """An ISO 8601 time as people type it (CLI, explorer); one without a zone is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise HistoryError(f"{field}: {text!r} is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_event_ids(texts: Iterable[str], field: str = "--without") -> list[uuid.UUID]:
    ids = []
    for text in texts:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            raise HistoryError(f"{field}: {text!r} is not an event id (a UUID; see pflea events)") from None
    return ids


def parse_added(texts: Iterable[str], field: str = "--add") -> list[Event]:
    """Hypothetical events written ``Type:{json data}``, e.g. ``BetWon:{"amount":"5","asset":"PFLEA"}``."""
    events = []
    for text in texts:
        event_type, _, data = text.partition(":")
        try:
            events.append(decode_data(event_type.strip(), data))
        except (UnknownEventType, msgspec.DecodeError) as exc:
            raise HistoryError(f"{field}: {text!r}: {exc}") from None
    return events


class AgentView(msgspec.Struct, kw_only=True):
    """An agent's state as of some point, and which events made it."""

    agent_id: str
    state: AgentFold
    as_of: AsOf
    version: int  # the highest stream version folded in (0: none)
    head: int  # the stream's version now
    events: int  # stored events folded in
    excluded: tuple[uuid.UUID, ...] = ()
    added: int = 0
    # Stored events folded after ``snapshot_version`` that no fold could read (the projectors
    # quarantine them); a snapshot already skipped those before it.
    undecodable: int = 0
    snapshot_version: int = 0  # the snapshot the fold started from (0: none)
    # Computed from the actual state by taking the excluded events out (AgentFold.without),
    # not by folding the stream again.
    retracted: bool = False


class WhatIf(msgspec.Struct, kw_only=True):
    actual: AgentView
    hypothetical: AgentView

    def difference(self) -> dict[str, dict[str, dict[str, Any]]]:
        """hypothetical − actual per section, asset and figure; only figures that differ."""
        a, h = self.actual.state, self.hypothetical.state
        return {
            "balances": _diff(_wrap(a.balances()), _wrap(h.balances())),
            "pnl": _diff(a.pnl_rows(), h.pnl_rows()),
            "portfolio": _diff(a.portfolio_rows(), h.portfolio_rows()),
        }


def _wrap(balances: dict[str, Decimal]) -> dict[str, dict[str, Any]]:
    return {asset: {"balance": value} for asset, value in balances.items()}


def _diff(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for asset in sorted(set(before) | set(after)):
        old, new = before.get(asset, {}), after.get(asset, {})
        changed = {
            name: new.get(name, 0) - old.get(name, 0)
            for name in dict.fromkeys([*old, *new])
            if new.get(name, 0) != old.get(name, 0)
        }
        if changed:
            result[asset] = changed
    return result


class History:
    """Questions about the past of an agent, on any pool that may SELECT events and snapshots."""

    def __init__(self, pool: asyncpg.Pool, *, use_snapshots: bool = True) -> None:
        self.pool = pool
        self.use_snapshots = use_snapshots

    async def state(
        self,
        agent_id: str,
        as_of: AsOf = NOW,
        *,
        without: Iterable[uuid.UUID] = (),
        add: Sequence[Event] = (),
    ) -> AgentView:
        """The agent's balance, P&L and portfolio as of ``as_of``, minus ``without``, plus ``add``."""
        # One snapshot of the database for the whole answer: the prefix and the tail agree.
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            return await view(conn, agent_id, as_of, without, add, use_snapshots=self.use_snapshots)

    async def what_if(
        self,
        agent_id: str,
        *,
        without: Iterable[uuid.UUID] = (),
        add: Sequence[Event] = (),
        as_of: AsOf = NOW,
    ) -> WhatIf:
        """The state with ``without`` skipped and ``add`` added, next to the state as it is."""
        excluded = list(without)
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            actual = await view(conn, agent_id, as_of, (), (), use_snapshots=self.use_snapshots)
            # Switching off an early event of a long stream would refold all of it (seconds for
            # 100k events); taking its sums out of the actual state is exact and instant.
            hypothetical = await retracted(conn, actual, excluded, add)
            if hypothetical is None:
                hypothetical = await view(
                    conn, agent_id, as_of, excluded, add, use_snapshots=self.use_snapshots
                )
        return WhatIf(actual=actual, hypothetical=hypothetical)


async def view(
    conn: asyncpg.Connection,
    agent_id: str,
    as_of: AsOf = NOW,
    without: Iterable[uuid.UUID] = (),
    add: Sequence[Event] = (),
    *,
    use_snapshots: bool = True,
) -> AgentView:
    """:meth:`History.state` on a given connection (ideally in a repeatable-read transaction)."""
    head = await stream_head(conn, agent_id)
    if head == 0:
        raise UnknownAgent(agent_id)
    prefix, first_after = await _window(conn, agent_id, as_of, head)
    excluded = await _excluded(conn, agent_id, without)
    # The snapshot may only cover versions that are all folded: none excluded, none after T.
    full_prefix = min([prefix, *(r.version - 1 for r in excluded.values())])
    state, start = AgentFold(), 0
    if use_snapshots and full_prefix > 0:
        snapshot = await load_snapshot(conn, agent_id, full_prefix)
        if snapshot is not None:
            state, start = snapshot
    events = await fetch_stream(conn, agent_id, start + 1, prefix) if prefix > start else []
    if first_after is not None and as_of.at is not None:
        # Late arrivals: stored after an event that occurred after T, yet occurred by T.
        events += await fetch_stream(conn, agent_id, first_after + 1, occurred_by=as_of.at)
    skip = set(excluded)
    folded, undecodable, version = 0, 0, start
    for recorded in events:
        if recorded.event_id in skip:
            continue
        folded += 1
        version = max(version, recorded.version)
        event = decoded(recorded)
        if event is None:
            undecodable += 1
            continue
        state.apply(event)
    for event in add:
        state.apply(event)
    return AgentView(
        agent_id=agent_id,
        state=state,
        as_of=as_of,
        version=version,
        head=head,
        events=start + folded,
        excluded=tuple(excluded),
        added=len(add),
        undecodable=undecodable,
        snapshot_version=start,
    )


async def retracted(
    conn: asyncpg.Connection, actual: AgentView, without: Iterable[uuid.UUID], add: Sequence[Event]
) -> AgentView | None:
    """What :func:`view` answers for ``actual``'s point without ``without`` and with ``add``,
    computed from ``actual`` by :meth:`AgentFold.without` instead of a refold; None when that
    cannot tell (then refold): an excluded event is stateful, unreadable, leaves a row at zero,
    or is the last version folded. The figures equal the refold's; a figure may carry more
    trailing zeros (``10.00`` for ``10``) where only an excluded amount had that many places."""
    excluded = await _excluded(conn, actual.agent_id, without)
    prefix, first_after = await _window(conn, actual.agent_id, actual.as_of, actual.head)
    at = actual.as_of.at
    folded = [
        r
        for r in excluded.values()
        if r.version <= prefix
        or (first_after is not None and at is not None and r.version > first_after and r.occurred_at <= at)
    ]
    if actual.version in {r.version for r in folded}:
        return None
    events = [event for r in folded if (event := decoded(r)) is not None]
    if len(events) < len(folded):
        return None  # ``undecodable`` counts from the snapshot a fold starts at: let the refold say
    state = actual.state.without(events)
    if state is None:
        return None
    for event in add:
        state.apply(event)
    return AgentView(
        agent_id=actual.agent_id,
        state=state,
        as_of=actual.as_of,
        version=actual.version,
        head=actual.head,
        events=actual.events - len(folded),
        excluded=tuple(excluded),
        added=len(add),
        undecodable=actual.undecodable,
        snapshot_version=actual.snapshot_version,
        retracted=True,
    )


async def stream_head(conn: asyncpg.Connection, agent_id: str) -> int:
    version = await conn.fetchval(
        "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", agent_id
    )
    return int(version)


async def current_state(
    conn: asyncpg.Connection, agent_id: str, *, use_snapshots: bool = True
) -> tuple[AgentFold, int]:
    """The agent's state now and the version it is at (0 and an empty state: no stream yet)."""
    state, start = AgentFold(), 0
    if use_snapshots:
        snapshot = await load_snapshot(conn, agent_id)
        if snapshot is not None:
            state, start = snapshot
    version = start
    for recorded in await fetch_stream(conn, agent_id, start + 1):
        version = recorded.version
        if (event := decoded(recorded)) is not None:
            state.apply(event)
    return state, version


def decoded(recorded: RecordedEvent) -> Event | None:
    """The event, or None if it is unreadable: skipped, as every fold does (shared.upcasting)."""
    try:
        return recorded.decode()
    except UnreadableEvent:
        return None


async def _window(conn: asyncpg.Connection, agent_id: str, as_of: AsOf, head: int) -> tuple[int, int | None]:
    """(last version of the prefix folded in full, first version after it that is not)."""
    if as_of.version is not None:
        if as_of.version > head:
            raise HistoryError(
                f"version: {agent_id} is at version {head}, there is no version {as_of.version}"
            )
        return as_of.version, None
    if as_of.at is None:
        return head, None
    if as_of.by == "recorded":
        # events_stream_recorded_idx, read backwards from T: one row.
        version = await conn.fetchval(
            """SELECT version FROM events WHERE stream_id = $1 AND recorded_at <= $2
               ORDER BY recorded_at DESC, version DESC LIMIT 1""",
            agent_id,
            as_of.at,
        )
        return int(version or 0), None
    # events_stream_occurred_idx: the first event (by version) whose source time is after T.
    first_after = await conn.fetchval(
        "SELECT min(version) FROM events WHERE stream_id = $1 AND occurred_at > $2", agent_id, as_of.at
    )
    if first_after is None:
        return head, None
    return int(first_after) - 1, int(first_after)


async def _excluded(
    conn: asyncpg.Connection, agent_id: str, without: Iterable[uuid.UUID]
) -> dict[uuid.UUID, RecordedEvent]:
    """The stored events ``without`` names, in the order named; an id not of this agent is an error."""
    ids = list(dict.fromkeys(without))
    if not ids:
        return {}
    stored = {r.event_id: r for r in await fetch_stream(conn, agent_id, event_ids=ids)}
    found = {i: stored[i] for i in ids if i in stored}
    missing = [str(i) for i in ids if i not in found]
    if missing:
        raise HistoryError(f"without: not events of {agent_id}: {', '.join(missing[:5])}")
    return found


async def load_snapshot(
    conn: asyncpg.Connection, agent_id: str, at_or_before: int | None = None
) -> tuple[AgentFold, int] | None:
    """The newest usable snapshot at or before a version: (state, version). Usable: of this
    schema, and taken of the history stored now (its event hash matches; else it is ignored)."""
    snapshot = await load_trusted_snapshot(
        conn, agent_id, SNAPSHOT_TYPE, SNAPSHOT_SCHEMA_VERSION, at_or_before
    )
    if snapshot is None:
        return None
    return from_json(snapshot.state), snapshot.version


def snapshot_of(agent_id: str, state: AgentFold, version: int, event_hash: bytes) -> Snapshot:
    return Snapshot(agent_id, SNAPSHOT_TYPE, version, SNAPSHOT_SCHEMA_VERSION, to_json(state), event_hash)


async def take_snapshots(
    store: EventStore, conn: asyncpg.Connection, agent_id: str, every: int, head: int
) -> int:
    """Save the state at each multiple of ``every`` up to ``head`` not saved yet; returns how many.

    Folds forward from the newest snapshot, so a stream is read once however far behind it is.
    A snapshot at version v is the state after versions 1..v, which never changes: saving one
    twice (two writers) is a no-op.
    """
    state, start = AgentFold(), 0
    snapshot = await load_snapshot(conn, agent_id, head)
    if snapshot is not None:
        state, start = snapshot
    if head // every <= start // every:
        return 0
    saved = 0
    last_wanted = head - head % every
    for recorded in await fetch_stream(conn, agent_id, start + 1, last_wanted):
        if (event := decoded(recorded)) is not None:
            state.apply(event)
        if recorded.version % every == 0:
            await store.save_snapshot(snapshot_of(agent_id, state, recorded.version, recorded.hash))
            saved += 1
    return saved

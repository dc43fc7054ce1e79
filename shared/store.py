"""The Postgres event store: append with optimistic concurrency, read a stream or the log.

Ordering guarantee: positions become visible in increasing order (see the INSERT trigger in
``001_event_store.sql``), so ``read_all(after_position)`` never skips a committed event.
Idempotency: ``event_id`` is unique; re-appending events already stored is a no-op, and is
told apart from a real version conflict.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from shared import locks
from shared.events import Event, encode_data, event_type_of, schema_version_of
from shared.upcasting import UpcastError, decode_event, upcast

log = logging.getLogger(__name__)

EVENT_COLUMNS = (
    "event_id",
    "stream_id",
    "stream_type",
    "event_type",
    "version",
    "data",
    "metadata",
    "occurred_at",
)

_SELECT = """
    SELECT position, event_id, stream_id, stream_type, event_type, version, data,
           metadata, (metadata->>'schema_version')::int AS schema_version,
           occurred_at, recorded_at, hash
    FROM events
"""

_meta_encoder = msgspec.json.Encoder()


class OptimisticConcurrencyError(Exception):
    """The stream moved on since the caller read it: reload, decide again, retry."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r} is at version {actual}, expected {expected}: reload the stream and retry"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventError(Exception):
    """Some, not all, of the appended event ids exist already, or exist in another stream."""

    def __init__(self, stream_id: str, event_ids: Sequence[uuid.UUID]) -> None:
        shown = ", ".join(map(str, event_ids[:5]))
        super().__init__(f"stream {stream_id!r}: event ids already stored elsewhere: {shown}")
        self.stream_id = stream_id
        self.event_ids = list(event_ids)


class NewEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event about to be stored. ``data`` is its JSON; ``metadata`` extra context."""

    event_id: uuid.UUID
    event_type: str
    data: str
    occurred_at: datetime
    schema_version: int = 1
    causation_id: str | None = None
    correlation_id: str | None = None
    metadata: dict[str, Any] = {}

    @classmethod
    def of(
        cls,
        event: Event,
        *,
        event_id: uuid.UUID | None = None,
        occurred_at: datetime | None = None,
        causation_id: str | None = None,
        correlation_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> NewEvent:
        event_type = event_type_of(event)
        return cls(
            event_id=event_id or uuid.uuid4(),
            event_type=event_type,
            data=encode_data(event).decode(),
            occurred_at=occurred_at or datetime.now(UTC),
            schema_version=schema_version_of(event_type),
            causation_id=causation_id,
            correlation_id=correlation_id,
            metadata=metadata or {},
        )

    def metadata_json(self) -> str:
        meta = dict(self.metadata)
        meta["schema_version"] = self.schema_version
        if self.causation_id is not None:
            meta["causation_id"] = self.causation_id
        if self.correlation_id is not None:
            meta["correlation_id"] = self.correlation_id
        return _meta_encoder.encode(meta).decode()


class StreamEvent(msgspec.Struct, frozen=True, gc=False):
    """One event addressed to a stream: the unit of the writer's batch append."""

    stream_id: str
    stream_type: str
    event: NewEvent


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event as stored, in its current schema shape."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    stream_type: str
    event_type: str
    version: int
    data: str
    metadata: str
    schema_version: int
    occurred_at: datetime
    recorded_at: datetime
    hash: bytes = b""  # its link in the stream's hash chain (migration 008)

    def decode(self) -> Event:
        """The event, under the one decode policy (raises ``UnreadableEvent``)."""
        return decode_event(self.event_type, self.schema_version, self.data)

    def meta(self) -> dict[str, Any]:
        result: dict[str, Any] = msgspec.json.decode(self.metadata)
        return result


class Appended(msgspec.Struct, frozen=True, gc=False):
    event_id: uuid.UUID
    stream_id: str
    version: int


class Collision(msgspec.Struct, frozen=True, gc=False):
    """An event whose id is stored already, but in another stream: not a duplicate of it."""

    item: StreamEvent
    stored_in: str


class BatchResult(msgspec.Struct, frozen=True):
    appended: list[Appended]
    duplicates: list[uuid.UUID]
    collisions: list[Collision] = []


class StreamHeads:
    """The last version of each stream as this process committed it, so a steady appender need
    not read heads nor look for duplicates on every batch.

    Optimistic and safe: entries move only after a commit, and nothing removes events, so an
    entry is at most behind the table (another process appended since). Appending after a
    stale head, or an event id already stored, fails on a unique key; the batch is then redone
    the careful way (read heads, skip duplicates) and the entries are refreshed.
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self.versions: dict[str, int] = {}
        self.misses = 0  # batches redone the careful way

    def committed(self, appended: Iterable[Appended]) -> None:
        """Remember the heads just committed; at ``capacity`` streams, start over (a forgotten
        head only costs one batch done the careful way)."""
        for a in appended:
            if a.stream_id not in self.versions and len(self.versions) >= self.capacity:
                self.versions.clear()
            self.versions[a.stream_id] = a.version

    def forget(self, stream_ids: Iterable[str]) -> None:
        for stream_id in stream_ids:
            self.versions.pop(stream_id, None)


class Snapshot(msgspec.Struct, frozen=True):
    stream_id: str
    snapshot_type: str
    version: int
    schema_version: int
    state: str
    # The hash of the event at ``version``: a snapshot is trusted only while the stored event
    # still has it (see load_trusted_snapshot).
    event_hash: bytes = b""


def _recorded(row: asyncpg.Record) -> RecordedEvent:
    try:
        data, schema_version = upcast(row["event_type"], row["schema_version"], row["data"])
    except (UpcastError, msgspec.MsgspecError, KeyError, TypeError, ValueError):
        # Unreadable (see shared.upcasting): kept as stored; decode() says why.
        data, schema_version = row["data"], row["schema_version"]
    return RecordedEvent(
        position=row["position"],
        event_id=row["event_id"],
        stream_id=row["stream_id"],
        stream_type=row["stream_type"],
        event_type=row["event_type"],
        version=row["version"],
        data=data,
        metadata=row["metadata"],
        schema_version=schema_version,
        occurred_at=row["occurred_at"],
        recorded_at=row["recorded_at"],
        hash=row["hash"],
    )


class EventStore:
    """The system of record, on an asyncpg pool whose role may only INSERT and SELECT."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._aliases: bool | None = None

    async def append(
        self,
        stream_id: str,
        stream_type: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> int:
        """Append ``events`` at the end of ``stream_id``; return the stream's new version.

        ``expected_version`` is the version the caller decided against (0: the stream must not
        exist yet; None: append wherever the stream is). Raises ``OptimisticConcurrencyError``
        if the stream is elsewhere. Appending events whose ids are all already in this stream is
        a no-op that returns the version of the last of them. With ``conn``, runs inside the
        caller's transaction (which then holds the append lock until it ends).
        """
        if not events:
            raise ValueError("events: nothing to append")
        ids = [e.event_id for e in events]
        if len(set(ids)) != len(ids):
            raise ValueError("events: the same event_id appears twice in one append")
        if conn is None:
            async with self.pool.acquire() as own, own.transaction():
                return await self._append(own, stream_id, stream_type, events, expected_version)
        return await self._append(conn, stream_id, stream_type, events, expected_version)

    async def _append(
        self,
        conn: asyncpg.Connection,
        stream_id: str,
        stream_type: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
    ) -> int:
        ids = [e.event_id for e in events]
        await conn.execute(_LOCK_APPENDS)
        stored = await conn.fetch(
            "SELECT event_id, stream_id, version FROM events WHERE event_id = ANY($1::uuid[])",
            ids,
        )
        if stored:
            if len(stored) == len(ids) and all(r["stream_id"] == stream_id for r in stored):
                return int(max(r["version"] for r in stored))
            raise DuplicateEventError(stream_id, [r["event_id"] for r in stored])
        current = await conn.fetchval(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id
        )
        if expected_version is not None and current != expected_version:
            raise OptimisticConcurrencyError(stream_id, expected_version, current)
        records = [event_record(stream_id, stream_type, current + i, e) for i, e in enumerate(events, 1)]
        await _insert(conn, records)
        return int(current) + len(events)

    async def append_batch(
        self,
        items: Iterable[StreamEvent],
        *,
        conn: asyncpg.Connection | None = None,
        heads: StreamHeads | None = None,
    ) -> BatchResult:
        """Append events for many streams in one transaction, each at its stream's end.

        The writer's hot path. Versions follow the order of ``items`` within each stream.
        Events whose ids are already stored (or repeated within ``items``) are reported as
        duplicates and skipped. With ``conn``, runs inside the caller's transaction; with
        ``heads`` (own transaction only), known stream heads are trusted (see StreamHeads).
        """
        batch = list(items)
        if conn is not None:
            return await self._append_batch(conn, batch)
        if heads is None or await self._has_aliases():
            async with self.pool.acquire() as own, own.transaction():
                return await self._append_batch(own, batch)
        try:
            async with self.pool.acquire() as own, own.transaction():
                result = await self._append_trusting(own, batch, heads)
        except BaseException:
            heads.forget(item.stream_id for item in batch)  # the outcome may be unknown
            raise
        heads.committed(result.appended)
        return result

    async def _append_trusting(
        self, conn: asyncpg.Connection, items: list[StreamEvent], heads: StreamHeads
    ) -> BatchResult:
        await conn.execute(_LOCK_APPENDS)
        streams = list(dict.fromkeys(item.stream_id for item in items))
        known = heads.versions
        unknown = [s for s in streams if s not in known]
        versions = {s: known[s] for s in streams if s in known}
        if unknown:
            versions.update(await _heads(conn, unknown))
        seen: dict[uuid.UUID, str] = {}
        if len({item.event.event_id for item in items}) == len(items):
            try:
                async with conn.transaction():  # a savepoint: a unique violation undoes only this
                    return await _insert_at(conn, items, versions, seen)
            except asyncpg.UniqueViolationError:
                pass
        heads.misses += 1
        heads.forget(streams)
        return await self._append_batch(conn, items)

    async def _has_aliases(self) -> bool:
        """Whether a migration aliased old event ids: then every batch looks them up (the
        trusting path learns of duplicates only from unique keys, which aliases are not)."""
        if self._aliases is None:
            self._aliases = bool(await self.pool.fetchval("SELECT EXISTS (SELECT 1 FROM event_aliases)"))
        return self._aliases

    async def _append_batch(self, conn: asyncpg.Connection, items: list[StreamEvent]) -> BatchResult:
        if not items:
            return BatchResult([], [])
        await conn.execute(_LOCK_APPENDS)
        stored = await _stored_ids(conn, [item.event.event_id for item in items])
        streams = list(dict.fromkeys(item.stream_id for item in items))
        return await _insert_at(conn, items, await _heads(conn, streams), stored)

    async def stored(self, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Which of ``event_ids`` are in the log."""
        return set(await _stored_ids(self.pool, event_ids))

    async def read_stream(
        self, stream_id: str, from_version: int = 1, to_version: int | None = None
    ) -> list[RecordedEvent]:
        """The events of ``stream_id`` with ``from_version <= version <= to_version``, in order."""
        async with self.pool.acquire() as conn:
            return await fetch_stream(conn, stream_id, from_version, to_version)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[RecordedEvent]:
        """Up to ``limit`` events after ``after_position``, in position order, none skipped."""
        rows = await self.pool.fetch(
            _SELECT + "WHERE position > $1 ORDER BY position LIMIT $2", after_position, limit
        )
        return [_recorded(r) for r in rows]

    async def stream_version(self, stream_id: str) -> int:
        version = await self.pool.fetchval(
            "SELECT coalesce(max(version), 0) FROM events WHERE stream_id = $1", stream_id
        )
        return int(version)

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a state as of ``snapshot.version``; saving the same one twice is a no-op."""
        await self.pool.execute(
            """INSERT INTO snapshots (stream_id, snapshot_type, version, schema_version, state, event_hash)
               VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING""",
            snapshot.stream_id,
            snapshot.snapshot_type,
            snapshot.version,
            snapshot.schema_version,
            snapshot.state,
            snapshot.event_hash,
        )

    async def load_snapshot(
        self,
        stream_id: str,
        snapshot_type: str,
        at_or_before: int | None = None,
        *,
        conn: asyncpg.Connection | None = None,
    ) -> Snapshot | None:
        """The newest trusted snapshot of ``stream_id`` at or before version ``at_or_before``."""
        if conn is not None:
            return await load_trusted_snapshot(conn, stream_id, snapshot_type, None, at_or_before)
        async with self.pool.acquire() as acquired:
            return await load_trusted_snapshot(acquired, stream_id, snapshot_type, None, at_or_before)


# How many untrusted snapshots a load steps over before it folds from the start instead.
_SNAPSHOT_CANDIDATES = 8


async def load_trusted_snapshot(
    conn: asyncpg.Connection,
    stream_id: str,
    snapshot_type: str,
    schema_version: int | None,
    at_or_before: int | None,
) -> Snapshot | None:
    """The newest snapshot at or before ``at_or_before`` whose ``event_hash`` is the hash the
    event at its version has now. One that does not match (forged, or taken of a history that
    was rewritten since) is logged and ignored, never folded from."""
    rows = await conn.fetch(
        """SELECT s.stream_id, s.snapshot_type, s.version, s.schema_version, s.state, s.event_hash,
                  e.hash AS stored_hash
           FROM snapshots s
           LEFT JOIN events e ON e.stream_id = s.stream_id AND e.version = s.version
           WHERE s.stream_id = $1 AND s.snapshot_type = $2 AND s.version <= $3
             AND ($4::int IS NULL OR s.schema_version = $4)
           ORDER BY s.version DESC LIMIT $5""",
        stream_id,
        snapshot_type,
        at_or_before if at_or_before is not None else 2**62,
        schema_version,
        _SNAPSHOT_CANDIDATES,
    )
    for row in rows:
        if row["event_hash"] is not None and row["event_hash"] == row["stored_hash"]:
            fields = dict(row)
            del fields["stored_hash"]
            return Snapshot(**fields)
        log.warning(
            "snapshot ignored: its event hash does not match the stored event",
            extra={"stream": stream_id, "version": row["version"], "snapshot_type": snapshot_type},
        )
    return None


async def fetch_stream(
    conn: asyncpg.Connection,
    stream_id: str,
    from_version: int = 1,
    to_version: int | None = None,
    *,
    occurred_by: datetime | None = None,
    naming_asset: str | None = None,
    event_ids: Sequence[uuid.UUID] | None = None,
) -> list[RecordedEvent]:
    """``read_stream`` on a given connection (inside the caller's transaction).

    ``occurred_by`` keeps only the events whose source time is at or before it;
    ``naming_asset`` those whose data names that asset (as asset, instrument or to_asset);
    ``event_ids`` those with these ids.
    """
    where = "WHERE stream_id = $1 AND version >= $2 AND version <= $3"
    args: list[Any] = [stream_id, from_version, to_version if to_version is not None else 2**62]
    if occurred_by is not None:
        args.append(occurred_by)
        where += f" AND occurred_at <= ${len(args)}"
    if naming_asset is not None:
        args.append(naming_asset)
        n = len(args)
        where += f" AND (data->>'asset' = ${n} OR data->>'instrument' = ${n} OR data->>'to_asset' = ${n})"
    if event_ids is not None:
        args.append(list(event_ids))
        where += f" AND event_id = ANY(${len(args)}::uuid[])"
    rows = await conn.fetch(_SELECT + where + " ORDER BY version", *args)
    return [_recorded(r) for r in rows]


def event_record(stream_id: str, stream_type: str, version: int, event: NewEvent) -> tuple[Any, ...]:
    """The row of ``events`` (in ``EVENT_COLUMNS`` order) that COPY writes for ``event``."""
    return (
        event.event_id,
        stream_id,
        stream_type,
        event.event_type,
        version,
        event.data,
        event.metadata_json(),
        event.occurred_at,
    )


# Every append takes this lock (the INSERT trigger takes it too); taking it first keeps the
# heads read below valid until the commit.
_LOCK_APPENDS = f"SELECT pg_advisory_xact_lock({locks.APPENDS})"


async def _stored_ids(conn: asyncpg.Connection | asyncpg.Pool, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Which of ``ids`` are stored (or aliased), and in which stream."""
    rows = await conn.fetch(
        """SELECT event_id, stream_id FROM events WHERE event_id = ANY($1::uuid[])
           UNION ALL SELECT alias_id, stream_id FROM event_aliases WHERE alias_id = ANY($1::uuid[])""",
        ids,
    )
    return {r["event_id"]: r["stream_id"] for r in rows}


async def _heads(conn: asyncpg.Connection, streams: list[str]) -> dict[str, int]:
    """The last version of each of ``streams`` (0 for a new stream)."""
    rows = await conn.fetch(
        """SELECT s, coalesce((SELECT max(version) FROM events e WHERE e.stream_id = s), 0) AS v
           FROM unnest($1::text[]) AS s""",
        streams,
    )
    return {r["s"]: r["v"] for r in rows}


async def _insert_at(
    conn: asyncpg.Connection, items: list[StreamEvent], heads: dict[str, int], stored: dict[uuid.UUID, str]
) -> BatchResult:
    """Insert ``items`` after ``heads`` (updated in place), skipping ids in ``stored`` (id ->
    stream): a duplicate when stored in the item's own stream, else a collision, never dropped
    silently: the caller must quarantine it."""
    duplicates: list[uuid.UUID] = []
    collisions: list[Collision] = []
    appended: list[Appended] = []
    records = []
    for item in items:
        event_id = item.event.event_id
        if (stream := stored.get(event_id)) is not None:
            if stream == item.stream_id:
                duplicates.append(event_id)
            else:
                collisions.append(Collision(item, stream))
            continue
        stored[event_id] = item.stream_id
        version = heads[item.stream_id] + 1
        heads[item.stream_id] = version
        records.append(event_record(item.stream_id, item.stream_type, version, item.event))
        appended.append(Appended(event_id, item.stream_id, version))
    await _insert(conn, records)
    return BatchResult(appended, duplicates, collisions)


async def _insert(conn: asyncpg.Connection, records: list[tuple[Any, ...]]) -> None:
    if not records:
        return
    if len(records) < 64:
        # A few rows: one unnest INSERT is cheaper than setting up COPY.
        cols = list(zip(*records, strict=True))
        await conn.execute(
            """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                                   metadata, occurred_at)
               SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                                    $6::jsonb[], $7::jsonb[], $8::timestamptz[])""",
            *cols,
        )
    else:
        await conn.copy_records_to_table("events", records=records, columns=EVENT_COLUMNS)

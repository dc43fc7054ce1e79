"""Rebuild a projection from the log into a new table, then swap it in atomically.

1. In one REPEATABLE READ snapshot, stream every event (large cursor batches) through the pure
   fold, in memory: read models are per (agent, asset), small beside the log.
2. COPY the rows into ``<table>_rebuild``.
3. Swap, in one transaction holding the projection's lock exclusively (live batches wait, reads
   do not): fold the events committed since the snapshot, replace the live rows and the
   checkpoints with the rebuilt ones. Readers see the old rows until that commit, then the new.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.projectors.tables import save_states
from shared import locks
from shared.db import connect
from shared.projections.model import AgentState, ReadModel
from shared.quarantine import Quarantine
from shared.upcasting import UnreadableEvent, decode_event

log = logging.getLogger(__name__)

_FOLD_SQL = """
    SELECT stream_id, version, position, event_type, data,
           (metadata->>'schema_version')::int AS schema_version, recorded_at
    FROM events WHERE position > $1 ORDER BY position
"""


@dataclass
class RebuildReport:
    projection: str
    events: int
    rows: int
    seconds: float
    position: int

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class _Fold:
    def __init__(self, model: ReadModel[Any]) -> None:
        self.model = model
        self.states: dict[str, AgentState[Any]] = {}
        self.checkpoints: dict[str, tuple[int, int]] = {}
        self.position = 0
        self.events = 0
        self.last_recorded_at = None
        self.poison: list[tuple[Any, str]] = []
        self.touched: set[str] = set()

    def add(self, row: asyncpg.Record) -> None:
        stream = row["stream_id"]
        state = self.states.get(stream)
        if state is None:
            state = self.states[stream] = {}
        try:
            event = decode_event(row["event_type"], row["schema_version"], row["data"])
        except UnreadableEvent as exc:
            self.poison.append((row, str(exc)))
        else:
            self.model.apply(state, event)
        self.checkpoints[stream] = (row["version"], row["position"])
        self.touched.add(stream)
        self.position = row["position"]
        self.last_recorded_at = row["recorded_at"]
        self.events += 1

    async def read(self, conn: asyncpg.Connection, after: int) -> None:
        async for row in conn.cursor(_FOLD_SQL, after, prefetch=20000):
            self.add(row)


async def rebuild(owner_dsn: str, model: ReadModel[Any]) -> RebuildReport:
    """Rebuild ``model`` from the whole log; the live projector keeps serving meanwhile."""
    started = time.perf_counter()
    fold = _Fold(model)
    conn = await connect(owner_dsn)
    staging = f"{model.table}_rebuild"
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await fold.read(conn, 0)
        await conn.execute(f"DROP TABLE IF EXISTS {staging}")
        await conn.execute(f"CREATE UNLOGGED TABLE {staging} (LIKE {model.table} INCLUDING ALL)")
        await _copy_rows(conn, model, fold, staging)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", locks.projection(model.name))
            fold.touched.clear()
            await fold.read(conn, fold.position)  # what was committed since the snapshot
            if fold.touched:
                changed = {s: fold.states[s] for s in fold.touched}
                await save_states(
                    conn, model, changed, {s: fold.checkpoints[s][1] for s in changed}, table=staging
                )
            await _swap(conn, model, fold, staging)
            await _quarantine_poison(conn, model, fold)
        await conn.execute(f"DROP TABLE IF EXISTS {staging}")
        rows = int(await conn.fetchval(f"SELECT count(*) FROM {model.table}"))
    finally:
        await conn.close()
    return RebuildReport(model.name, fold.events, rows, time.perf_counter() - started, fold.position)


async def _quarantine_poison(conn: asyncpg.Connection, model: ReadModel[Any], fold: _Fold) -> None:
    quarantine = Quarantine(None, f"projector:{model.name}")  # type: ignore[arg-type]
    for row, reason in fold.poison:
        await quarantine.put(
            row["data"].encode(),
            f"rebuild {model.name}: cannot apply {row['event_type']} v{row['version']} of "
            f"{row['stream_id']} (position {row['position']}): {reason}",
            agent_id=row["stream_id"],
            key=f"position:{row['position']}",
            conn=conn,
        )


async def _copy_rows(conn: asyncpg.Connection, model: ReadModel[Any], fold: _Fold, table: str) -> None:
    records = [
        (agent, asset, *model.to_row(value), fold.checkpoints[agent][1])
        for agent, state in fold.states.items()
        for asset, value in state.items()
    ]
    await conn.copy_records_to_table(
        table, records=records, columns=["agent_id", "asset", *model.column_names, "last_position"]
    )


async def _swap(conn: asyncpg.Connection, model: ReadModel[Any], fold: _Fold, staging: str) -> None:
    columns = ", ".join(["agent_id", "asset", *model.column_names, "last_position"])
    await conn.execute(f"DELETE FROM {model.table}")
    await conn.execute(f"INSERT INTO {model.table} ({columns}) SELECT {columns} FROM {staging}")
    await conn.execute("DELETE FROM projection_checkpoints WHERE projection = $1", model.name)
    streams = list(fold.checkpoints)
    await conn.execute(
        """INSERT INTO projection_checkpoints (projection, stream_id, version, position)
           SELECT $1, * FROM unnest($2::text[], $3::bigint[], $4::bigint[])""",
        model.name,
        streams,
        [fold.checkpoints[s][0] for s in streams],
        [fold.checkpoints[s][1] for s in streams],
    )
    await conn.execute(
        """INSERT INTO projection_positions (projection, position, applied_event_at)
           VALUES ($1, $2, $3)
           ON CONFLICT (projection) DO UPDATE
           SET position = EXCLUDED.position, applied_event_at = EXCLUDED.applied_event_at,
               updated_at = clock_timestamp()""",
        model.name,
        fold.position,
        fold.last_recorded_at,
    )

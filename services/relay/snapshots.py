"""Snapshotter: save each agent's state every ``PFLEA_SNAPSHOT_EVERY`` versions, as streams grow.

It tails the log by position (ids and versions only, so catching up is cheap), and when a stream
passes a multiple of ``every`` it folds forward from that stream's newest snapshot and saves one
at each multiple. Snapshots are an optimisation: time travel and command decisions are exact
without them, only slower. Every replica may run one: a snapshot at a version never
changes, so two savers write the same row and the second is a no-op.
"""

from __future__ import annotations

import logging

import asyncpg
from prometheus_client import Counter

from shared.db import TRANSIENT_DB_ERRORS
from shared.history import take_snapshots
from shared.ops import Lifecycle
from shared.projections.agent import SNAPSHOT_SCHEMA_VERSION, SNAPSHOT_TYPE
from shared.store import EventStore

log = logging.getLogger(__name__)

SAVED = Counter("pflea_writer_snapshots_saved_total", "Agent state snapshots saved")
CHECKPOINT = "agent"


class Snapshotter:
    def __init__(
        self,
        store: EventStore,
        lifecycle: Lifecycle,
        *,
        every: int,
        poll_s: float = 1.0,
        batch_size: int = 5000,
    ) -> None:
        self.store = store
        self.pool: asyncpg.Pool = store.pool
        self.lifecycle = lifecycle
        self.every = every
        self.poll_s = poll_s
        self.batch_size = batch_size

    async def run(self) -> None:
        while not self.lifecycle.stopping.is_set():
            try:
                read = await self.snapshot_once()
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("snapshotter lost Postgres (%r); retrying", exc)
                read = 0
            except Exception:
                # Snapshots only make reads faster: a failure here must not stop the writer's
                # consumer, relay or commands, so it is logged and retried later.
                log.exception("snapshotter failed; retrying in a minute")
                if await self.lifecycle.sleep(60.0):
                    return
                continue
            if read < self.batch_size and await self.lifecycle.sleep(self.poll_s):
                return

    async def snapshot_once(self) -> int:
        """Read the next batch of the log and snapshot the streams it moved; returns rows read."""
        async with self.pool.acquire() as conn:
            position = await self._checkpoint(conn)
            rows = await conn.fetch(
                """SELECT position, stream_id, version FROM events
                   WHERE position > $1 ORDER BY position LIMIT $2""",
                position,
                self.batch_size,
            )
            if not rows:
                return 0
            heads: dict[str, int] = {}
            for row in rows:
                heads[row["stream_id"]] = max(heads.get(row["stream_id"], 0), row["version"])
            latest = await self._latest_snapshots(conn, list(heads))
            for stream_id, head in heads.items():
                if head // self.every > latest.get(stream_id, 0) // self.every:
                    SAVED.inc(await take_snapshots(self.store, conn, stream_id, self.every, head))
            await conn.execute(
                """UPDATE snapshot_checkpoints SET position = greatest(position, $2),
                          updated_at = clock_timestamp()
                   WHERE name = $1""",
                CHECKPOINT,
                rows[-1]["position"],
            )
            return len(rows)

    async def _checkpoint(self, conn: asyncpg.Connection) -> int:
        await conn.execute(
            "INSERT INTO snapshot_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", CHECKPOINT
        )
        return int(
            await conn.fetchval("SELECT position FROM snapshot_checkpoints WHERE name = $1", CHECKPOINT)
        )

    async def _latest_snapshots(self, conn: asyncpg.Connection, streams: list[str]) -> dict[str, int]:
        rows = await conn.fetch(
            """SELECT stream_id, max(version) AS version FROM snapshots
               WHERE snapshot_type = $1 AND schema_version = $2 AND stream_id = ANY($3::text[])
               GROUP BY stream_id""",
            SNAPSHOT_TYPE,
            SNAPSHOT_SCHEMA_VERSION,
            streams,
        )
        return {r["stream_id"]: int(r["version"]) for r in rows}

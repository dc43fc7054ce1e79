"""The dead-letter table: raw payload plus reason for anything that cannot become an event."""

from __future__ import annotations

import hashlib
import logging

import asyncpg
from prometheus_client import Counter

log = logging.getLogger(__name__)

QUARANTINED = Counter(
    "pflea_quarantine_total", "Inputs put in quarantine instead of becoming events", ["source"]
)


class Quarantine:
    def __init__(self, pool: asyncpg.Pool, source: str) -> None:
        self.pool = pool
        self.source = source

    async def put(
        self,
        raw: bytes,
        reason: str,
        *,
        agent_id: str | None = None,
        subject: str | None = None,
        key: str | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> None:
        """Keep ``raw`` with ``reason``; the same input quarantined twice is counted, not copied.

        ``key`` identifies the input when its bytes alone do not (e.g. a source transaction id).
        """
        dedup = hashlib.sha256(b"\0".join([self.source.encode(), (key or "").encode(), raw])).hexdigest()
        sql = """INSERT INTO quarantine (source, reason, raw, agent_id, subject, dedup_key)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (dedup_key) DO UPDATE
                 SET seen_count = quarantine.seen_count + 1, last_seen_at = clock_timestamp()"""
        args = (self.source, reason[:2000], raw, agent_id, subject, dedup)
        if conn is not None:
            await conn.execute(sql, *args)
        else:
            await self.pool.execute(sql, *args)
        QUARANTINED.labels(self.source).inc()
        log.warning(
            "quarantined input", extra={"source": self.source, "agent": agent_id, "reason": reason[:300]}
        )

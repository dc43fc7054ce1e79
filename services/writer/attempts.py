"""Crash-loop protection: the writer's own count of attempts at each PFLEA_TX message.

JetStream's delivery count grows for every message a dying writer merely held, so the writer
keeps its own, in Postgres, committed *before* each attempt: a message that kills the writer is
counted although the writer dies with it. Past ``ISOLATE_AFTER`` tries a batch is committed one
message at a time, and a message tried ``PFLEA_WRITER_MAX_DELIVER`` times is quarantined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncpg

from services.writer.messages import Item
from shared.db import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)

# A message delivered this often without a commit may be killing the writer: isolate it.
ISOLATE_AFTER = 3

_COUNT = """
    INSERT INTO writer_attempts (msg_key, attempts) SELECT k, 1 FROM unnest($1::text[]) AS k
    ON CONFLICT (msg_key) DO UPDATE
    SET attempts = writer_attempts.attempts + 1, last_at = clock_timestamp()
    RETURNING msg_key, attempts"""
_READ = "SELECT msg_key, attempts FROM writer_attempts WHERE msg_key = ANY($1::text[])"
_FORGET_OLD = "DELETE FROM writer_attempts WHERE last_at < now() - interval '8 days'"


def isolate_after(max_deliver: int) -> int:
    """How many tries make a message suspect: ISOLATE_AFTER, earlier if the limit is lower."""
    return max(1, min(ISOLATE_AFTER, max_deliver - 1))


def needs_isolation(items: Sequence[Item], tried: dict[str, int], threshold: int) -> bool:
    """Whether any message in hand is on its ``threshold``-th try (JetStream's count or ours)."""
    return any(max(i.delivered, tried.get(i.key, 0) + 1) >= threshold for i in items)


class AttemptLedger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def read(self, items: Sequence[Item]) -> dict[str, int] | None:
        """Attempts so far per message key; None when Postgres cannot be reached."""
        return await self._run(_READ, items)

    async def count(self, items: Sequence[Item]) -> dict[str, int] | None:
        """One more attempt at each of ``items``, committed now; the new counts (or None)."""
        return await self._run(_COUNT, items)

    async def forget_old(self) -> None:
        await self.pool.execute(_FORGET_OLD)

    async def _run(self, sql: str, items: Sequence[Item]) -> dict[str, int] | None:
        if not items:
            return {}
        keys = list(dict.fromkeys(i.key for i in items))
        try:
            rows = await self.pool.fetch(sql, keys)
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("cannot count attempts (%r); batch left for redelivery", exc)
            return None
        return {r["msg_key"]: r["attempts"] for r in rows}

"""Commit transactions to the log, whatever Postgres says: retry what is transient, isolate by
halving what it refuses, quarantine the refused ones and any id stored in another stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from services.writer.messages import Tx
from shared.db import TRANSIENT_DB_ERRORS
from shared.envelope import TxEnvelope
from shared.faults import delay_s, fail_point
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.store import BatchResult, EventStore, StreamHeads
from shared.wire import tx_encoder

log = logging.getLogger(__name__)

APPENDED = Counter("pflea_writer_events_appended_total", "Events committed to Postgres")
DUPLICATES = Counter("pflea_writer_duplicates_total", "Messages whose event was already stored")
BATCH_SECONDS = Histogram(
    "pflea_writer_batch_seconds",
    "Append + commit time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class Appender:
    def __init__(
        self,
        store: EventStore,
        quarantine: Quarantine,
        lifecycle: Lifecycle,
        *,
        on_commit: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.quarantine = quarantine
        self.lifecycle = lifecycle
        self.on_commit = on_commit
        self.heads = StreamHeads()

    async def commit(self, txs: list[Tx], kept: list[Msg]) -> bool:
        """Commit ``txs`` (quarantining any Postgres rejects); False if stopped first. ``kept``,
        their messages, are marked in progress while Postgres is retried."""
        attempt = 0
        while True:
            started = time.perf_counter()
            if slow := delay_s("writer.append"):  # a slow database, for the tests
                await asyncio.sleep(slow)
            try:
                result = await self.store.append_batch([t.event for t in txs], heads=self.heads)
                fail_point("writer.commit_reply_lost")  # committed, but the caller cannot know
            except TRANSIENT_DB_ERRORS as exc:
                # Outcome unknown (the commit may have landed): retrying is safe because event
                # ids are unique. The messages stay ours meanwhile (in progress), not redelivered.
                attempt += 1
                log.warning("append failed (%r); retry %d", exc, attempt)
                await asyncio.gather(*(m.in_progress() for m in kept), return_exceptions=True)
                if await self.lifecycle.sleep(min(0.1 * 2**attempt, 5.0)):
                    return False
                continue
            except asyncpg.PostgresError as exc:
                if len(txs) == 1:
                    await self.reject(txs[0].envelope, f"postgres: {exc}")
                    return True
                # Something in the batch is rejected by the database: find it by halving.
                mid = len(txs) // 2
                return await self.commit(txs[:mid], kept) and await self.commit(txs[mid:], kept)
            BATCH_SECONDS.observe(time.perf_counter() - started)
            await self._committed(txs, result)
            return True

    async def _committed(self, txs: list[Tx], result: BatchResult) -> None:
        APPENDED.inc(len(result.appended))
        DUPLICATES.inc(len(result.duplicates))
        by_id = {t.event.event.event_id: t for t in txs}
        for collision in result.collisions:
            event_id = collision.item.event.event_id
            reason = (
                f"event_id: {event_id} is stored already in stream {collision.stored_in!r}, "
                f"not {collision.item.stream_id!r}: not a duplicate, and not stored twice"
            )
            await self.reject(by_id[event_id].envelope, reason)
        self.on_commit()

    async def reject(self, envelope: TxEnvelope, reason: str, *, subject: str | None = None) -> None:
        """One transaction that cannot be stored: quarantined alone, its message's others go on."""
        await self.quarantine.put(
            tx_encoder.encode(envelope),
            reason,
            agent_id=envelope.agent_id,
            subject=subject,
            key=f"tx:{envelope.origin}",
        )

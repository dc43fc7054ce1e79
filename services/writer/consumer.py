"""Consume PFLEA_TX in batches: one Postgres transaction per batch, ack only after commit."""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from shared.consumer import PullLoop
from shared.db import TRANSIENT_DB_ERRORS
from shared.envelope import TxEnvelope, new_event, tx_decoder
from shared.faults import crash_point, fail_point
from shared.jetstream import Topology, ack_all, pull_consumer_config
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore, StreamEvent

log = logging.getLogger(__name__)

RECEIVED = Counter("pflea_writer_messages_received_total", "Messages fetched from PFLEA_TX")
APPENDED = Counter("pflea_writer_events_appended_total", "Events committed to Postgres")
DUPLICATES = Counter("pflea_writer_duplicates_total", "Messages whose event was already stored")
BATCH_SECONDS = Histogram(
    "pflea_writer_batch_seconds",
    "Append + commit time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
PENDING = Gauge("pflea_writer_consumer_pending", "Messages waiting in the writer's consumer")


def _stream_event(env: TxEnvelope, msg: Msg) -> StreamEvent:
    return StreamEvent(env.agent_id, "agent", new_event(env, msg.metadata.sequence.stream))


class TxConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        quarantine: Quarantine,
        topology: Topology,
        settings: Settings,
        lifecycle: Lifecycle,
        on_commit: asyncio.Event | None = None,
    ) -> None:
        self.js = js
        self.store = store
        self.quarantine = quarantine
        self.topology = topology
        self.settings = settings
        self.lifecycle = lifecycle
        self.on_commit = on_commit or asyncio.Event()

    def pull_loop(self) -> PullLoop:
        config = pull_consumer_config(
            self.topology.writer_durable,
            self.topology.tx_filter,
            ack_wait_s=self.settings.ack_wait_s,
            max_deliver=self.settings.writer_max_deliver,
        )
        return PullLoop(
            self.js,
            self.topology.tx_stream,
            config,
            self.lifecycle,
            batch=self.settings.writer_batch_size,
        )

    async def run(self) -> None:
        loop = self.pull_loop()
        await loop.run(self._received)

    async def _received(self, msgs: list[Msg]) -> None:
        RECEIVED.inc(len(msgs))
        await self.process(msgs)

    async def process(self, msgs: list[Msg]) -> None:
        decoded: list[tuple[Msg, StreamEvent]] = []
        for msg in msgs:
            try:
                env = tx_decoder.decode(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._poison(msg, f"envelope: {exc}")
                continue
            if msg.metadata.num_delivered >= self.settings.writer_max_deliver:
                await self._poison(msg, f"delivered {msg.metadata.num_delivered} times without commit")
                continue
            decoded.append((msg, _stream_event(env, msg)))
        if not decoded:
            return
        await self._append_until_committed(decoded)

    async def _append_until_committed(self, batch: list[tuple[Msg, StreamEvent]]) -> None:
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                result = await self.store.append_batch([item for _, item in batch])
                fail_point("writer.commit_reply_lost")  # committed, but the caller cannot know
            except TRANSIENT_DB_ERRORS as exc:
                # Outcome unknown (the commit may have landed): retrying is safe because event
                # ids are unique. Keep the messages ours meanwhile so they are not redelivered.
                attempt += 1
                log.warning("append failed (%r); retry %d", exc, attempt)
                await asyncio.gather(*(m.in_progress() for m, _ in batch), return_exceptions=True)
                if await self.lifecycle.sleep(min(0.1 * 2**attempt, 5.0)):
                    return  # stopping and Postgres is away: unacked, they will be redelivered
                continue
            except asyncpg.PostgresError as exc:
                if len(batch) == 1:
                    await self._poison(batch[0][0], f"postgres: {exc}")
                    return
                # Something in the batch is rejected by the database: find it by halving.
                mid = len(batch) // 2
                await self._append_until_committed(batch[:mid])
                await self._append_until_committed(batch[mid:])
                return
            BATCH_SECONDS.observe(time.perf_counter() - started)
            APPENDED.inc(len(result.appended))
            DUPLICATES.inc(len(result.duplicates))
            crash_point("writer.after_commit")  # committed, not acked, maybe not relayed
            self.on_commit.set()
            await ack_all([m for m, _ in batch])
            return

    async def _poison(self, msg: Msg, reason: str) -> None:
        agent_id = msg.subject.rsplit(".", 1)[-1]
        await self.quarantine.put(
            msg.data,
            reason,
            agent_id=agent_id,
            subject=msg.subject,
            key=f"tx_seq:{msg.metadata.sequence.stream}",
        )
        await msg.term()

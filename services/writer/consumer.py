"""Consume PFLEA_TX in batches: one Postgres transaction per batch, ack only after commit.

The stages, in order, each in its own module:

1. lead (:mod:`.partitions`): one writer consumes each partition of PFLEA_TX, others stand by;
2. order (:mod:`.order`): each agent's events are stored in PFLEA_TX sequence order, which is
   the order the ingester read them; older messages still held by a dead writer come first;
3. attempts (:mod:`.attempts`): a message that keeps killing the writer is isolated, then
   quarantined;
4. decode (:mod:`.decode`): messages become events; what is no batch, is on another agent's
   subject or is not what the ingester makes of its transaction is quarantined;
5. append (:mod:`.append`): commit, retrying, isolating and quarantining what Postgres refuses;
6. ack what is committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter

from services.writer.append import Appender
from services.writer.attempts import AttemptLedger, isolate_after, needs_isolation
from services.writer.decode import decode_items, stored_ids
from services.writer.messages import Item, fetched, read_back
from services.writer.order import SourceOrder
from shared.consumer import PullLoop
from shared.faults import crash_point
from shared.jetstream import NATS_ERRORS, Topology, ack_all, writer_consumer_config
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore

log = logging.getLogger(__name__)

RECEIVED = Counter("pflea_writer_messages_received_total", "Messages fetched from PFLEA_TX")

# A PFLEA_TX message holds up to shared.wire.BATCH_MAX_ITEMS transactions: pull by bytes too.
PULL_MAX_BYTES = 1024 * 1024


class TxConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        quarantine: Quarantine,
        topology: Topology,
        settings: Settings,
        lifecycle: Lifecycle,
        dsn: str,
        on_commit: asyncio.Event | None = None,
        *,
        partitions: int = 1,
        part: int = 0,
    ) -> None:
        self.js = js
        self.store = store
        self.quarantine = quarantine
        self.topology = topology
        self.settings = settings
        self.lifecycle = lifecycle
        self.dsn = dsn  # the append lock's own session connects with it
        self.on_commit = on_commit or asyncio.Event()
        self.partitions, self.part = partitions, part
        self.durable = topology.writer_partition_durable(partitions, part)
        self.filter_subject = topology.tx_partition_filter(partitions, part)
        self.order = SourceOrder(
            js,
            topology.tx_stream,
            self.durable,
            hold_s=0.5,
            filter_subject=self.filter_subject if partitions > 1 else None,
        )
        self.attempts = AttemptLedger(store.pool)
        self.appender = Appender(store, quarantine, lifecycle, on_commit=self.on_commit.set)

    def pull_loop(self) -> PullLoop:
        config = writer_consumer_config(
            self.topology, self.partitions, self.part, ack_wait_s=self.settings.ack_wait_s
        )
        return PullLoop(
            self.js,
            self.topology.tx_stream,
            config,
            self.lifecycle,
            batch=self.settings.messages_per_writer_pull(),
            max_bytes=PULL_MAX_BYTES,
        )

    async def lead(self, until: asyncio.Event) -> None:
        """Append this partition until ``until`` is set (or the service stops); the caller holds
        the partition's lease."""
        self.order.leading()
        await self.attempts.forget_old()
        await self.pull_loop().run(self._received, until=until)

    async def _received(self, msgs: list[Msg]) -> None:
        RECEIVED.inc(len(msgs))
        await self.process(msgs)

    async def process(self, msgs: list[Msg]) -> None:
        """One pulled batch through every stage."""
        items = await self._in_source_order([fetched(m) for m in msgs])
        if items is None:
            return
        back = [i for i in items if i.delivered != 1]  # redelivered, or read from the stream
        tried = await self._attempted(self.attempts.read(back))
        if tried is None:
            return  # Postgres is away: unacked, they come back
        threshold = isolate_after(self.settings.writer_max_deliver)
        if needs_isolation(items, tried, threshold):
            await self._one_at_a_time(items, threshold)
        elif await self._attempted(self.attempts.count(back)) is not None:
            await self._commit(items)

    async def _in_source_order(self, fetched_items: list[Item]) -> list[Item] | None:
        """The batch, preceded by older messages a dead writer still holds, sorted by sequence;
        None when that cannot be known (the batch is then left for redelivery)."""
        first = [i.seq for i in fetched_items if i.delivered == 1]
        consumer_seqs = [i.consumer_seq for i in fetched_items]
        try:
            older = await self.order.older_than([i.seq for i in fetched_items], first, consumer_seqs)
        except NATS_ERRORS as exc:
            # Cannot tell whether older messages are pending: leave the batch unacked (it comes
            # back after the ack wait, and is then itself "older" for whatever follows it).
            log.warning("cannot check PFLEA_TX order (%r); batch left for redelivery", exc)
            return None
        return sorted([*map(read_back, older), *fetched_items], key=lambda i: i.seq)

    async def _attempted(self, counting: Awaitable[dict[str, int] | None]) -> dict[str, int] | None:
        tried = await counting
        if tried is None:
            await self.lifecycle.sleep(1.0)
        return tried

    async def _one_at_a_time(self, items: list[Item], threshold: int) -> None:
        """Something in hand has been killing this process. Commit one message at a time,
        oldest first, counting each attempt just before it: innocent messages get out, and only
        the one that dies with the writer reaches the limit (the writer's own count; JetStream's
        delivery count also grows for messages that were merely in hand)."""
        log.warning("messages tried %d+ times: committing one at a time", threshold)
        for item in items:
            tried = await self._attempted(self.attempts.count([item]))
            if tried is None:
                return
            attempts = tried[item.key]
            if attempts >= self.settings.writer_max_deliver and not await self._stored(item):
                await self._poison(item, f"tried {attempts} times without commit (it kills the writer?)")
                self.order.done((item.seq,))
            elif not await self._commit([item]):
                return

    async def _stored(self, item: Item) -> bool:
        """Whether every transaction of ``item`` is already in the log."""
        ids = stored_ids(item)
        return bool(ids) and len(await self.store.stored(ids)) == len(set(ids))

    async def _commit(self, items: Sequence[Item]) -> bool:
        """Append the transactions of ``items`` in order, then ack them; False if stopped first."""
        decoded = decode_items(items, self.topology)
        for item, reason in decoded.poison:
            await self._poison(item, reason)
        for item, envelope, reason in decoded.refused:
            await self.appender.reject(envelope, reason, subject=item.subject)
        txs = decoded.txs
        step = self.settings.writer_batch_size  # transactions per Postgres transaction
        for start in range(0, len(txs), step):
            if not await self.appender.commit(txs[start : start + step], decoded.kept):
                return False  # stopping with Postgres away: unacked, they will be redelivered
        crash_point("writer.after_commit")  # committed, not acked, maybe not relayed
        await ack_all(decoded.kept)
        self.order.done(i.seq for i in items)
        return True

    async def _poison(self, item: Item, reason: str) -> None:
        await self.quarantine.put(
            item.data, reason, agent_id=item.agent_id, subject=item.subject, key=f"tx_seq:{item.seq}"
        )
        if item.msg is not None:
            await item.msg.term()

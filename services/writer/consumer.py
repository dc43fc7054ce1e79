"""Consume PFLEA_TX in batches: one Postgres transaction per batch, ack only after commit.

Each agent's events are stored in PFLEA_TX sequence order, which is the order the ingester read
them from the source: a batch is sorted by sequence, and older messages still held by a dead
writer are committed ahead of it (see :mod:`services.writer.order`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from prometheus_client import Counter, Histogram

from services.writer.order import SourceOrder
from shared import faults
from shared.consumer import PullLoop
from shared.db import TRANSIENT_DB_ERRORS
from shared.envelope import TxEnvelope, decode_tx_message, new_event, tx_encoder
from shared.faults import crash_point, delay_s, fail_point
from shared.jetstream import HDR_MSG_ID, NATS_ERRORS, Topology, ack_all, delivery, pull_consumer_config
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore, StreamEvent, StreamHeads

log = logging.getLogger(__name__)

RECEIVED = Counter("pflea_writer_messages_received_total", "Messages fetched from PFLEA_TX")
APPENDED = Counter("pflea_writer_events_appended_total", "Events committed to Postgres")
DUPLICATES = Counter("pflea_writer_duplicates_total", "Messages whose event was already stored")
BATCH_SECONDS = Histogram(
    "pflea_writer_batch_seconds",
    "Append + commit time per batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class Item(msgspec.Struct):
    """One PFLEA_TX message on its way to the log: fetched (``msg``) or read from the stream."""

    seq: int
    subject: str
    data: bytes
    msg: Msg | None
    delivered: int  # times delivered to a writer (0 when read from the stream), or tried
    key: str  # the message's identity for counting attempts: its Nats-Msg-Id


class Tx(msgspec.Struct):
    """One transaction of a message, as the event it becomes."""

    envelope: TxEnvelope
    event: StreamEvent


def _key(seq: int, headers: dict[str, str] | None) -> str:
    return (headers or {}).get(HDR_MSG_ID) or f"seq:{seq}"


def _fetched(msg: Msg) -> Item:
    seq, delivered = delivery(msg)
    return Item(seq, msg.subject, msg.data, msg, delivered, _key(seq, msg.headers))


def _read(raw: RawStreamMsg) -> Item:
    seq = raw.seq or 0
    return Item(seq, raw.subject or "", raw.data or b"", None, 0, _key(seq, raw.headers))


_COUNT_ATTEMPTS = """
    INSERT INTO writer_attempts (msg_key, attempts) SELECT k, 1 FROM unnest($1::text[]) AS k
    ON CONFLICT (msg_key) DO UPDATE
    SET attempts = writer_attempts.attempts + 1, last_at = clock_timestamp()
    RETURNING msg_key, attempts"""
_READ_ATTEMPTS = "SELECT msg_key, attempts FROM writer_attempts WHERE msg_key = ANY($1::text[])"
# A message delivered this often without a commit may be killing the writer: isolate it.
ISOLATE_AFTER = 3
# A PFLEA_TX message holds up to shared.envelope.BATCH_MAX_ITEMS transactions: pull by bytes too.
PULL_MAX_BYTES = 1024 * 1024
_APPEND_LEADER_LOCK = 7061746564  # session lock: the writer that consumes PFLEA_TX


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
        self.heads = StreamHeads()
        self.order = SourceOrder(js, topology.tx_stream, topology.writer_durable, hold_s=0.5)

    def pull_loop(self) -> PullLoop:
        config = pull_consumer_config(
            self.topology.writer_durable,
            self.topology.tx_filter,
            ack_wait_s=self.settings.ack_wait_s,
            # JetStream never gives up on a message (it would sit unacked, unseen): the writer
            # counts its own attempts and quarantines at PFLEA_WRITER_MAX_DELIVER.
            max_deliver=-1,
        )
        return PullLoop(
            self.js,
            self.topology.tx_stream,
            config,
            self.lifecycle,
            batch=self.settings.messages_per_writer_pull(),
            max_bytes=PULL_MAX_BYTES,
        )

    async def run(self) -> None:
        """Append while holding the append lock: one writer consumes PFLEA_TX, replicas stand by
        (and answer commands) and take over within a second of its death, when Postgres drops
        its session. Two consuming at once (a lock lost in a Postgres restart) stays correct:
        order is kept by :mod:`services.writer.order`, duplicates by event ids."""
        while not self.lifecycle.stopping.is_set():
            try:
                await self._lead()
            except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("append lock lost (%r); standing by", exc)
                if await self.lifecycle.sleep(1.0):
                    return

    async def _lead(self) -> None:
        async with self.store.pool.acquire() as conn:
            standing_by = False
            while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _APPEND_LEADER_LOCK):
                if not standing_by:
                    log.info("another writer appends; standing by")
                    standing_by = True
                if await self.lifecycle.sleep(1.0):
                    return
            log.info("appending (this writer holds the append lock)")
            await conn.execute("DELETE FROM writer_attempts WHERE last_at < now() - interval '8 days'")
            lost = asyncio.Event()
            watch = asyncio.create_task(self._watch_lock(conn, lost))
            try:
                await self.pull_loop().run(self._received, until=lost)
            finally:
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
            if lost.is_set():
                raise ConnectionError("the append lock's session ended")

    async def _watch_lock(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        """The lock lives as long as its session: check the session every second."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await conn.execute("SELECT 1")
            except Exception:
                lost.set()
                return

    async def _received(self, msgs: list[Msg]) -> None:
        RECEIVED.inc(len(msgs))
        await self.process(msgs)

    async def process(self, msgs: list[Msg]) -> None:
        fetched = [_fetched(m) for m in msgs]
        first = [i.seq for i in fetched if i.delivered == 1]
        try:
            older = await self.order.older_than([i.seq for i in fetched], first)
        except NATS_ERRORS as exc:
            # Cannot tell whether older messages are pending: leave the batch unacked (it comes
            # back after the ack wait, and is then itself "older" for whatever follows it).
            log.warning("cannot check PFLEA_TX order (%r); batch left for redelivery", exc)
            return
        items = sorted([*map(_read, older), *fetched], key=lambda i: i.seq)
        back = [i for i in items if i.delivered != 1]  # redelivered, or read from the stream
        tried = await self._attempts(back, count=False)
        if tried is None:
            return  # Postgres is away: unacked, they come back
        isolate_after = max(1, min(ISOLATE_AFTER, self.settings.writer_max_deliver - 1))
        if any(max(i.delivered, tried.get(i.key, 0) + 1) >= isolate_after for i in items):
            await self._one_at_a_time(items, isolate_after)
            return
        if await self._attempts(back, count=True) is not None:
            await self._commit(items, give_up=False)

    async def _one_at_a_time(self, items: list[Item], isolate_after: int) -> None:
        """Something in hand has been killing this process. Commit one message at a time,
        oldest first, counting each attempt just before it: innocent messages get out, and only
        the one that dies with the writer reaches the limit (the writer's own count; JetStream's
        delivery count also grows for messages that were merely in hand)."""
        log.warning("messages tried %d+ times: committing one at a time", isolate_after)
        for item in items:
            tried = await self._attempts([item], count=True)
            if tried is None:
                return
            over = tried[item.key] >= self.settings.writer_max_deliver and not await self._stored(item)
            if not await self._commit([item], give_up=over, attempts=tried[item.key]):
                return

    async def _attempts(self, items: list[Item], *, count: bool) -> dict[str, int] | None:
        """The writer's attempts so far at each of ``items`` (by Nats-Msg-Id); with ``count``,
        one more first, committed before the attempt, so a message that kills the writer is
        counted although the writer dies with it. None when Postgres cannot be reached."""
        if not items:
            return {}
        keys = list(dict.fromkeys(i.key for i in items))
        try:
            rows = await self.store.pool.fetch(_COUNT_ATTEMPTS if count else _READ_ATTEMPTS, keys)
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("cannot count attempts (%r); batch left for redelivery", exc)
            await self.lifecycle.sleep(1.0)
            return None
        return {r["msg_key"]: r["attempts"] for r in rows}

    async def _stored(self, item: Item) -> bool:
        """Whether every transaction of ``item`` is already in the log."""
        try:
            ids = [e.event_id for e in decode_tx_message(item.data)]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        return len(await self.store.stored(ids)) == len(set(ids))

    async def _commit(self, items: list[Item], *, give_up: bool, attempts: int = 0) -> bool:
        """Append the transactions of ``items`` in order, then ack them; False if stopped first.

        ``give_up``: the (single) message has been tried the maximum number of times without a
        commit: quarantine it instead."""
        txs: list[Tx] = []
        kept: list[Msg] = []  # decoded messages, acked once their transactions are committed
        for item in items:
            if give_up:
                await self._poison(item, f"tried {attempts} times without commit (it kills the writer?)")
                continue
            try:
                envelopes = decode_tx_message(item.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._poison(item, f"envelope: {exc}")
                continue
            for e in envelopes:
                if faults.ARMED:
                    crash_point(f"writer.tx.{e.tx_id}")  # a transaction that kills the writer
                txs.append(Tx(e, StreamEvent(e.agent_id, "agent", new_event(e, item.seq))))
            if item.msg is not None:
                kept.append(item.msg)
        step = self.settings.writer_batch_size  # transactions per Postgres transaction
        for start in range(0, len(txs), step):
            if not await self._append_until_committed(txs[start : start + step], kept):
                return False  # stopping with Postgres away: unacked, they will be redelivered
        crash_point("writer.after_commit")  # committed, not acked, maybe not relayed
        await ack_all(kept)
        self.order.done(i.seq for i in items)
        return True

    async def _append_until_committed(self, txs: list[Tx], kept: list[Msg]) -> bool:
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
                    await self._reject(txs[0], f"postgres: {exc}")
                    return True
                # Something in the batch is rejected by the database: find it by halving.
                mid = len(txs) // 2
                first = await self._append_until_committed(txs[:mid], kept)
                return first and await self._append_until_committed(txs[mid:], kept)
            BATCH_SECONDS.observe(time.perf_counter() - started)
            APPENDED.inc(len(result.appended))
            DUPLICATES.inc(len(result.duplicates))
            by_id = {t.event.event.event_id: t for t in txs}
            for collision in result.collisions:
                event_id = collision.item.event.event_id
                reason = (
                    f"event_id: {event_id} is stored already in stream {collision.stored_in!r}, "
                    f"not {collision.item.stream_id!r}: not a duplicate, and not stored twice"
                )
                await self._reject(by_id[event_id], reason)
            self.on_commit.set()
            return True

    async def _reject(self, tx: Tx, reason: str) -> None:
        """One transaction Postgres refuses: quarantined alone, its message's others go on."""
        envelope = tx.envelope
        await self.quarantine.put(
            tx_encoder.encode(envelope),
            reason,
            agent_id=envelope.agent_id,
            key=f"tx:{envelope.origin}",
        )

    async def _poison(self, item: Item, reason: str) -> None:
        await self.quarantine.put(
            item.data,
            reason,
            agent_id=item.subject.rsplit(".", 1)[-1],
            subject=item.subject,
            key=f"tx_seq:{item.seq}",
        )
        if item.msg is not None:
            await item.msg.term()

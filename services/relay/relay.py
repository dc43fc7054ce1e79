"""Relay: publish every committed event to PFLEA_EVENTS, in position order, at least once.

The events table is the outbox. The relay reads ``position > checkpoint`` (gap-free, see the
store), publishes each read as JetStream atomic batches of up to 1,000 events, one message per
event (:mod:`shared.atomic_batch`: stored all together or not at all, one ack and one fsync per
batch), and only then moves its checkpoint in Postgres. So PFLEA_EVENTS only ever ends with a
whole batch: when its last message came in a batch, everything up to that message's position
is in the stream, and a relay that starts (or reconnects) goes on from there even if its
checkpoint is behind (it died between a commit and the checkpoint), or from lower if NATS lost
its tail. A batch whose publisher died before its commit is dropped by the server. The first
message of a batch carries ``Nats-Msg-Id`` = its range of positions, so that publishing again a
batch whose ack was lost is refused as a duplicate instead of stored twice. A repeat that still
gets through (a race with a commit in flight) is absorbed by the projectors' per-stream
checkpoints.

A PFLEA_EVENTS that does not allow atomic batches (declared before they were used, until
``pflea migrate`` updates it) gets the events one message at a time, each with its event id as
``Nats-Msg-Id``, one fsync each. One relay runs at a time: it holds a leader lease (a session
advisory lock), so replicas can all run one and only the holder publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from shared import locks
from shared.atomic_batch import DUPLICATE, HDR_BATCH_ID, MAX_BATCH, NOT_ENABLED, BatchRefused, publish_atomic
from shared.db import TRANSIENT_DB_ERRORS
from shared.faults import crash_point
from shared.jetstream import NATS_ERRORS, StreamSettings, Topology, ensure_streams, publish_in_order
from shared.lease import LeaderLease
from shared.ops import Lifecycle
from shared.store import EventStore, RecordedEvent
from shared.wire import HDR_MSG_ID, HDR_POSITION, event_message

log = logging.getLogger(__name__)

PUBLISHED = Counter("pflea_relay_events_published_total", "Events published to PFLEA_EVENTS")
RELAY_POSITION = Gauge("pflea_relay_position", "Last global position relayed")

RELAY_NAME = "events"
# A batch's commit answers within milliseconds on a healthy server (one fsync, not 1,000). Its
# silence this long means it is lost (a stream leader died in a cluster): publish it again
# soon (a batch that did get stored is then refused as a duplicate).
BATCH_ANSWER_S = 5.0


class _Reconnected(Exception):
    """NATS reconnected mid-publish: reconcile with what the stream holds first."""


class _Stopped(Exception):
    """Asked to stop while NATS was refusing publishes: the checkpoint did not move."""


class Relay:
    def __init__(
        self,
        store: EventStore,
        js: JetStreamContext,
        topology: Topology,
        lifecycle: Lifecycle,
        dsn: str,
        *,
        batch_size: int = 1000,
        poll_s: float = 1.0,
        wakeup: asyncio.Event | None = None,
        reconnects: Callable[[], int] = lambda: 0,
        duplicate_window_s: float = 120.0,
        stream_shape: StreamSettings | None = None,
    ) -> None:
        self.store = store
        self.js = js
        self.topology = topology
        self.lifecycle = lifecycle
        self.dsn = dsn
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.wakeup = wakeup or asyncio.Event()
        self.position = 0
        self.saved = 0  # the checkpoint as stored in Postgres
        self.reconnects = reconnects
        self.seen_reconnects = -1
        self.duplicate_window_s = duplicate_window_s
        self.stream_shape = stream_shape
        self.stream_created: object = None
        self.atomic = True  # PFLEA_EVENTS allows atomic batches (its config says, at reconcile)

    async def run(self) -> None:
        """Become the relay (wait for the lock), then relay until stopping; survive outages."""
        while not self.lifecycle.stopping.is_set():
            try:
                await self._lead()
            except _Stopped:
                return
            except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
                # InterfaceError ("connection is closed") is no PostgresError: a connection that
                # died between two statements must not take the writer down with it.
                log.warning("relay lost Postgres (%r); retrying", exc)
                if await self.lifecycle.sleep(1.0):
                    return

    async def _lead(self) -> None:
        async with LeaderLease(self.dsn, locks.RELAY_LEADER, self.lifecycle, poll_s=self.poll_s) as lease:
            if not await lease.acquire():
                return
            async with lease.connection() as conn:
                await conn.add_listener("pflea_events", self._notified)
                self.position = self.saved = await self._checkpoint(conn)
            log.info("relaying", extra={"position": self.position})
            while not self.lifecycle.stopping.is_set() and not lease.lost.is_set():
                if self.reconnects() != self.seen_reconnects:
                    self.seen_reconnects = self.reconnects()
                    await self.reconcile_with_stream()
                try:
                    # On the lock's session, so that a relay that lost it cannot move the checkpoint.
                    async with lease.connection() as conn:
                        relayed = await self.relay_once(conn)
                except _Reconnected:
                    continue
                if relayed < self.batch_size:
                    await self._wait_for_work()
            if lease.lost.is_set():
                raise ConnectionError("the relay lock's session ended")

    async def reconcile_with_stream(self) -> None:
        """Go on from what PFLEA_EVENTS really holds: rewind if NATS lost what we had published,
        skip ahead over a batch stored before our checkpoint moved.

        NATS is the transport, Postgres the record: a nats-server that restarted without its
        last writes (or without its store) has fewer events than our checkpoint says. The
        newest message's position header tells how far it got; republishing from there is
        safe because every consumer deduplicates by stream version. A newest message that came
        in an atomic batch has its whole batch, and every batch before it, in the stream.
        """
        try:
            # A server that lost its store lost the streams too: declare them again.
            await ensure_streams(self.js, self.topology, self.duplicate_window_s, self.stream_shape)
            info = await self.js.stream_info(self.topology.events_stream)
            held, whole = 0, False
            recreated = self.stream_created is not None and info.created != self.stream_created
            self.stream_created = info.created
            self._use_batches(bool(info.config.allow_atomic))
            if recreated:
                # A new stream (the old one is gone with everything in it); whatever it holds
                # now was published after the loss, so it says nothing about what came before.
                held = 0
            elif info.state.last_seq:
                try:
                    last = await self.js.get_msg(self.topology.events_stream, info.state.last_seq)
                    held = int((last.headers or {}).get(HDR_POSITION, "0"))
                    whole = HDR_BATCH_ID in (last.headers or {})
                except NATS_ERRORS:
                    held = self.position  # aged out or deleted: nothing says it was lost
        except NATS_ERRORS as exc:
            log.warning("cannot compare with the stream yet (%r)", exc)
            self.seen_reconnects = -1  # try again on the next round
            return
        if held < self.position:
            log.warning(
                "PFLEA_EVENTS holds events up to position %d, we had relayed %d: republishing",
                held,
                self.position,
            )
            self.position = held
        elif held > self.position and whole:
            log.info(
                "PFLEA_EVENTS already holds events up to position %d (stored before the checkpoint "
                "at %d moved): going on from there",
                held,
                self.position,
            )
            self.position = held

    def _use_batches(self, atomic: bool) -> None:
        if self.atomic and not atomic:
            log.warning(
                "%s does not allow atomic batches: publishing one message per event (one fsync "
                "each) until `pflea migrate` updates it (on nats-server >= 2.12)",
                self.topology.events_stream,
            )
        self.atomic = atomic

    def _notified(self, *_: object) -> None:
        self.wakeup.set()

    async def _wait_for_work(self) -> None:
        stop = asyncio.ensure_future(self.lifecycle.stopping.wait())
        wake = asyncio.ensure_future(self.wakeup.wait())
        await asyncio.wait({stop, wake}, timeout=self.poll_s, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        wake.cancel()
        self.wakeup.clear()

    async def _checkpoint(self, conn: asyncpg.Connection) -> int:
        await conn.execute(
            "INSERT INTO relay_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING", RELAY_NAME
        )
        return int(await conn.fetchval("SELECT position FROM relay_checkpoints WHERE name = $1", RELAY_NAME))

    async def relay_once(self, conn: asyncpg.Connection) -> int:
        events = await self.store.read_all(self.position, self.batch_size)
        if events:
            crash_point("relay.before_publish")
            await self.publish(events)
            crash_point("relay.after_publish")  # published, checkpoint not moved
            self.position = events[-1].position
            PUBLISHED.inc(len(events))
        if self.position > self.saved:  # also after skipping a batch stored before a crash
            await conn.execute(
                "UPDATE relay_checkpoints SET position = $2, updated_at = clock_timestamp() WHERE name = $1",
                RELAY_NAME,
                self.position,
            )
            self.saved = self.position
            RELAY_POSITION.set(self.position)
        return len(events)

    async def publish(self, events: list[RecordedEvent]) -> None:
        """Publish in order on one connection and wait until all are stored; retry until they are."""
        attempt = 0
        while True:
            try:
                if self.atomic:
                    await self.publish_batches(events)
                else:
                    await self.publish_one_by_one(events)
                return
            except NATS_ERRORS as exc:
                if isinstance(exc, BatchRefused) and exc.err_code == NOT_ENABLED:
                    self._use_batches(False)  # the stream was declared again, without batches
                    continue
                attempt += 1
                log.warning("relay publish failed (%r); retry %d", exc, attempt)
                if await self.lifecycle.sleep(min(0.2 * 2**attempt, 5.0)):
                    raise _Stopped from exc
                if self.reconnects() != self.seen_reconnects:
                    raise _Reconnected from exc  # compare with the stream before going on

    async def publish_batches(self, events: list[RecordedEvent]) -> None:
        """``events`` as atomic batches, in order, each acked before the next is sent."""
        for start in range(0, len(events), MAX_BATCH):
            batch = events[start : start + MAX_BATCH]
            messages = [event_message(self.topology, e) for e in batch]
            # The batch's identity, for the duplicate window: the same range is the same events.
            messages[0][2][HDR_MSG_ID] = f"relay:{batch[0].position}-{batch[-1].position}"
            try:
                await publish_atomic(self.js, messages, timeout=BATCH_ANSWER_S)
            except BatchRefused as exc:
                if exc.err_code != DUPLICATE:
                    raise
                log.info("positions %d to %d were already stored", batch[0].position, batch[-1].position)

    async def publish_one_by_one(self, events: list[RecordedEvent]) -> None:
        """``events`` one message each, pipelined, each with its event id as ``Nats-Msg-Id``."""
        messages = []
        for e in events:
            subject, payload, headers = event_message(self.topology, e)
            headers[HDR_MSG_ID] = str(e.event_id)
            messages.append((subject, payload, headers))
        await publish_in_order(self.js, messages, timeout=15)

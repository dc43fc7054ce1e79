"""Relay: publish every committed event to PFLEA_EVENTS, in position order, at least once.

The events table is the outbox. The relay reads ``position > checkpoint`` (gap-free, see the
store), publishes with ``Nats-Msg-Id`` = event id, waits for every ack, and only then moves its
checkpoint in Postgres. A crash anywhere repeats a suffix, which JetStream's duplicate window
and the projectors' per-stream checkpoints absorb. One relay runs at a time: it holds a leader
lease (a session advisory lock), so replicas can all run one and only the holder publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from shared import locks
from shared.db import TRANSIENT_DB_ERRORS
from shared.faults import crash_point
from shared.jetstream import NATS_ERRORS, StreamSettings, Topology, ensure_streams, publish_in_order
from shared.lease import LeaderLease
from shared.ops import Lifecycle
from shared.store import EventStore, RecordedEvent
from shared.wire import HDR_POSITION, event_message

log = logging.getLogger(__name__)

PUBLISHED = Counter("pflea_relay_events_published_total", "Events published to PFLEA_EVENTS")
RELAY_POSITION = Gauge("pflea_relay_position", "Last global position relayed")

RELAY_NAME = "events"


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
        self.reconnects = reconnects
        self.seen_reconnects = -1
        self.duplicate_window_s = duplicate_window_s
        self.stream_shape = stream_shape
        self.stream_created: object = None

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
                self.position = await self._checkpoint(conn)
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
        """Rewind to what PFLEA_EVENTS really holds, if NATS lost what we had published.

        NATS is the transport, Postgres the record: a nats-server that restarted without its
        last writes (or without its store) has fewer events than our checkpoint says. The
        newest message's position header tells how far it got; republishing from there is
        safe because every consumer deduplicates by stream version.
        """
        try:
            # A server that lost its store lost the streams too: declare them again.
            await ensure_streams(self.js, self.topology, self.duplicate_window_s, self.stream_shape)
            info = await self.js.stream_info(self.topology.events_stream)
            held = 0
            recreated = self.stream_created is not None and info.created != self.stream_created
            self.stream_created = info.created
            if recreated:
                # A new stream (the old one is gone with everything in it); whatever it holds
                # now was published after the loss, so it says nothing about what came before.
                held = 0
            elif info.state.last_seq:
                try:
                    last = await self.js.get_msg(self.topology.events_stream, info.state.last_seq)
                    held = int((last.headers or {}).get(HDR_POSITION, "0"))
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
        if not events:
            return 0
        crash_point("relay.before_publish")
        await self.publish(events)
        crash_point("relay.after_publish")  # published, checkpoint not moved
        self.position = events[-1].position
        await conn.execute(
            "UPDATE relay_checkpoints SET position = $2, updated_at = clock_timestamp() WHERE name = $1",
            RELAY_NAME,
            self.position,
        )
        RELAY_POSITION.set(self.position)
        PUBLISHED.inc(len(events))
        return len(events)

    async def publish(self, events: list[RecordedEvent]) -> None:
        """Publish in order on one connection and wait for all acks; retry until they land."""
        attempt = 0
        while True:
            try:
                messages = [event_message(self.topology, e) for e in events]
                await publish_in_order(self.js, messages, timeout=15)
                return
            except NATS_ERRORS as exc:
                attempt += 1
                log.warning("relay publish failed (%r); retry %d", exc, attempt)
                if await self.lifecycle.sleep(min(0.2 * 2**attempt, 5.0)):
                    raise _Stopped from exc
                if self.reconnects() != self.seen_reconnects:
                    raise _Reconnected from exc  # compare with the stream before going on

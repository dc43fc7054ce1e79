"""Partitioned appends: PFLEA_TX's agents in P partitions, one appending writer per partition.

- P is what the stream says (its subject transform, set by ``pflea migrate`` / ``pflea up``
  from PFLEA_WRITER_PARTITIONS); every writer reads it again each CHECK_S and follows a change.
- Each partition has its own durable consumer and its own lease (a Postgres session advisory
  lock, :func:`shared.locks.append_leader`): the holder appends, every other writer stands by.
- Writers spread the partitions between them. Each registers as a member
  (:class:`WriterMembers`, a lock per member slot) and prefers the partitions p for which it is
  ``live[p % len(live)]``; a leader no longer preferred (a writer joined) yields after its batch;
  a partition whose lock stays free STANDBY_S (its preferred writer does not take it) is taken
  by whoever sees that, so a stale view never leaves a partition without a writer.
- Changing P: messages stored under the old count keep their subjects and their consumers.
  Writers first drain every consumer of another count to empty, then append under the new one:
  each agent's messages stored under the old count are older than any under the new, so per-agent
  order holds across the change, and event ids keep it exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable

import asyncpg
from nats.js import JetStreamContext

from services.writer.consumer import TxConsumer
from shared import locks
from shared.db import TRANSIENT_DB_ERRORS, connect
from shared.jetstream import NATS_ERRORS, Topology
from shared.lease import LeaderLease
from shared.ops import Lifecycle

log = logging.getLogger(__name__)

CHECK_S = 2.0  # how often P, the old partitions' backlog and this writer's preferences are read
POLL_S = 0.5  # how often a preferred writer tries a free partition's lock
STANDBY_S = 3.0  # a partition free this long is taken by any writer
WRITER_CONSUMER = re.compile(r"writer(?:-(\d+)-(\d+))?")

_HELD = """SELECT (classid::bigint << 32) | objid::bigint AS key FROM pg_locks
           WHERE locktype = 'advisory' AND objsubid = 1 AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((classid::bigint << 32) | objid::bigint) BETWEEN $1 AND $2"""


class WriterMembers:
    """This writer's member slot (a session lock of its own) and who else is live."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.slot: int | None = None
        self._conn: asyncpg.Connection | None = None
        self._busy = asyncio.Lock()
        self._live: tuple[float, list[int]] = (0.0, [])

    async def join(self) -> None:
        """Hold the lowest free member slot (none if MAX_WRITERS are live: then this writer
        only stands by)."""
        if self._conn is not None and not self._conn.is_closed():
            return
        self._conn = await connect(self.dsn)
        self.slot = None
        for slot in range(locks.MAX_WRITERS):
            if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", locks.WRITER_MEMBERS + slot):
                self.slot = slot
                break
        self._live = (0.0, [])
        log.info("writer member slot %s", self.slot)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)

    async def _held(self, low: int, high: int) -> list[int]:
        if self._conn is None or self._conn.is_closed():
            raise ConnectionError("the writer's member session ended")
        async with self._busy:
            return [int(r["key"]) for r in await self._conn.fetch(_HELD, low, high)]

    async def live(self) -> list[int]:
        """The member slots of the live writers, read at most every POLL_S."""
        read_at, slots = self._live
        if time.monotonic() - read_at > POLL_S:
            held = await self._held(locks.WRITER_MEMBERS, locks.WRITER_MEMBERS + locks.MAX_WRITERS - 1)
            slots = sorted(k - locks.WRITER_MEMBERS for k in held)
            self._live = (time.monotonic(), slots)
        return slots

    async def prefers(self, part: int) -> bool:
        """Whether this writer is the one partition ``part`` should be appended by."""
        live = await self.live()
        return self.slot is not None and bool(live) and live[part % len(live)] == self.slot

    async def held(self, lock_id: int) -> bool:
        return bool(await self._held(lock_id, lock_id))


class PartitionedAppends:
    """The writer's ``append`` part: lead whichever partitions fall to this writer."""

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        lifecycle: Lifecycle,
        dsn: str,
        consumer: Callable[[int, int], TxConsumer],
    ) -> None:
        self.js = js
        self.topology = topology
        self.lifecycle = lifecycle
        self.dsn = dsn
        self.consumer = consumer  # (partition count, partition) -> the appending consumer

    async def run(self) -> None:
        members = WriterMembers(self.dsn)
        try:
            while not self.lifecycle.stopping.is_set():
                try:
                    await members.join()
                    await self._generation(members)
                except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError, *NATS_ERRORS) as exc:
                    log.warning("appends interrupted (%r); standing by", exc)
                    await members.close()
                    if await self.lifecycle.sleep(1.0):
                        return
        finally:
            await members.close()

    async def partitions(self) -> int:
        """P, as PFLEA_TX's subject transform says."""
        info = await self.js.stream_info(self.topology.tx_stream)
        return self.topology.tx_partitions(info.config)

    async def undrained(self, partitions: int) -> list[tuple[int, int]]:
        """(count, partition) of every writer consumer of another partition count that still
        has messages: stored before P last changed, they go first."""
        left = []
        for info in await self.js.consumers_info(self.topology.tx_stream):
            match = WRITER_CONSUMER.fullmatch(info.name or "")
            if match is None:
                continue
            count, part = (int(match[1]), int(match[2])) if match[1] else (1, 0)
            if count != partitions and int(info.num_pending or 0) + int(info.num_ack_pending or 0):
                left.append((count, part))
        return sorted(left)

    async def _generation(self, members: WriterMembers) -> None:
        """Append one partition count's partitions until P changes or the old ones drain."""
        partitions = await self.partitions()
        old = await self.undrained(partitions)
        work = old or [(partitions, part) for part in range(partitions)]
        if old:
            log.info("draining %d partitions stored before P became %d first", len(old), partitions)
        over = asyncio.Event()
        tasks = [asyncio.create_task(self._partition(count, part, members, over)) for count, part in work]
        try:
            while not (over.is_set() or self.lifecycle.stopping.is_set()):
                if await self.lifecycle.sleep(CHECK_S):
                    break
                if old and not await self.undrained(partitions):
                    log.info("partitions stored before P became %d are drained", partitions)
                    break
                if not old and (now := await self.partitions()) != partitions:
                    log.info("PFLEA_TX now has %d partitions (was %d): following", now, partitions)
                    break
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            over.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def _partition(self, count: int, part: int, members: WriterMembers, over: asyncio.Event) -> None:
        lock = locks.append_leader(count, part)
        free_since: float | None = None
        while not (over.is_set() or self.lifecycle.stopping.is_set()):
            if not await members.prefers(part):
                free_since = None if await members.held(lock) else free_since or time.monotonic()
                if free_since is None or time.monotonic() - free_since < STANDBY_S:
                    await self._pause(over, POLL_S)
                    continue
            async with LeaderLease(self.dsn, lock, self.lifecycle) as lease:
                if not await lease.acquire(once=True):
                    await self._pause(over, POLL_S)
                    continue
                free_since = None
                await self._lead(count, part, members, lease, over)
            if lease.lost.is_set():
                log.warning("the lock of partition %d of %d was lost; standing by", part, count)
                await self._pause(over, 1.0)

    async def _lead(
        self, count: int, part: int, members: WriterMembers, lease: LeaderLease, over: asyncio.Event
    ) -> None:
        if count == 1:
            log.info("appending (this writer holds the append lock)")
        else:
            log.info("appending partition %d of %d (this writer holds its lock)", part, count)
        consumer = self.consumer(count, part)
        leave = asyncio.Event()
        watch = asyncio.create_task(self._watch(count, part, members, lease, over, leave))
        try:
            await consumer.lead(leave)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _watch(
        self,
        count: int,
        part: int,
        members: WriterMembers,
        lease: LeaderLease,
        over: asyncio.Event,
        leave: asyncio.Event,
    ) -> None:
        """Leave when the lease is lost, the generation is over, or another writer is preferred
        for this partition (a writer joined: it takes the partition within POLL_S)."""
        while not leave.is_set():
            waits = [asyncio.create_task(e.wait()) for e in (lease.lost, over, self.lifecycle.stopping)]
            done, pending = await asyncio.wait(waits, timeout=CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if done:
                leave.set()
                return
            try:
                preferred = await members.prefers(part)
            except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError, ConnectionError):
                preferred = True  # cannot tell: keep appending; the lease says whether we may
            if not preferred:
                log.info("yielding partition %d of %d to the writer it falls to", part, count)
                leave.set()

    async def _pause(self, over: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(over.wait(), seconds)

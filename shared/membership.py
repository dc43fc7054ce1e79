"""Slots shared out among the live members of a group, leased in a JetStream KV bucket.

Replicas of a service split work that is cut into ``slots`` (agents hash to slots through
:func:`shared.partitions.partition`). The bucket (history 1, ``max_age`` = the lease TTL, with
subject delete markers so that a watcher sees expiries) holds two kinds of keys:

* ``member.<id>``: a member's heartbeat, written every TTL/3. A member whose key expired is gone.
* ``slot.<n>``: the lease of slot ``n``, its value the holder's member id. Taken with a
  compare-and-set on the revision that showed it free, renewed with a compare-and-set on the
  holder's own last revision, released with a compare-and-set delete. A holder that dies stops
  renewing and the server expires the key a TTL after its last renewal.

Each member watches the whole bucket, so it knows the live members and every slot's holder
without asking. A slot's desired owner is the live member with the highest rendezvous hash
(HRW) of (member, slot): every member computes the same answer from the same view, and a member
joining or leaving moves only the slots it wins or held. A member gives up a slot another member
should own (after its :class:`SlotOwner` stopped working on it), and takes free slots it should
own; a slot free for longer than a grace period is taken by anyone, so a stale view never leaves
a slot without a holder.

A lease is lost — and its slot stopped at once — when its renewal is refused (someone else's
revision is there) or when no renewal has succeeded for a TTL (counted from the moment the last
successful renewal was sent, never later than the server's own clock for it). Work that must not
happen without the lease asks :meth:`Membership.holds` first; a holder that finds its slot leased
to another member counts an overlap (:attr:`Membership.overlaps`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KV_DEL, KV_MARKER_REASON, KV_OP, KV_PURGE, KeyValue

from shared.jetstream import NATS_ERRORS
from shared.membership_view import MembershipView, Seen, member_key, rendezvous_owner, slot_key

log = logging.getLogger(__name__)


class SlotOwner(Protocol):
    """What a member does with its slots."""

    async def slot_started(self, slot: int) -> None:
        """Start working on ``slot`` (its lease is held)."""

    async def slot_stopped(self, slot: int) -> None:
        """Stop working on ``slot``; return once nothing of it runs any more."""


def new_member_id() -> str:
    """A member id unique to this process start: ``<host>-<pid>-<random>``, a valid KV key token."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class Lease:
    revision: int
    valid_until: float  # monotonic: sent time of the last successful renewal + TTL


class Membership:
    """This process as member ``member_id`` of the group sharing ``slots`` slots in ``bucket``.

    Use as ``async with``: it heartbeats, watches, renews, takes and gives up slots, calling
    ``owner.slot_started`` / ``owner.slot_stopped``; leaving the block stops every slot and
    releases its leases and its membership at once, so the others take over without waiting a
    TTL. The TTL is the bucket's ``max_age``: one definition, set where the bucket is declared.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        owner: SlotOwner,
        *,
        slots: int,
        member_id: str | None = None,
        grace_s: float | None = None,
        on_overlap: Callable[[int], None] | None = None,
        recreate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.js = js
        self.bucket = bucket
        self.owner = owner
        self.slots = slots
        self.member_id = member_id or new_member_id()
        self.grace_s = grace_s
        self.on_overlap = on_overlap
        self.recreate = recreate  # declares the bucket again if it is missing (a lost store)
        self._watch_task: asyncio.Task[None] | None = None
        self._watched_at = 0.0
        self.ttl_s = 0.0
        self.held: dict[int, Lease] = {}
        self.overlaps = 0  # times a held slot was found leased to another member
        self.view = MembershipView(0.0, slots)
        self._kv: KeyValue | None = None
        self._free_since: dict[int, float] = {}
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._settled = asyncio.Event()  # once: every slot this member should own was held
        # Per slot: a renewal and a release of one lease never cross.
        self._writing: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: dict[int, asyncio.Task[None]] = {}  # slots lost, their work still stopping
        self._closing = False

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "use Membership in `async with`"
        return self._kv

    @property
    def renew_s(self) -> float:
        return self.ttl_s / 3

    # --- what the worker asks ------------------------------------------------------------------

    def holds(self, slot: int) -> bool:
        """Whether this member may work on ``slot`` now: its lease is valid and no one else's."""
        lease = self.held.get(slot)
        if lease is None:
            return False
        if time.monotonic() >= lease.valid_until:
            self._lost(slot, "not renewed within the TTL")
            return False
        holder = self.view.holder(slot_key(slot))
        if holder is not None and holder != self.member_id:
            self.overlaps += 1
            if self.on_overlap is not None:
                self.on_overlap(slot)
            self._lost(slot, f"leased to {holder}")
            return False
        return True

    def members(self) -> list[str]:
        """The live members, this one included."""
        return sorted(self.view.members() | {self.member_id})

    # --- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Membership:
        self._kv = await self.js.key_value(self.bucket)
        self.ttl_s = self.view.ttl_s = float((await self._kv.status()).ttl or 0)
        if self.ttl_s <= 0:
            raise ValueError(f"bucket {self.bucket} has no TTL (max_age): leases would never expire")
        if self.grace_s is None:
            self.grace_s = self.ttl_s / 2
        await self._heartbeat()  # announce first: the others start giving up our slots
        self._watched_at = time.monotonic()
        self._watch_task = self._spawn(self._watch(), "membership-watch")
        self._spawn(self._keep_alive(), "membership-keep-alive")
        self._spawn(self._balance(), "membership-balance")
        return self

    async def __aexit__(self, *_: object) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        # Python 3.11's wait_for (inside nats-py) can swallow a cancellation: the loops also
        # end on _closing, and a task that still does not end is not waited for.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        for slot in sorted(self.held):
            await self._release(slot)
        with contextlib.suppress(*NATS_ERRORS):
            await self.kv.delete(member_key(self.member_id))

    async def synced(self, timeout: float) -> None:
        """Wait until the watcher has read the bucket's current state."""
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    async def settled(self, timeout: float) -> bool:
        """Wait until this member holds every slot it should own (its share is at work: after a
        restart, its predecessor's leases must expire first); False if ``timeout`` came first."""
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            return False
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- keeping the membership and the leases -------------------------------------------------

    async def _keep_alive(self) -> None:
        """Heartbeat, then renew every lease, each TTL/3; apart from rebalancing, which may
        wait for a slot's work to stop, so that nothing ever holds a renewal up."""
        while not self._closing:
            started = time.monotonic()
            try:
                await self._heartbeat()
            except NATS_ERRORS as exc:
                log.warning("membership heartbeat failed: %r", exc)
                await self._recover()
            else:
                self._check_watch()
            await self._renew()
            await asyncio.sleep(max(0.0, self.renew_s - (time.monotonic() - started)))

    async def _recover(self) -> None:
        """After a failed heartbeat: the bucket may be gone with the server's store; have it
        declared again (``recreate``, when given)."""
        if self.recreate is None:
            return
        try:
            await self.recreate()
        except Exception as exc:  # NATS away, or a user that may not create it: try again later
            log.warning("membership bucket %s not declared again: %r", self.bucket, exc)

    def _check_watch(self) -> None:
        """Our heartbeat went through, so the watcher should have seen something within a TTL;
        if not, it died with its consumer (a server restart, a lost store): watch again."""
        if time.monotonic() - self._watched_at > self.ttl_s and self._watch_task is not None:
            log.warning("membership watch silent for %.1fs; watching again", self.ttl_s)
            self._watch_task.cancel()
            self._watch_task = None
            self._watched_at = time.monotonic()
            self._watch_task = self._spawn(self._watch(), "membership-watch")

    async def _heartbeat(self) -> None:
        # The value is how many slots this member cuts the work into: all must agree.
        await self.kv.put(member_key(self.member_id), str(self.slots).encode())

    async def _renew(self) -> None:
        """Every lease at once: one request waiting out a leaderless bucket (a cluster node
        died; its election takes seconds) must not hold the others' renewals up until they
        expire."""
        await asyncio.gather(*(self._renew_one(slot) for slot in list(self.held)))

    async def _renew_one(self, slot: int) -> None:
        async with self._writing[slot]:
            lease = self.held.get(slot)
            if lease is None:
                return
            sent = time.monotonic()
            try:
                revision = await self.kv.update(slot_key(slot), self.member_id.encode(), last=lease.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lost(slot, "the renewal was refused: another revision is there")
                return
            except NATS_ERRORS as exc:
                if time.monotonic() >= lease.valid_until:
                    self._lost(slot, f"not renewed within the TTL ({exc!r})")
                return
            if slot in self.held:
                self.held[slot] = Lease(revision, sent + self.ttl_s)
                self.view.saw(slot_key(slot), Seen(self.member_id, revision, time.time()))

    # --- taking and giving up slots ------------------------------------------------------------

    async def _balance(self) -> None:
        await self._synced.wait()
        while not self._closing:
            self._changed.clear()
            try:
                await self._rebalance()
            except NATS_ERRORS as exc:
                log.warning("membership: %r; trying again", exc)
            except Exception:  # a bug in the owner's start or stop must not end the balancing
                log.exception("membership: rebalancing failed; trying again")
            self._expire_local()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_s):
                    await self._changed.wait()

    async def _rebalance(self) -> None:
        if not self._synced.is_set():
            return
        members = self.members()
        now = time.monotonic()
        assert self.grace_s is not None
        for slot in range(self.slots):
            desired = rendezvous_owner(slot, members)
            if slot in self.held:
                if desired != self.member_id:
                    await self._release(slot)  # the desired owner takes it once it sees it free
                continue
            if slot in self._stopping:
                continue  # its work is still winding down after a lost lease
            if self.view.holder(slot_key(slot)) is not None:
                self._free_since.pop(slot, None)
                continue
            free_since = self._free_since.setdefault(slot, now)
            if desired == self.member_id or now - free_since >= self.grace_s:
                await self._take(slot)
        if all(
            slot in self.held
            for slot in range(self.slots)
            if rendezvous_owner(slot, members) == self.member_id
        ):
            self._settled.set()

    async def _take(self, slot: int) -> None:
        key = slot_key(slot)
        sent = time.monotonic()
        try:
            revision = await self.kv.update(key, self.member_id.encode(), last=self.view.revision(key))
        except nats.js.errors.KeyWrongLastSequenceError:
            # Our view is behind (a marker aged out, or someone took it): ask the server.
            current = await self._free_revision(key)
            if current is None:
                return  # held by someone: the watcher will say by whom
            try:
                revision = await self.kv.update(key, self.member_id.encode(), last=current)
            except nats.js.errors.KeyWrongLastSequenceError:
                return
        self.held[slot] = Lease(revision, sent + self.ttl_s)
        self.view.saw(key, Seen(self.member_id, revision, time.time()))
        self._free_since.pop(slot, None)
        log.info("slot %d taken", slot, extra={"slot": slot, "member": self.member_id})
        await self.owner.slot_started(slot)
        if slot not in self.held:  # lost while starting: the stop may have come before the start
            await self.owner.slot_stopped(slot)

    async def _free_revision(self, key: str) -> int | None:
        """The revision to compare against to take ``key``: 0 if it has no message, its
        deletion's if it is deleted or expired; None if someone holds it."""
        subject = f"$KV.{self.bucket}.{key}"
        try:
            msg = await self.js.get_msg(f"KV_{self.bucket}", subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        headers = msg.headers or {}
        deleted = headers.get(KV_OP) in (KV_DEL, KV_PURGE) or KV_MARKER_REASON in headers
        return int(msg.seq or 0) if deleted else None

    async def _release(self, slot: int) -> None:
        """Stop the slot's work, then give its lease up: the work stops first, so no overlap."""
        await self.owner.slot_stopped(slot)
        async with self._writing[slot]:
            lease = self.held.pop(slot, None)
            if lease is None:
                return  # lost meanwhile
            with contextlib.suppress(*NATS_ERRORS):
                await self.kv.delete(slot_key(slot), last=lease.revision)
        log.info("slot %d released", slot, extra={"slot": slot, "member": self.member_id})

    def _lost(self, slot: int, why: str) -> None:
        if self.held.pop(slot, None) is None:
            return
        log.warning("slot %d lease lost: %s; stopping it", slot, why, extra={"member": self.member_id})
        # Not taken again before this stop is over: a late stop would end the new lease's work.
        stopping = self._stopping[slot] = asyncio.get_running_loop().create_task(
            self.owner.slot_stopped(slot)
        )
        self._tasks.add(stopping)
        stopping.add_done_callback(lambda task: self._stopped(slot, task))

    def _stopped(self, slot: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._stopping.get(slot) is task:
            del self._stopping[slot]
            self._changed.set()

    def _expire_local(self) -> None:
        now = time.monotonic()
        for slot, lease in list(self.held.items()):
            if now >= lease.valid_until:
                self._lost(slot, "not renewed within the TTL")

    async def _watch(self) -> None:
        while not self._closing:
            try:
                watcher = await self.kv.watchall()
                # A new watch replays the bucket as it is now: what it does not say is gone
                # (and a bucket declared again counts revisions from 1).
                self.view.clear()
                self._synced.clear()  # no rebalancing on a half-read view
                try:
                    async for entry in watcher:
                        self._watched_at = time.monotonic()
                        if self._closing:
                            break
                        if entry is None:
                            self._synced.set()
                        else:
                            self.view.see(entry)
                        self._changed.set()
                finally:
                    with contextlib.suppress(*NATS_ERRORS):
                        await watcher.stop()
            except NATS_ERRORS as exc:
                log.warning("membership watch: %r; watching again", exc)
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("membership watch failed; watching again")
                await asyncio.sleep(1.0)

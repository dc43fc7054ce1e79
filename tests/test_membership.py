"""Slot leases in a JetStream KV bucket (shared/membership.py), against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import nats
import pytest
from nats.aio.client import Client

from devstack.processes import wait_until
from shared.jetstream import Topology, ensure_ingest_bucket, ingest_bucket
from shared.membership import Membership
from shared.membership_view import rendezvous_owner, slot_key

TTL_S = 2.0
SLOTS = 16


@dataclass
class Worker:
    """A SlotOwner that records what it was told to run."""

    running: set[int] = field(default_factory=set)
    started: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)

    async def slot_started(self, slot: int) -> None:
        self.running.add(slot)
        self.started.append(slot)

    async def slot_stopped(self, slot: int) -> None:
        await asyncio.sleep(0.05)  # work winding down: the lease must outlive it
        self.running.discard(slot)
        self.stopped.append(slot)


@pytest.fixture
async def bucket(nats_url: str, namespace: str) -> AsyncIterator[str]:
    nc = await nats.connect(nats_url)
    topology = Topology(namespace)
    await ensure_ingest_bucket(nc.jetstream(), topology, TTL_S)
    try:
        yield ingest_bucket(topology)
    finally:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"KV_{ingest_bucket(topology)}")
        await nc.close()


@pytest.fixture
async def connect(nats_url: str) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    clients: list[Client] = []

    async def new() -> Client:
        nc = await nats.connect(nats_url, max_reconnect_attempts=0)
        clients.append(nc)
        return nc

    yield new
    for nc in clients:
        with contextlib.suppress(Exception):
            await nc.close()


async def leases(nc: Client, bucket: str) -> dict[int, str]:
    """Every slot's holder as the server has it now."""
    kv = await nc.jetstream().key_value(bucket)
    held = {}
    for slot in range(SLOTS):
        try:
            entry = await kv.get(slot_key(slot))
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:  # a marker (deleted, expired) has none
            held[slot] = entry.value.decode()
    return held


def desired(members: list[str]) -> dict[int, str]:
    return {slot: str(rendezvous_owner(slot, members)) for slot in range(SLOTS)}


async def test_a_lone_member_takes_every_slot_and_gives_them_all_back_when_it_leaves(
    bucket: str, connect: Callable[[], Awaitable[Client]]
) -> None:
    nc = await connect()
    worker = Worker()
    async with Membership(nc.jetstream(), bucket, worker, slots=SLOTS, member_id="solo") as member:
        await wait_until(lambda: worker.running == set(range(SLOTS)), 10, "every slot running")
        assert await leases(nc, bucket) == dict.fromkeys(range(SLOTS), "solo")
        assert all(member.holds(slot) for slot in range(SLOTS))
    assert worker.running == set() and sorted(worker.stopped) == list(range(SLOTS))
    assert await leases(nc, bucket) == {}, "leaving releases every lease at once"


async def test_members_split_the_slots_by_rendezvous_hash_and_a_newcomer_gets_its_share(
    bucket: str, connect: Callable[[], Awaitable[Client]]
) -> None:
    workers = {name: Worker() for name in ("m-a", "m-b", "m-c")}
    async with contextlib.AsyncExitStack() as stack:
        for name in ("m-a", "m-b"):
            nc = await connect()
            await stack.enter_async_context(
                Membership(nc.jetstream(), bucket, workers[name], slots=SLOTS, member_id=name)
            )
        observer = await connect()

        async def split_as(names: list[str]) -> bool:
            want = desired(names)
            running_ok = all(workers[n].running == {s for s, m in want.items() if m == n} for n in names)
            return running_ok and await leases(observer, bucket) == want

        await wait_until(lambda: split_as(["m-a", "m-b"]), 15, "two members splitting the slots")
        nc = await connect()
        await stack.enter_async_context(
            Membership(nc.jetstream(), bucket, workers["m-c"], slots=SLOTS, member_id="m-c")
        )
        await wait_until(lambda: split_as(["m-a", "m-b", "m-c"]), 15, "three members splitting them")
        assert workers["m-c"].running, "the newcomer got slots"
        # Moved slots were stopped by their old holder before the newcomer started them.
        for slot in workers["m-c"].started:
            assert slot in workers["m-a"].stopped + workers["m-b"].stopped


async def test_a_member_cut_off_from_nats_stops_its_slots_within_the_ttl_and_the_other_takes_them_over(
    bucket: str, connect: Callable[[], Awaitable[Client]]
) -> None:
    survivor, cut = Worker(), Worker()
    nc_survivor, nc_cut = await connect(), await connect()
    async with Membership(nc_survivor.jetstream(), bucket, survivor, slots=SLOTS, member_id="stays"):
        member = Membership(nc_cut.jetstream(), bucket, cut, slots=SLOTS, member_id="cut")
        await member.__aenter__()
        try:
            await wait_until(lambda: cut.running and survivor.running, 15, "both members holding slots")
            theirs = set(cut.running)
            await nc_cut.close()  # no renewal gets through any more: as good as dead to the others
            closed_at = time.monotonic()
            await wait_until(lambda: not cut.running, 2 * TTL_S, "the cut-off member stopping its slots")
            assert not any(member.holds(slot) for slot in theirs)
            await wait_until(
                lambda: survivor.running == set(range(SLOTS)), 4 * TTL_S + 5, "the survivor taking over"
            )
            took = time.monotonic() - closed_at
            print(f"takeover after a member was cut off: {took:.2f}s (lease TTL {TTL_S}s)")
            assert member.overlaps == 0
        finally:
            for task in list(member._tasks):  # noqa: SLF001 -- a dead member does not clean up
                task.cancel()


async def test_a_renewal_refused_by_cas_stops_the_slot_and_a_foreign_lease_counts_an_overlap(
    bucket: str, connect: Callable[[], Awaitable[Client]]
) -> None:
    nc, thief = await connect(), await connect()
    worker = Worker()
    overlaps: list[int] = []
    async with Membership(
        nc.jetstream(), bucket, worker, slots=SLOTS, member_id="holder", on_overlap=overlaps.append
    ) as member:
        await wait_until(lambda: worker.running == set(range(SLOTS)), 10, "every slot running")
        kv = await thief.jetstream().key_value(bucket)
        await kv.put(slot_key(3), b"intruder")  # a write that ignores the lease
        await kv.put(slot_key(5), b"intruder")
        await wait_until(
            lambda: member.view.seen[slot_key(3)].value == "intruder", 5, "the watcher seeing it"
        )
        assert not member.holds(3), "a slot leased to another member is not worked on"
        assert overlaps == [3] and member.overlaps == 1
        # Slot 5 is found at the next renewal: its compare-and-set is refused.
        await wait_until(lambda: 5 not in worker.running and 3 not in worker.running, 5, "both stopped")
        assert not member.holds(5)


async def test_a_bucket_lost_with_the_servers_store_is_declared_again_and_every_slot_leased_again(
    bucket: str, namespace: str, connect: Callable[[], Awaitable[Client]]
) -> None:
    nc, admin = await connect(), await connect()
    worker = Worker()
    topology = Topology(namespace)

    async def recreate() -> None:
        await ensure_ingest_bucket(nc.jetstream(), topology, TTL_S)

    async with Membership(nc.jetstream(), bucket, worker, slots=SLOTS, member_id="m", recreate=recreate):
        await wait_until(lambda: worker.running == set(range(SLOTS)), 10, "every slot running")
        await admin.jetstream().delete_stream(f"KV_{bucket}")  # as a server that lost its store
        await wait_until(lambda: len(worker.stopped) >= SLOTS, 4 * TTL_S, "the lost leases stopped")
        await wait_until(
            lambda: _leased_to(admin, bucket, "m"), 8 * TTL_S, "every slot leased again in the new bucket"
        )
        assert worker.running == set(range(SLOTS))


async def _leased_to(nc: Client, bucket: str, member: str) -> bool:
    try:
        return await leases(nc, bucket) == dict.fromkeys(range(SLOTS), member)
    except nats.js.errors.BucketNotFoundError:
        return False


async def test_a_member_cutting_the_work_into_another_number_of_slots_is_reported(
    bucket: str, connect: Callable[[], Awaitable[Client]], caplog: pytest.LogCaptureFixture
) -> None:
    nc, other = await connect(), await connect()
    sixteen = Membership(nc.jetstream(), bucket, Worker(), slots=SLOTS, member_id="sixteen")
    thirty_two = Membership(other.jetstream(), bucket, Worker(), slots=SLOTS * 2, member_id="thirty-two")
    async with sixteen, thirty_two:
        await wait_until(lambda: "thirty-two" in sixteen.members(), 10, "the other member seen")
        await wait_until(
            lambda: "member thirty-two cuts the work into 32 slots, this one into 16" in caplog.text,
            5,
            "the disagreement reported",
        )

"""LeaderLease against a real Postgres: one holder, hand-over when its session ends, prompt stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared import locks
from shared.db import WRITER_ROLE, role_dsn
from shared.lease import LeaderLease
from shared.ops import Lifecycle
from tests.conftest import SERVICE_PASSWORD

LOCK = locks.RELAY_LEADER  # each test has a database of its own, so the real id is free


@pytest.fixture
def dsn(database_url: str) -> str:
    return role_dsn(database_url, WRITER_ROLE, SERVICE_PASSWORD)


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def holders(owner: asyncpg.Connection, lock_id: int) -> list[int]:
    """Backend pids holding session lock ``lock_id``, as Postgres sees them."""
    rows = await owner.fetch(
        """SELECT pid FROM pg_locks
           WHERE locktype = 'advisory' AND granted AND database = (
                 SELECT oid FROM pg_database WHERE datname = current_database())
             AND ((classid::bigint << 32) | objid::bigint) = $1""",
        lock_id,
    )
    return [r["pid"] for r in rows]


async def backend_pid(lease: LeaderLease) -> int:
    async with lease.connection() as conn:
        return conn.get_server_pid()


async def standing_by(lease: LeaderLease) -> tuple[asyncio.Task[bool], asyncio.Event]:
    """``lease`` acquiring in the background, once it has found the lock taken."""
    refused = asyncio.Event()
    task = asyncio.create_task(lease.acquire(on_wait=refused.set))
    await asyncio.wait_for(refused.wait(), 10)
    return task, refused


async def test_of_two_leases_on_one_lock_only_one_holds_it(dsn: str, owner: asyncpg.Connection) -> None:
    lifecycle = Lifecycle()
    async with (
        LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05) as first,
        LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05) as second,
    ):
        assert await first.acquire()
        waiting, _ = await standing_by(second)
        await asyncio.sleep(0.3)  # several polls of the second lease, all refused
        assert not waiting.done()
        assert await holders(owner, LOCK) == [await backend_pid(first)]
        with pytest.raises(RuntimeError, match="not held"):
            async with second.connection():
                pass
        lifecycle.stop()
        assert await asyncio.wait_for(waiting, 5) is False


async def test_releasing_hands_the_lease_over_and_is_not_a_loss(dsn: str, owner: asyncpg.Connection) -> None:
    lifecycle = Lifecycle()
    first = LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05)
    async with LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05) as second:
        assert await first.acquire()
        waiting, _ = await standing_by(second)
        await first.release()
        assert await asyncio.wait_for(waiting, 5) is True
        assert await holders(owner, LOCK) == [await backend_pid(second)]
        assert not first.lost.is_set()
        assert not second.lost.is_set()


async def test_a_holder_whose_session_is_terminated_loses_the_lease_to_the_standby(
    dsn: str, owner: asyncpg.Connection
) -> None:
    lifecycle = Lifecycle()
    async with (
        LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05, check_s=60) as first,
        LeaderLease(dsn, LOCK, lifecycle, poll_s=0.05) as second,
    ):
        assert await first.acquire()
        pid = await backend_pid(first)
        waiting, _ = await standing_by(second)
        assert await owner.fetchval("SELECT pg_terminate_backend($1)", pid)
        # check_s=60: the termination is noticed from the closed connection, not by probing.
        await asyncio.wait_for(first.lost.wait(), 5)
        assert await asyncio.wait_for(waiting, 5) is True
        assert not second.lost.is_set()
        assert await holders(owner, LOCK) == [await backend_pid(second)]
        with pytest.raises((asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError)):
            async with first.connection() as conn:  # work on the lost session cannot happen
                await conn.execute("SELECT 1")


async def test_the_liveness_probe_never_collides_with_the_holders_work(dsn: str) -> None:
    lifecycle = Lifecycle()
    async with LeaderLease(dsn, LOCK, lifecycle, check_s=0.001) as lease:
        assert await lease.acquire()
        for _ in range(200):
            async with lease.connection() as conn:
                assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.001)") == 1
            await asyncio.sleep(0)
        assert not lease.lost.is_set()


async def test_stopping_while_waiting_returns_promptly(dsn: str) -> None:
    lifecycle = Lifecycle()
    async with (
        LeaderLease(dsn, LOCK, lifecycle) as first,
        LeaderLease(dsn, LOCK, lifecycle, poll_s=30) as second,
    ):
        assert await first.acquire()
        waiting, _ = await standing_by(second)
        started = time.monotonic()
        lifecycle.stop()
        assert await asyncio.wait_for(waiting, 5) is False
        assert time.monotonic() - started < 1.0
        assert not second.held


async def test_a_lease_acquired_after_stopping_does_not_wait(dsn: str) -> None:
    lifecycle = Lifecycle()
    async with LeaderLease(dsn, LOCK, lifecycle) as first, LeaderLease(dsn, LOCK, lifecycle) as second:
        assert await first.acquire()
        lifecycle.stop()
        assert await asyncio.wait_for(second.acquire(), 5) is False

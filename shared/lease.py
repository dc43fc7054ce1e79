"""A leader lease: at most one holder at a time of a Postgres session advisory lock.

A session lock lives exactly as long as the session that took it, so the lease takes it on a
connection of its own: when the holder's process dies, Postgres ends the session and frees the
lock, and a standby's next poll takes it. Nothing else needs to expire.

The holder must stop leading as soon as ``lost`` is set: its session ended (Postgres restarted,
the connection was killed), so another process may already hold the lock. Work that must not
happen without the lock can run on the lock's own session (:meth:`LeaderLease.connection`):
it fails once the session is gone, whatever the holder has noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import asyncpg

from shared.db import connect
from shared.ops import Lifecycle


class LeaderLease:
    """One attempt at leading under ``lock_id`` (see :mod:`shared.locks`): ``acquire`` polls
    every ``poll_s`` until the lock is taken or the service stops; leaving the ``async with``
    block releases it by closing the connection. Postgres errors reach the caller, which retries
    with a new lease."""

    def __init__(
        self, dsn: str, lock_id: int, lifecycle: Lifecycle, *, poll_s: float = 1.0, check_s: float = 1.0
    ) -> None:
        self.dsn = dsn
        self.lock_id = lock_id
        self.lifecycle = lifecycle
        self.poll_s = poll_s
        self.check_s = check_s
        self.lost = asyncio.Event()
        self.held = False
        self._conn: asyncpg.Connection | None = None
        self._busy = asyncio.Lock()  # the probe and the holder's work never share the connection
        self._probe_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LeaderLease:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.release()

    async def acquire(self, on_wait: Callable[[], None] | None = None, *, once: bool = False) -> bool:
        """Poll until the lock is ours (True) or the service stops (False); ``on_wait`` is
        called once, when the lock is first found taken. ``once``: one try, False if taken."""
        self._conn = conn = await connect(self.dsn)
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.lock_id):
            if once:
                await self.release()
                return False
            if on_wait is not None:
                on_wait()
                on_wait = None
            if await self.lifecycle.sleep(self.poll_s):
                return False
        self.held = True
        # Told at once when Postgres closes the session; the probe (a statement every check_s)
        # also finds a session that fails statements, and makes TCP notice a peer gone silent.
        conn.add_termination_listener(self._ended)
        if conn.is_closed():
            self.lost.set()
        self._probe_task = asyncio.create_task(self._probe(conn))
        return True

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The session that holds the lock, for work that must fail once the lease is lost."""
        if self._conn is None or not self.held:
            raise RuntimeError("the lease is not held")
        async with self._busy:
            yield self._conn

    async def release(self) -> None:
        """Give the lock up (closing its session frees it); a release is not a loss."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
            self._probe_task = None
        conn, self._conn = self._conn, None
        self.held = False
        if conn is not None:
            conn.remove_termination_listener(self._ended)
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)
            if not conn.is_closed():
                conn.terminate()

    def _ended(self, _: object) -> None:
        self.lost.set()

    async def _probe(self, conn: asyncpg.Connection) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            try:
                async with self._busy:
                    await conn.execute("SELECT 1")
            except Exception:
                self.lost.set()
                return

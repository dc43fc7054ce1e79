"""How the CLI reaches the ledger: Postgres as the read-only role, NATS without endless retries.

Exit codes every subcommand shares: 0 done; 1 refused or not found (a rejected command, an
unknown agent, a bad time); 2 usage or configuration; 3 the ledger could not be reached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import asyncpg
import msgspec
import nats
import nats.errors
from nats.aio.client import Client

from services.cli.render import fail
from shared.db import create_pool
from shared.history import HistoryError, UnknownAgent
from shared.jetstream import Topology
from shared.nats_url import parse_nats_url
from shared.service import require
from shared.settings import Settings, load_settings
from shared.stack import read_stack
from shared.unreachable import ServerUnreachable, redacted_url

OK, REFUSED, USAGE, UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    """Postgres or NATS did not answer; the message says which and where."""


def settings() -> Settings:
    """The environment's settings; unset DATABASE_URL / NATS_URL mean the stack ``pflea up``
    runs from the data folder (its ``stack.json``). Only commands run by hand look there: a
    service without DATABASE_URL refuses to start rather than use whatever a folder holds."""
    return with_running_stack(load_settings())


def with_running_stack(s: Settings) -> Settings:
    """``s`` with the URLs it lacks taken from ``<data_dir>/stack.json``, if there is one."""
    if s.database_url and s.nats_url:
        return s
    info = read_stack(s.data_dir)
    if info is None:
        return s
    return msgspec.structs.replace(
        s, database_url=s.database_url or info.database_url, nats_url=s.nats_url or info.nats_url
    )


def owner_settings() -> Settings:
    """:func:`settings` for commands that change the schema or rebuild read models: DATABASE_URL
    then names the schema owner (``pflea_owner``); under ``pflea up``, its URL from stack.json."""
    s = load_settings()
    if not s.database_url and (info := read_stack(s.data_dir)) is not None and info.owner_database_url:
        s = msgspec.structs.replace(s, database_url=info.owner_database_url)
    return with_running_stack(s)


def topology(s: Settings) -> Topology:
    return Topology(s.namespace)


async def reader_pool(s: Settings) -> asyncpg.Pool:
    """A small pool as whoever DATABASE_URL names: ``pflea_reader`` under ``pflea up`` (its
    ``stack.json``), which can read everything and change nothing."""
    url = require(s.database_url, "DATABASE_URL")
    try:
        return await create_pool(url, min_size=1, max_size=2, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, ServerUnreachable) as exc:
        raise Unreachable(f"cannot reach Postgres at {redacted_url(url)} ({exc})") from None


async def connect_nats(s: Settings) -> Client:
    url = require(s.nats_url, "NATS_URL")
    try:
        return await nats.connect(
            **parse_nats_url(url).connect_options(),
            name="pflea-cli",
            connect_timeout=5,
            allow_reconnect=False,
        )
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise Unreachable(f"cannot reach NATS at {redacted_url(url)} ({exc!r})") from None


def run(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run one subcommand's coroutine and turn the errors a user can act on into exit codes."""
    try:
        return asyncio.run(main())
    except UnknownAgent as exc:
        return fail(str(exc), REFUSED)
    except HistoryError as exc:
        return fail(str(exc), REFUSED)
    except Unreachable as exc:
        return fail(str(exc), UNREACHABLE)
    except asyncpg.UndefinedTableError as exc:
        return fail(f"{exc}: is the database migrated? (pflea migrate)", REFUSED)
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        return fail(f"lost the connection to the ledger ({exc!r})", UNREACHABLE)
    except KeyboardInterrupt:
        return OK


async def with_pool(s: Settings, body: Callable[[asyncpg.Pool], Awaitable[Any]]) -> Any:
    pool = await reader_pool(s)
    try:
        return await body(pool)
    finally:
        await pool.close()


async def agent_exists(pool: asyncpg.Pool, agent_id: str) -> bool:
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM events WHERE stream_id = $1)", agent_id))


def stop_on_signals(stop: asyncio.Event) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

"""Apply the numbered SQL files in ``shared/migrations`` once each, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from importlib import resources

import asyncpg

from shared import locks
from shared.db import OWNER_ROLE
from shared.envelope import ingested_event_id
from shared.settings import CASINO_FEED

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    pass


async def alias_legacy_event_ids(conn: asyncpg.Connection) -> None:
    """Give every event ingested under the old ``"<source>:<tx id>"`` id the id the same
    transaction gets now from the casino's feed (the only feed there was)."""
    rows = await conn.fetch(
        """SELECT event_id, stream_id, data->>'tx_id' AS tx_id FROM events
           WHERE data ? 'tx_id' AND metadata ? 'source' AND NOT metadata ? 'feed'"""
    )
    aliases = [
        (ingested_event_id(CASINO_FEED, r["stream_id"], r["tx_id"]), r["event_id"], r["stream_id"])
        for r in rows
    ]
    await conn.executemany(
        """INSERT INTO event_aliases (alias_id, event_id, stream_id) VALUES ($1, $2, $3)
           ON CONFLICT DO NOTHING""",
        aliases,
    )
    if aliases:
        log.info("aliased %d events ingested before feed-scoped ids", len(aliases))


# Data steps run in the same transaction as the SQL migration of their number.
DATA_STEPS: dict[int, Callable[[asyncpg.Connection], Awaitable[None]]] = {5: alias_legacy_event_ids}


def migration_files() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every ``NNN_name.sql``, in order."""
    found = []
    for entry in resources.files("shared.migrations").iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text()))
    found.sort()
    numbers = [n for n, _, _ in found]
    if len(set(numbers)) != len(numbers):
        raise MigrationError(f"two migrations share a number: {numbers}")
    return found


async def migrate(dsn: str, *, upto: int | None = None) -> list[str]:
    """Bring the database at ``dsn`` up to date as its owner (``pflea_owner``, made by
    :mod:`shared.bootstrap`; never a superuser, so that what it creates is owned by the role the
    grants are written for); return what ran. ``upto``: stop after that migration (tests of a
    migration's data step start from the schema before it)."""
    conn = await asyncpg.connect(dsn)
    applied_now: list[str] = []
    if await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        await conn.close()
        raise MigrationError(
            f"migrations run as {OWNER_ROLE}, not as a superuser: run `pflea bootstrap` once with "
            f"the superuser's URL, then `pflea migrate` with {OWNER_ROLE}'s (README, Security)"
        )
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", locks.MIGRATIONS)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"]: r for r in await conn.fetch("SELECT * FROM schema_migrations")}
        for number, name, sql in migration_files():
            if upto is not None and number > upto:
                break
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if number in done:
                if done[number]["checksum"] != checksum:
                    log.warning("migration %s changed after it was applied; not re-running", name)
                continue
            async with conn.transaction():
                await conn.execute(sql)
                if (step := DATA_STEPS.get(number)) is not None:
                    await step(conn)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    number,
                    name,
                    checksum,
                )
            applied_now.append(name)
            log.info("applied migration %s", name)
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", locks.MIGRATIONS)
        finally:
            await conn.close()
    return applied_now

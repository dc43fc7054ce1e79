"""asyncpg pools: JSON codecs, and the per-service roles that never own a table.

A service connects with ``DATABASE_URL`` naming its own role (``pflea_writer`` for the writer,
…): :func:`service_pool` refuses any other role, a superuser, and the old shared default
password, so a deployment that hands a service the owner's or the superuser's credentials stops
at start instead of running with them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import msgspec

from shared.settings import SettingsError
from shared.unreachable import ServerUnreachable, redacted_url

# The schema's owner: `pflea migrate` and `pflea projections rebuild` connect as it (shared/bootstrap.py).
OWNER_ROLE = "pflea_owner"
# The roles created by `pflea bootstrap`; a service connects as one of them.
INGESTER_ROLE = "pflea_ingester"
WRITER_ROLE = "pflea_writer"
PROJECTOR_ROLE = "pflea_projector"
READER_ROLE = "pflea_reader"
SERVICE_ROLES = (INGESTER_ROLE, WRITER_ROLE, PROJECTOR_ROLE, READER_ROLE)
# The group of agents' own SQL logins (shared/agent_logins.py): each sees only its own rows.
AGENTS_GROUP = "pflea_agents"


# Errors that say nothing about the messages: the database or the connection is away.
TRANSIENT_DB_ERRORS = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    TimeoutError,
)


# The password every role had before secrets were generated, and compose's old NATS defaults.
OLD_DEFAULT_PASSWORDS = frozenset({"pflea", "ingester-dev", "writer-dev", "projector-dev", "cli-dev"})


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def refuse_default_password(url: str, variable: str, *, allowed: bool) -> None:
    """A :class:`SettingsError` naming ``variable`` when ``url`` carries an old default password
    (every role and user had one once), unless ``allowed`` (PFLEA_ALLOW_DEFAULT_PASSWORDS)."""
    passwords = {urlsplit(part.strip()).password for part in url.split(",")}  # NATS_URL: each server
    if any(p is not None and unquote(p) in OLD_DEFAULT_PASSWORDS for p in passwords) and not allowed:
        raise SettingsError(
            variable,
            "uses an old shared default password; generate secrets (`make secrets` for compose; "
            "`pflea up` makes its own), or set PFLEA_ALLOW_DEFAULT_PASSWORDS=1 for a throw-away setup",
        )


def role_dsn(database_url: str, role: str, password: str) -> str:
    """``database_url`` with its user replaced by ``role`` (host, port, database kept)."""
    parts = urlsplit(database_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(role, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _json_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return msgspec.json.encode(value)


def _encode_jsonb(value: Any) -> bytes:
    # jsonb's binary wire format is a version byte (1) and the JSON text; binary so that COPY
    # (the writer's hot path) can carry it.
    return b"\x01" + _json_bytes(value)


def _decode_jsonb(data: bytes) -> str:
    return data[1:].decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON stays text on the way out: callers decode it straight into msgspec structs."""
    await conn.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "json", encoder=lambda v: _json_bytes(v).decode(), decoder=lambda s: s, schema="pg_catalog"
    )


# What connecting fails with when the server is down, starting, or the address is wrong.
_UNREACHABLE = (OSError, TimeoutError, asyncpg.exceptions.CannotConnectNowError)
# ... and when it answers but refuses who we say we are: a configuration error, not a retry.
_REFUSED = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidCatalogNameError,
)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, **kw: Any) -> asyncpg.Pool:
    """A pool of ``min_size`` open connections; ``ServerUnreachable`` if Postgres does not answer."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=init_connection, **kw
        )
    except _UNREACHABLE as exc:
        raise ServerUnreachable("Postgres", dsn, exc) from exc
    except _REFUSED as exc:
        raise SettingsError("DATABASE_URL", f"Postgres at {redacted_url(dsn)} refused: {exc}") from None
    assert pool is not None
    return pool


async def service_pool(dsn: str, role: str, **kw: Any) -> asyncpg.Pool:
    """A service's pool on ``dsn``, which must log in as ``role`` itself: not the owner, not a
    superuser (a :class:`SettingsError` on DATABASE_URL)."""
    pool = await create_pool(dsn, **kw)
    try:
        user, superuser = await pool.fetchrow(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        )
    except BaseException:
        await pool.close()
        raise
    if user != role or superuser:
        await pool.close()
        who = f"{user} (a superuser)" if superuser else user
        raise SettingsError(
            "DATABASE_URL",
            f"logs in as {who}; this service runs only as its own role {role} (README, Security)",
        )
    return pool


async def connect(dsn: str, **kw: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, **kw)
    await init_connection(conn)
    return conn

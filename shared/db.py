"""asyncpg pools: JSON codecs, and the per-service roles that never own a table."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import msgspec

from shared.unreachable import ServerUnreachable

# The roles created by the migrations; a service connects as one of them.
INGESTER_ROLE = "pflea_ingester"
WRITER_ROLE = "pflea_writer"
PROJECTOR_ROLE = "pflea_projector"
READER_ROLE = "pflea_reader"
SERVICE_ROLES = (INGESTER_ROLE, WRITER_ROLE, PROJECTOR_ROLE, READER_ROLE)


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


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10, **kw: Any) -> asyncpg.Pool:
    """A pool of ``min_size`` open connections; ``ServerUnreachable`` if Postgres does not answer."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=init_connection, **kw
        )
    except _UNREACHABLE as exc:
        raise ServerUnreachable("Postgres", dsn, exc) from exc
    assert pool is not None
    return pool


async def connect(dsn: str, **kw: Any) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn, **kw)
    await init_connection(conn)
    return conn

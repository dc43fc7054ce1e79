"""Verifiable history: every stream is a hash chain; tampering is found by `pflea verify`.

The chain is recomputed here from the README's description alone (``canonical`` below is our
own serializer of PostgreSQL's jsonb text form), so the documented encoding is the one stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from shared.bootstrap import ROLES, bootstrap
from shared.chain import GENESIS, published_hashes, verify_against_published, verify_chains
from shared.db import OWNER_ROLE, WRITER_ROLE, role_dsn, with_database
from shared.events import FundsDeposited
from shared.jetstream import Topology
from shared.migrate import migrate
from shared.store import EventStore, NewEvent, StreamEvent
from shared.wire import event_message
from tests.conftest import SERVICE_PASSWORD
from tests.support import REPO

# The README's test vector.
VECTOR_ROW = {
    "stream_id": "agent-0001",
    "stream_type": "agent",
    "version": 1,
    "position": 1,
    "event_id": "0192d1f0-7a3c-7000-8000-000000000001",
    "event_type": "FundsDeposited",
    "occurred_at": datetime(2026, 1, 1, tzinfo=UTC),
    "recorded_at": datetime(2026, 1, 1, 0, 0, 1, 500000, tzinfo=UTC),
    "data": {"amount": "10.00", "asset": "PFLEA", "tx_id": "tx-1"},
    "metadata": {"schema_version": 1, "feed": "casino", "source": "purpleflea"},
}
VECTOR_CANONICAL = (
    '["pflea-event-v1", "agent-0001", "agent", 1, 1, "0192d1f0-7a3c-7000-8000-000000000001", '
    '"FundsDeposited", "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:01.500000Z", '
    '{"asset": "PFLEA", "tx_id": "tx-1", "amount": "10.00"}, '
    '{"feed": "casino", "source": "purpleflea", "schema_version": 1}]'
)


def _string(text: str) -> str:
    """A JSON string as PostgreSQL writes it: escapes for quote, backslash and control
    characters (\\b \\f \\n \\r \\t, else \\u00xx), everything else as UTF-8."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def canonical(value: Any) -> str:
    """PostgreSQL's jsonb text form: objects' keys by (UTF-8 length, bytes), ", " and ": "."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (len(k.encode()), k.encode()))
        return "{" + ", ".join(f"{_string(k)}: {canonical(value[k])}" for k in keys) + "}"
    raise TypeError(f"not JSON: {value!r}")


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event_hash(prev: bytes, row: dict[str, Any]) -> bytes:
    array = [
        "pflea-event-v1",
        row["stream_id"],
        row["stream_type"],
        row["version"],
        row["position"],
        str(row["event_id"]),
        row["event_type"],
        _utc(row["occurred_at"]),
        _utc(row["recorded_at"]),
        row["data"],
        row["metadata"],
    ]
    return hashlib.sha256(prev + canonical(array).encode()).digest()


def test_the_readme_vector_follows_the_documented_encoding() -> None:
    array = [
        "pflea-event-v1",
        *(
            VECTOR_ROW[k]
            for k in ("stream_id", "stream_type", "version", "position", "event_id", "event_type")
        ),
        _utc(VECTOR_ROW["occurred_at"]),
        _utc(VECTOR_ROW["recorded_at"]),
        VECTOR_ROW["data"],
        VECTOR_ROW["metadata"],
    ]
    assert canonical(array) == VECTOR_CANONICAL
    readme = (REPO / "README.md").read_text()
    assert VECTOR_CANONICAL in readme
    assert event_hash(GENESIS, VECTOR_ROW).hex() in readme


async def test_postgres_computes_the_readme_vector(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        r = VECTOR_ROW
        stored = await conn.fetchval(
            """SELECT pflea_event_hash(pflea_chain_genesis(), ROW($1::bigint, $2::uuid, $3, $4, $5,
                   $6::bigint, $7::jsonb, $8::jsonb, $9, $10, NULL)::events)""",
            r["position"],
            uuid.UUID(r["event_id"]),
            r["stream_id"],
            r["stream_type"],
            r["event_type"],
            r["version"],
            json.dumps(r["data"]),
            json.dumps(r["metadata"]),
            r["occurred_at"],
            r["recorded_at"],
        )
    finally:
        await conn.close()
    assert bytes(stored) == event_hash(GENESIS, VECTOR_ROW)


def _deposit(amount: str, note: str = "") -> NewEvent:
    return NewEvent.of(FundsDeposited(amount=Decimal(amount), asset="PFLEA"), metadata={"note": note})


async def _stored_rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM events ORDER BY stream_id, version")
    return [
        {**dict(r), "data": json.loads(r["data"], parse_float=Decimal), "metadata": json.loads(r["metadata"])}
        for r in rows
    ]


async def test_every_path_chains_and_an_independent_recomputation_agrees(
    database_url: str, store: EventStore
) -> None:
    # Text that needs escaping, non-ASCII, keys of different lengths, two streams interleaved.
    notes = ['quote " and \\ backslash', "tab\tnew\nline\x01", "ünïcødé ✓ 🦩", ""]
    batch = [StreamEvent(s, "agent", _deposit(f"{i}.5", notes[i % 4])) for i, s in enumerate("abab" * 3, 1)]
    await store.append_batch(batch)
    await store.append("c", "agent", [_deposit("7")], expected_version=0)  # the single-append path
    conn = await asyncpg.connect(database_url)
    try:
        rows = await _stored_rows(conn)
        prev: dict[str, bytes] = {}
        for row in rows:
            expected = event_hash(prev.get(row["stream_id"], GENESIS), row)
            assert bytes(row["hash"]) == expected, (row["stream_id"], row["version"])
            prev[row["stream_id"]] = expected
        heads = {
            r["stream_id"]: r["hash"] for r in await conn.fetch("SELECT stream_id, hash FROM stream_heads")
        }
        assert heads == {s: h.hex() for s, h in prev.items()}
        assert (await verify_chains(conn)).intact
    finally:
        await conn.close()


async def test_no_service_chooses_position_recorded_at_or_hash(database_url: str, store: EventStore) -> None:
    await store.append_batch([StreamEvent("p", "agent", _deposit("1"))])
    writer = await asyncpg.connect(role_dsn(database_url, WRITER_ROLE, SERVICE_PASSWORD))
    try:
        explicit = """INSERT INTO events (position, event_id, stream_id, stream_type, event_type, version,
                                              data, metadata, occurred_at)
                          OVERRIDING SYSTEM VALUE
                          VALUES (999999, $1, 'p', 'agent', 'FundsDeposited', $2,
                                  '{"amount": "1", "asset": "PFLEA"}', '{"schema_version": 1}', now())"""
        # Before this session drew a position, Postgres itself refuses (no currval yet) ...
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError):
            await writer.execute(explicit, uuid.uuid4(), 2)
        await writer.execute(
            """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata,
                                   occurred_at, recorded_at, hash)
               VALUES ($1, 'p', 'agent', 'FundsDeposited', 2, '{"amount": "1", "asset": "PFLEA"}',
                       '{"schema_version": 1}', now(), '2000-01-01', '\\x00')""",
            uuid.uuid4(),
        )
        row = await writer.fetchrow(
            "SELECT recorded_at, hash FROM events WHERE stream_id = 'p' AND version = 2"
        )
        assert row["recorded_at"].year > 2000 and len(row["hash"]) == 32
        # ... once it has drawn one, the chain's trigger does.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="position is drawn by the store"):
            await writer.execute(explicit, uuid.uuid4(), 3)
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="no version 3"):
            await writer.execute(
                """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata,
                                       occurred_at)
                   VALUES ($1, 'p', 'agent', 'FundsDeposited', 4, '{}', '{"schema_version": 1}', now())""",
                uuid.uuid4(),
            )
    finally:
        await writer.close()
    admin = await asyncpg.connect(database_url)
    try:
        assert (await verify_chains(admin)).intact
    finally:
        await admin.close()


async def _edit_amount(conn: asyncpg.Connection, stream: str, version: int, amount: str) -> None:
    await conn.execute(
        """UPDATE events SET data = jsonb_set(data, '{amount}', to_jsonb($3::text))
           WHERE stream_id = $1 AND version = $2""",
        stream,
        version,
        amount,
    )


@pytest.fixture
async def tampered_store(database_url: str, store: EventStore) -> AsyncIterator[asyncpg.Connection]:
    """Four streams of five events; yields a superuser's connection with the triggers off."""
    await store.append_batch(
        [StreamEvent(s, "agent", _deposit(f"{v}.00")) for v in range(1, 6) for s in "abcd"]
    )
    conn = await asyncpg.connect(database_url)
    await conn.execute("SET session_replication_role = replica")  # every trigger off: the attacker
    try:
        yield conn
    finally:
        await conn.close()


async def test_verify_names_the_edited_deleted_and_swapped_events(tampered_store: asyncpg.Connection) -> None:
    conn = tampered_store
    await _edit_amount(conn, "a", 3, "9999.00")
    await conn.execute("DELETE FROM events WHERE stream_id = 'b' AND version = 2")
    await conn.execute(
        """UPDATE events SET version = CASE version WHEN 2 THEN 1004 ELSE 1002 END
           WHERE stream_id = 'c' AND version IN (2, 4);
           UPDATE events SET version = version - 1000 WHERE stream_id = 'c' AND version > 1000"""
    )
    result = await verify_chains(conn)
    assert result.events == 19 and result.streams == 4
    found = {(b.stream_id, b.version): b for b in result.breaks}
    assert set(found) == {("a", 3), ("b", 3), ("c", 2)}
    assert found["a", 3].expected and found["a", 3].stored and found["a", 3].expected != found["a", 3].stored
    assert "version 2 is missing" in found["b", 3].reason
    # Scope: one stream, or only links after a position.
    assert [b.stream_id for b in (await verify_chains(conn, ["a", "d"])).breaks] == ["a"]
    head = await conn.fetchval("SELECT max(position) FROM events")
    assert (await verify_chains(conn, since=head)).intact


async def test_a_rewrite_with_recomputed_hashes_is_caught_against_the_stream(
    tampered_store: asyncpg.Connection, js_streams: nats.NATS, topology: Topology, store: EventStore
) -> None:
    conn = tampered_store
    js = js_streams.jetstream()
    for event in await store.read_all(0, 100):
        subject, payload, headers = event_message(topology, event)
        await js.publish(subject, payload, headers=headers)  # as the relay did
    # The attacker edits an amount and recomputes the rest of the chain.
    await _edit_amount(conn, "d", 2, "0.01")
    for version in range(2, 6):
        await conn.execute(
            """UPDATE events e SET hash = pflea_event_hash(
                   (SELECT hash FROM events WHERE stream_id = 'd' AND version = $1 - 1), e)
               WHERE stream_id = 'd' AND version = $1""",
            version,
        )
    await conn.execute("DELETE FROM events WHERE stream_id = 'a' AND version = 5")  # a truncated tail
    result = await verify_chains(conn)
    assert result.intact, result.breaks  # the chain alone cannot tell
    await verify_against_published(conn, await published_hashes(js, topology), result)
    found = {(b.stream_id, b.version): b.reason for b in result.breaks}
    assert found.keys() == {("d", 2), ("a", 5)}, result.breaks
    assert "rewritten" in found["d", 2] and "no longer stored" in found["a", 5]
    assert result.published_checked == 20


async def test_pflea_verify_exits_1_naming_the_stream_and_version(
    tampered_store: asyncpg.Connection, database_url: str, tmp_path: Path
) -> None:
    await _edit_amount(tampered_store, "b", 4, "1.01")
    env = {"DATABASE_URL": database_url, "PFLEA_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "verify", "--json", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1, err.decode()
    report = json.loads(out)
    assert report["intact"] is False and report["events"] == 20
    assert [(b["stream_id"], b["version"]) for b in report["breaks"]] == [("b", 4)]


async def test_migration_008_chains_a_store_made_before_it(postgres_url: str) -> None:
    """Events and snapshots stored before the chain existed get it, and verify holds."""
    name = f"pre008_{uuid.uuid4().hex[:8]}"
    url = with_database(postgres_url, name)
    await bootstrap(url, dict.fromkeys(ROLES, SERVICE_PASSWORD), allow_shared=True)
    owner = role_dsn(url, OWNER_ROLE, SERVICE_PASSWORD)
    try:
        await migrate(owner, upto=7)
        conn = await asyncpg.connect(url)
        try:
            for i in range(12):
                await conn.execute(
                    """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                                           metadata, occurred_at)
                       VALUES ($1, $2, 'agent', 'FundsDeposited', $3, $4::jsonb,
                               '{"schema_version": 1}', now())""",
                    uuid.uuid4(),
                    "ab"[i % 2],
                    i // 2 + 1,
                    json.dumps({"amount": f"{i}.25", "asset": "PFLEA", "note": "ü\\n"}),
                )
            await conn.execute(
                """INSERT INTO snapshots (stream_id, snapshot_type, version, schema_version, state)
                   VALUES ('a', 'agent', 4, 1, '{}')"""
            )
            assert (await migrate(owner))[0] == "008_hash_chain.sql"
            rows = await _stored_rows(conn)
            prev: dict[str, bytes] = {}
            for row in rows:
                prev[row["stream_id"]] = event_hash(prev.get(row["stream_id"], GENESIS), row)
                assert bytes(row["hash"]) == prev[row["stream_id"]]
            assert (await verify_chains(conn)).intact
            snapshot_hash = await conn.fetchval("SELECT event_hash FROM snapshots WHERE stream_id = 'a'")
            assert snapshot_hash == await conn.fetchval(
                "SELECT hash FROM events WHERE stream_id = 'a' AND version = 4"
            )
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

"""The records beside events are guarded in Postgres, even against the owner (migration 009):
a command's answer is never truncated away, and a quarantined input keeps its reason and raw
bytes for good; only its counters move, when the same input is quarantined again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db import INGESTER_ROLE, OWNER_ROLE, PROJECTOR_ROLE, WRITER_ROLE, create_pool, role_dsn
from shared.quarantine import Quarantine
from tests.conftest import SERVICE_PASSWORD

RAW = b"\xff the input as it came"


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The schema owner's connection, with one quarantined input and one command answer."""
    conn = await asyncpg.connect(role_dsn(database_url, OWNER_ROLE, SERVICE_PASSWORD))
    try:
        await conn.execute(
            """INSERT INTO quarantine (source, reason, raw, agent_id, dedup_key)
               VALUES ('writer', 'amount: must not be negative', $1, 'agent-a', 'k1')""",
            RAW,
        )
        await conn.execute(
            """INSERT INTO command_results (command_id, agent_id, command_type, accepted, reply)
               VALUES ($1, 'agent-a', 'ClaimFaucet', false, '{}')""",
            uuid.uuid4(),
        )
        yield conn
    finally:
        await conn.close()


async def _kept(conn: asyncpg.Connection) -> tuple[str, bytes, int]:
    row = await conn.fetchrow("SELECT reason, raw, (SELECT count(*) FROM quarantine) AS n FROM quarantine")
    return row["reason"], bytes(row["raw"]), row["n"]


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE quarantine SET reason = 'nothing to see'", "not reason"),
        ("UPDATE quarantine SET raw = 'clean'::bytea", "not raw"),
        ("UPDATE quarantine SET agent_id = 'agent-b', seen_count = 9", "not agent_id"),
        ("UPDATE quarantine SET received_at = now() - interval '1 year'", "not received_at"),
        ("DELETE FROM quarantine", "DELETE is not allowed"),
        ("TRUNCATE quarantine", "TRUNCATE is not allowed"),
    ],
)
async def test_the_owner_cannot_rewrite_or_erase_a_quarantined_input(
    owner: asyncpg.Connection, statement: str, refusal: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match=refusal):
        await owner.execute(statement)
    assert await _kept(owner) == ("amount: must not be negative", RAW, 1)


@pytest.mark.parametrize(
    "statement",
    ["TRUNCATE command_results", "DELETE FROM command_results", "UPDATE command_results SET accepted = true"],
)
async def test_the_owner_cannot_erase_or_change_a_commands_answer(
    owner: asyncpg.Connection, statement: str
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="command_results is append-only"):
        await owner.execute(statement)
    assert await owner.fetchval("SELECT count(*) FROM command_results WHERE NOT accepted") == 1


async def test_the_owner_may_still_count_a_quarantined_input_again(owner: asyncpg.Connection) -> None:
    await owner.execute("UPDATE quarantine SET seen_count = seen_count + 1, last_seen_at = clock_timestamp()")
    assert await owner.fetchval("SELECT seen_count FROM quarantine") == 2


@pytest.mark.parametrize("role", [INGESTER_ROLE, WRITER_ROLE, PROJECTOR_ROLE])
async def test_a_service_counts_the_same_input_again_and_can_change_nothing_else(
    database_url: str, role: str
) -> None:
    pool = await create_pool(role_dsn(database_url, role, SERVICE_PASSWORD), max_size=2)
    try:
        quarantine = Quarantine(pool, "writer")
        for _ in range(3):
            await quarantine.put(RAW, "amount: must not be negative", agent_id="agent-a", key="tx:casino:t1")
        row = await pool.fetchrow(
            "SELECT reason, raw, seen_count, received_at < last_seen_at AS later FROM quarantine"
        )
        assert (row["reason"], bytes(row["raw"]), row["seen_count"], row["later"]) == (
            "amount: must not be negative",
            RAW,
            3,
            True,
        )
        for statement in (
            "UPDATE quarantine SET reason = 'x'",
            "UPDATE quarantine SET raw = 'x'::bytea",
            "DELETE FROM quarantine",
            "TRUNCATE quarantine",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await pool.execute(statement)
        assert await pool.fetchval("SELECT count(*) FROM quarantine WHERE reason LIKE 'amount:%'") == 1
    finally:
        await pool.close()

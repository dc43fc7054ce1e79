"""Least privilege in Postgres: what each role may not do, and services that refuse credentials
that are not their own. Real servers; each guard is the only thing between the test and success.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from devstack.processes import ServiceProcess
from services.projectors.rebuild import rebuild
from shared import locks
from shared.agent_logins import add_login, login_role, remove_login
from shared.bootstrap import (
    READER_CONNECTION_LIMIT,
    READER_STATEMENT_TIMEOUT,
    BootstrapError,
    check_passwords,
)
from shared.db import OWNER_ROLE, PROJECTOR_ROLE, READER_ROLE, WRITER_ROLE, role_dsn
from shared.projections.registry import PROJECTIONS, projection
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import SERVICE_PASSWORD
from tests.reference import generate
from tests.support import service_env

# Every table that holds an agent's rows, with the column naming the agent.
AGENT_TABLES = {
    "events": "stream_id",
    "balances": "agent_id",
    "pnl": "agent_id",
    "portfolio": "agent_id",
    "command_results": "agent_id",
    "quarantine": "agent_id",
}


async def _as(database_url: str, role: str) -> asyncpg.Connection:
    return await asyncpg.connect(role_dsn(database_url, role, SERVICE_PASSWORD))


@pytest.mark.parametrize("role", [READER_ROLE, PROJECTOR_ROLE, "pflea_ingester"])
@pytest.mark.parametrize("function", ["pg_advisory_lock", "pg_try_advisory_lock", "pg_advisory_xact_lock"])
async def test_no_role_but_the_writer_may_take_the_append_lock(
    database_url: str, role: str, function: str
) -> None:
    """Holding it would stall every append: the trigger of every INSERT into events waits for it."""
    conn = await _as(database_url, role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"SELECT {function}($1)", locks.APPENDS)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", 1, 2)
    finally:
        await conn.close()


async def test_the_writer_keeps_the_append_lock(database_url: str) -> None:
    conn = await _as(database_url, WRITER_ROLE)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", locks.APPEND_LEADER)
        assert await conn.fetchval("SELECT pg_advisory_unlock($1)", locks.APPEND_LEADER)
    finally:
        await conn.close()


async def test_a_projector_takes_its_projection_locks_and_no_other(database_url: str) -> None:
    conn = await _as(database_url, PROJECTOR_ROLE)
    try:
        async with conn.transaction():
            for lock_id in locks.PROJECTIONS.values():
                await conn.execute("SELECT pflea_projection_lock_shared($1)", lock_id)
        for lock_id in locks.NAMED.values():
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not a projection"):
                await conn.execute("SELECT pflea_projection_lock_shared($1)", lock_id)
    finally:
        await conn.close()


async def test_the_reader_has_a_statement_timeout_and_a_connection_limit(database_url: str) -> None:
    conn = await _as(database_url, READER_ROLE)
    try:
        assert await conn.fetchval("SHOW statement_timeout") == READER_STATEMENT_TIMEOUT
        assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == READER_STATEMENT_TIMEOUT
        limit = await conn.fetchval("SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user")
        assert limit == READER_CONNECTION_LIMIT
        await conn.execute("SET statement_timeout = '100ms'")  # it applies: a long query is cut
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(5)")
    finally:
        await conn.close()


async def test_the_owner_is_no_superuser_and_owns_the_schema(database_url: str) -> None:
    conn = await _as(database_url, OWNER_ROLE)
    try:
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        owners = await conn.fetch(
            """SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"""
        )
        assert {r["owner"] for r in owners} == {OWNER_ROLE}
    finally:
        await conn.close()


async def test_nobody_else_may_connect_to_the_ledger_database(database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("DROP ROLE IF EXISTS pflea_stranger")
        await admin.execute(f"CREATE ROLE pflea_stranger LOGIN PASSWORD '{SERVICE_PASSWORD}'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="CONNECT"):
            await _as(database_url, "pflea_stranger")
    finally:
        await admin.execute("DROP ROLE IF EXISTS pflea_stranger")
        await admin.close()


def test_bootstrap_refuses_shared_and_old_default_passwords() -> None:
    roles = (OWNER_ROLE, "pflea_ingester", WRITER_ROLE, PROJECTOR_ROLE, READER_ROLE)
    distinct = {role: f"secret-{role}" for role in roles}
    check_passwords(distinct)
    with pytest.raises(BootstrapError, match="share a password"):
        check_passwords(dict(distinct, pflea_reader=distinct[WRITER_ROLE]))
    with pytest.raises(BootstrapError, match="old default"):
        check_passwords(dict(distinct, pflea_reader="pflea"))
    with pytest.raises(BootstrapError, match="no password for pflea_owner"):
        check_passwords({r: p for r, p in distinct.items() if r != OWNER_ROLE})


async def _refused(tmp_path: Path, env: dict[str, str], module: str = "services.writer") -> str:
    proc = ServiceProcess(module, env, tmp_path).start()
    assert await proc.wait_exit(30) == 2
    return proc.log_path.read_text()


async def test_a_service_refuses_the_old_default_password(settings: Settings, tmp_path: Path) -> None:
    env = service_env(settings)
    env["DEVSTACK_DB_ROLE_PASSWORD"] = "pflea"  # the role DSN it gets carries the old default
    log = await _refused(tmp_path, env)
    assert "DATABASE_URL" in log and "old shared default password" in log
    env = dict(service_env(settings), NATS_URL=settings.nats_url.replace("://", "://cli:cli-dev@"))
    log = await _refused(tmp_path, env)
    assert "NATS_URL" in log and "old shared default password" in log


@pytest.mark.parametrize("module", ["services.writer", "services.relay", "services.ingester"])
async def test_a_service_refuses_credentials_not_its_own(
    settings: Settings, tmp_path: Path, module: str
) -> None:
    # The superuser's URL, as tests and old deployments handed it, and another service's role.
    env = service_env(settings)
    env.pop("DEVSTACK_DB_ROLE_PASSWORD")
    log = await _refused(tmp_path, env, module)
    assert "DATABASE_URL" in log and "a superuser" in log and "its own role" in log
    env["DATABASE_URL"] = role_dsn(settings.database_url, READER_ROLE, SERVICE_PASSWORD)
    log = await _refused(tmp_path / "reader", env, module) if (tmp_path / "reader").mkdir() is None else ""
    assert f"logs in as {READER_ROLE}" in log


async def test_an_agents_sql_login_reads_only_its_own_rows(database_url: str, store: EventStore) -> None:
    """Row-level security: agent A's login sees A's rows in every per-agent table, all of the
    public leaderboard, and nothing of B's; removed, it sees nothing and cannot log in."""
    await store.append_batch(generate(7, agents=2, events=200))
    owner = role_dsn(database_url, OWNER_ROLE, SERVICE_PASSWORD)
    for name in PROJECTIONS:
        await rebuild(owner, projection(name))
    admin = await asyncpg.connect(database_url)
    try:
        a, b = [r["stream_id"] for r in await admin.fetch("SELECT DISTINCT stream_id FROM events ORDER BY 1")]
        for agent in (a, b):
            await admin.execute(
                """INSERT INTO quarantine (source, reason, raw, agent_id, dedup_key)
                   VALUES ('t', 'r', 'x', $1, $1)""",
                agent,
            )
            await admin.execute(
                """INSERT INTO command_results (command_id, agent_id, command_type, accepted, reply)
                   VALUES ($1, $2, 'ClaimFaucet', false, '{}')""",
                uuid.uuid4(),
                agent,
            )
        mine = {
            table: await admin.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = $1", a)
            for table, column in AGENT_TABLES.items()
        }
    finally:
        await admin.close()
    assert all(mine.values()), mine
    role = await add_login(owner, a, "agent-a-secret")
    assert role == login_role(a)
    conn = await asyncpg.connect(role_dsn(database_url, role, "agent-a-secret"))
    try:
        for table, column in AGENT_TABLES.items():
            seen = {r["agent"] for r in await conn.fetch(f"SELECT DISTINCT {column} AS agent FROM {table}")}
            assert seen == {a}, f"{table} shows {seen}"
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == mine[table], table
        assert {r["agent_id"] for r in await conn.fetch("SELECT agent_id FROM leaderboard")} == {a, b}
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM snapshots")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pg_advisory_lock($1)", locks.APPENDS)
        assert await conn.fetchval("SHOW statement_timeout") == READER_STATEMENT_TIMEOUT
        assert await remove_login(owner, a)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # even its open session
            await conn.fetchval("SELECT count(*) FROM events")
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(role_dsn(database_url, role, "agent-a-secret"))

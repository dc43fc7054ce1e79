"""An agent's own SQL login: it reads its own ledger, and no other agent's.

``pflea agents add <id>`` calls :func:`add_login` as the schema owner (``pflea_owner`` may create
roles; ``pflea bootstrap`` made it the admin of the ``pflea_agents`` group). The login is a
member of ``pflea_agents``, recorded in ``agent_logins``; migration 007's row-level security
shows it only the rows of its agent in ``events``, ``balances``, ``pnl``, ``portfolio``,
``command_results`` and ``quarantine``, and the whole (public) ``leaderboard``. Like the
reader, it may run a statement for 30 s and hold a few connections.

Role names are derived from the agent id (ids may be 64 characters and mixed case, role names
are at most 63 bytes): ``pflea_agent_`` and 20 hex digits of its SHA-256.
"""

from __future__ import annotations

import hashlib

import asyncpg

from shared.bootstrap import READER_STATEMENT_TIMEOUT, ensure_role, set_password
from shared.db import AGENTS_GROUP

AGENT_CONNECTION_LIMIT = 5


def login_role(agent_id: str) -> str:
    return "pflea_agent_" + hashlib.sha256(agent_id.encode()).hexdigest()[:20]


async def add_login(owner_dsn: str, agent_id: str, password: str) -> str:
    """Create (or give a new password to) ``agent_id``'s login; its role name."""
    role = login_role(agent_id)
    conn = await asyncpg.connect(owner_dsn)
    try:
        async with conn.transaction():
            options = "LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS"
            await ensure_role(conn, role, f"{options} CONNECTION LIMIT {AGENT_CONNECTION_LIMIT}")
            await set_password(conn, role, password)
            await conn.execute(f'GRANT {AGENTS_GROUP} TO "{role}"')
            await conn.execute(f"ALTER ROLE \"{role}\" SET statement_timeout = '{READER_STATEMENT_TIMEOUT}'")
            await conn.execute(
                """INSERT INTO agent_logins (role_name, agent_id) VALUES ($1, $2)
                   ON CONFLICT (role_name) DO NOTHING""",
                role,
                agent_id,
            )
    finally:
        await conn.close()
    return role


async def remove_login(owner_dsn: str, agent_id: str) -> bool:
    """Drop ``agent_id``'s login; whether there was one. It cannot log in again, and a session
    it still has loses every privilege (they came with the group membership, dropped too)."""
    role = login_role(agent_id)
    conn = await asyncpg.connect(owner_dsn)
    try:
        async with conn.transaction():
            removed = await conn.fetchval("DELETE FROM agent_logins WHERE role_name = $1 RETURNING 1", role)
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'DROP ROLE "{role}"')
                removed = True
    finally:
        await conn.close()
    return bool(removed)

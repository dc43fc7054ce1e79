"""What only a superuser can do for the ledger, once per database: roles, passwords, ownership.

Run by ``pflea up`` (it is the superuser of its embedded cluster), by compose's ``migrate`` job
(``pflea bootstrap``, before ``pflea migrate``), and by an operator of an existing Postgres.
Everything after it — the schema, its grants, every service — runs without superuser rights:

- ``pflea_owner`` owns the database and every table; ``pflea migrate`` connects as it. It is not
  a superuser; it may create roles (Postgres 16+ confines that to roles it created itself), so
  ``pflea agents add`` can give an agent a SQL login of its own.
- ``pflea_ingester``, ``pflea_writer``, ``pflea_projector``, ``pflea_reader``: one login per
  service, each with its own password; the migrations grant each only what it needs.
- Nobody but these roles may connect to the database, and the advisory-lock functions are taken
  from PUBLIC: the append order and the leader leases hang on advisory locks, so a role that
  could take them could stall every write. The writer's role keeps them (its trigger and its
  leases need them), the owner keeps them to run migrations and to lend projectors a guarded
  wrapper (migration 006); the reader has none.
- The reader may run a statement for at most 30 s and hold 20 connections.
- ``pflea_agents`` (no login) is the group of agents' own SQL logins (``pflea agents add``,
  :mod:`shared.agent_logins`): row-level security (migration 007) shows each only its own
  rows. The service roles bypass it (BYPASSRLS: they read and write every agent's rows, and
  Postgres refuses COPY into a table whose row security applies); the owner grants the group.

Idempotent: run it again to rotate passwords (then restart the services with the new ones).
Passwords travel as bind parameters of ``set_config`` and are applied by ``format(%L)`` inside the
server, so they never appear in a statement text that a log could keep.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import asyncpg

from shared.db import (
    AGENTS_GROUP,
    OLD_DEFAULT_PASSWORDS,
    OWNER_ROLE,
    READER_ROLE,
    SERVICE_ROLES,
    WRITER_ROLE,
    with_database,
)

log = logging.getLogger(__name__)

# Every login the ledger uses; a password for each is required.
ROLES = (OWNER_ROLE, *SERVICE_ROLES)
# Where compose and `pflea bootstrap` read each role's password from.
PASSWORD_VARIABLES = {role: f"PFLEA_{role.removeprefix('pflea_').upper()}_DB_PASSWORD" for role in ROLES}

READER_STATEMENT_TIMEOUT = "30s"
READER_CONNECTION_LIMIT = 20

# Every function that takes an advisory lock: taken from PUBLIC (pg_catalog's are executable by
# anyone). The unlock functions stay: they release only the caller's own locks, and asyncpg's
# pool calls pg_advisory_unlock_all() whenever it takes a connection back.
ADVISORY_FUNCTIONS = [
    f"{name}({args})"
    for name in (
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_xact_lock",
        "pg_advisory_xact_lock_shared",
        "pg_try_advisory_xact_lock",
        "pg_try_advisory_xact_lock_shared",
    )
    for args in ("bigint", "integer, integer")
]
# Who keeps them: the writer (append trigger, leases) and the owner (migrations; wrappers).
ADVISORY_LOCK_ROLES = (WRITER_ROLE, OWNER_ROLE)


class BootstrapError(RuntimeError):
    pass


def passwords_from_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each role's password from ``PFLEA_<ROLE>_DB_PASSWORD``; a missing one is named."""
    env = os.environ if environ is None else environ
    missing = [v for v in PASSWORD_VARIABLES.values() if not env.get(v)]
    if missing:
        raise BootstrapError(f"set {', '.join(missing)} (e.g. `make secrets` writes them to .env)")
    return {role: env[variable] for role, variable in PASSWORD_VARIABLES.items()}


def check_passwords(passwords: Mapping[str, str], *, allow_shared: bool = False) -> None:
    """Every role has a password, none is the old default, and (unless ``allow_shared``, for
    throw-away test clusters) no two roles share one."""
    missing = [r for r in ROLES if not passwords.get(r)]
    if missing:
        raise BootstrapError(f"no password for {', '.join(missing)}")
    if any(passwords[r] in OLD_DEFAULT_PASSWORDS for r in ROLES):
        raise BootstrapError("an old default password is refused; generate secrets")
    if not allow_shared and len({passwords[r] for r in ROLES}) < len(ROLES):
        raise BootstrapError("two roles share a password; give each role its own")


async def bootstrap(superuser_url: str, passwords: Mapping[str, str], *, allow_shared: bool = False) -> None:
    """Prepare the database ``superuser_url`` names (created if missing) for the ledger."""
    check_passwords(passwords, allow_shared=allow_shared)
    database = urlsplit(superuser_url).path.lstrip("/") or "postgres"
    conn = await asyncpg.connect(with_database(superuser_url, "postgres"))
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            raise BootstrapError("bootstrap needs a superuser's URL (PFLEA_SUPERUSER_URL)")
        await _roles(conn, passwords)
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}" OWNER {OWNER_ROLE}')
    finally:
        await conn.close()
    conn = await asyncpg.connect(superuser_url)
    try:
        async with conn.transaction():
            await _database(conn, database)
    finally:
        await conn.close()
    log.info("bootstrapped database %s: roles %s", database, ", ".join(ROLES))


async def _roles(conn: asyncpg.Connection, passwords: Mapping[str, str]) -> None:
    # Before Postgres 16, CREATEROLE could grant itself any role: the owner then gets none.
    modern = int(await conn.fetchval("SHOW server_version_num")) >= 160000
    for role in ROLES:
        createrole = "CREATEROLE" if role == OWNER_ROLE and modern else "NOCREATEROLE"
        bypassrls = "BYPASSRLS" if role in SERVICE_ROLES else "NOBYPASSRLS"
        await ensure_role(conn, role, f"LOGIN NOSUPERUSER NOCREATEDB NOREPLICATION {bypassrls} {createrole}")
        await set_password(conn, role, passwords[role])
    await ensure_role(conn, AGENTS_GROUP, "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS")
    # The owner adds agents' logins to the group; it does not act as one of them.
    grant = f"GRANT {AGENTS_GROUP} TO {OWNER_ROLE} WITH ADMIN OPTION"
    await conn.execute(grant + (", INHERIT FALSE, SET FALSE" if modern else ""))
    await conn.execute(
        f"ALTER ROLE {READER_ROLE} CONNECTION LIMIT {READER_CONNECTION_LIMIT};"
        f"ALTER ROLE {READER_ROLE} SET statement_timeout = '{READER_STATEMENT_TIMEOUT}';"
        f"ALTER ROLE {READER_ROLE} SET idle_in_transaction_session_timeout = '{READER_STATEMENT_TIMEOUT}'"
    )


def database_access_sql(database: str) -> str:
    """Who may connect to ``database``: the ledger's roles (and superusers), nobody else. A copy
    of a database (``CREATE DATABASE … TEMPLATE``) needs this again: it is not copied."""
    return (
        f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC; '
        f'GRANT CONNECT ON DATABASE "{database}" TO {", ".join((*ROLES, AGENTS_GROUP))}'
    )


async def ensure_role(conn: asyncpg.Connection, role: str, options: str) -> None:
    """``role`` exists with ``options`` (a CREATE/ALTER ROLE option list)."""
    verb = "ALTER" if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role) else "CREATE"
    await conn.execute(f'{verb} ROLE "{role}" {options}')


async def set_password(conn: asyncpg.Connection, role: str, password: str) -> None:
    """``role``'s password, sent as a bind parameter: no statement text (which a server log may
    keep) ever holds it."""
    await conn.execute("SELECT set_config('pflea.secret', $1, false)", password)
    try:
        await conn.execute(
            f"DO $$ BEGIN EXECUTE format('ALTER ROLE %I PASSWORD %L', '{role}', "
            "current_setting('pflea.secret')); END $$"
        )
    finally:
        await conn.execute("RESET pflea.secret")


async def _database(conn: asyncpg.Connection, database: str) -> None:
    await conn.execute(f'ALTER DATABASE "{database}" OWNER TO {OWNER_ROLE}')
    await conn.execute(database_access_sql(database))
    await conn.execute(f"ALTER SCHEMA public OWNER TO {OWNER_ROLE}")
    await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    # A store migrated before there was an owner role: its objects move to the owner.
    for kind, name in await conn.fetch(
        """SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                 WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, c.relname
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
             AND c.relowner <> (SELECT oid FROM pg_roles WHERE rolname = $1)
             AND NOT (c.relkind = 'S' AND EXISTS (
                 SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')))""",
        OWNER_ROLE,
    ):
        await conn.execute(f'ALTER {kind} public."{name}" OWNER TO {OWNER_ROLE}')
    for (signature,) in await conn.fetch(
        """SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = 'public' AND p.proowner <> (SELECT oid FROM pg_roles WHERE rolname = $1)""",
        OWNER_ROLE,
    ):
        await conn.execute(f"ALTER FUNCTION {signature} OWNER TO {OWNER_ROLE}")
    for function in ADVISORY_FUNCTIONS:
        await conn.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{function} FROM PUBLIC")
        for role in ADVISORY_LOCK_ROLES:
            await conn.execute(f"GRANT EXECUTE ON FUNCTION pg_catalog.{function} TO {role}")

"""Databases on a server we administer: one migrated template, and a fresh copy of it per use.

``CREATE DATABASE … TEMPLATE`` copies files, so each test, chaos scenario or bench run gets a
migrated database of its own in milliseconds instead of a migration run.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import asyncpg

from shared.bootstrap import ROLES, bootstrap, database_access_sql
from shared.db import OWNER_ROLE, role_dsn, with_database
from shared.migrate import migrate


async def _execute(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def ensure_database(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on ``admin_url``'s server, created if it does not exist."""
    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


class DatabaseTemplate:
    """A migrated database on ``admin_url``'s server that fresh databases are cloned from.

    ``admin_url`` is a superuser's. :func:`shared.bootstrap.bootstrap` gives every role of the
    ledger ``service_password`` (one for all: a throw-away test cluster), then the template is
    migrated as its owner, as a deployment is.
    """

    def __init__(self, admin_url: str, prefix: str, service_password: str) -> None:
        self.admin_url = admin_url
        self.prefix = prefix
        self.service_password = service_password
        self.name = f"{prefix}_tmpl_{uuid.uuid4().hex[:8]}"

    async def create(self) -> None:
        url = with_database(self.admin_url, self.name)
        await bootstrap(url, dict.fromkeys(ROLES, self.service_password), allow_shared=True)
        await migrate(role_dsn(url, OWNER_ROLE, self.service_password))

    async def clone(self, tag: str = "") -> str:
        """The administrator's URL of a new database, a copy of the template (``tag`` goes in its
        name), owned and guarded as the template is."""
        name = "_".join(part for part in (self.prefix, tag, uuid.uuid4().hex[:12]) if part)
        await _execute(self.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{self.name}" OWNER {OWNER_ROLE}')
        await _execute(self.admin_url, database_access_sql(name))
        return with_database(self.admin_url, name)

    async def drop(self, url: str) -> None:
        """Drop the database ``url`` names, closing its connections first."""
        name = urlsplit(url).path.lstrip("/")
        await _execute(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def remove(self) -> None:
        await self.drop(with_database(self.admin_url, self.name))

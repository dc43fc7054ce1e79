"""Databases on a server we administer: one migrated template, and a fresh copy of it per use.

``CREATE DATABASE … TEMPLATE`` copies files, so each test, chaos scenario or bench run gets a
migrated database of its own in milliseconds instead of a migration run.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.migrate import migrate


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


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

    ``admin_url`` is a superuser's (or a role that may create databases); the service roles are
    given ``service_password`` by the migration, for every database on the server.
    """

    def __init__(self, admin_url: str, prefix: str, service_password: str) -> None:
        self.admin_url = admin_url
        self.prefix = prefix
        self.service_password = service_password
        self.name = f"{prefix}_tmpl_{uuid.uuid4().hex[:8]}"

    async def create(self) -> None:
        await _execute(self.admin_url, f'CREATE DATABASE "{self.name}"')
        await migrate(with_database(self.admin_url, self.name), service_password=self.service_password)

    async def clone(self, tag: str = "") -> str:
        """The owner's URL of a new database, a copy of the template (``tag`` goes in its name)."""
        name = "_".join(part for part in (self.prefix, tag, uuid.uuid4().hex[:12]) if part)
        await _execute(self.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{self.name}"')
        return with_database(self.admin_url, name)

    async def drop(self, url: str) -> None:
        """Drop the database ``url`` names, closing its connections first."""
        name = urlsplit(url).path.lstrip("/")
        await _execute(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def remove(self) -> None:
        await self.drop(with_database(self.admin_url, self.name))

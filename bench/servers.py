"""The benchmark's own servers: a durable embedded Postgres and a nats-server with JetStream.

Postgres runs with ``durable=True`` (fsync on, synchronous commit): the setting a ledger runs
with, so every figure pays for real commits. One instrument is switched on,
``track_commit_timestamp``, so the latency scenario can read each projector transaction's exact
commit time (``pg_xact_commit_timestamp``); it needs a restart, done once at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.embedded import EmbeddedNats, EmbeddedPostgres, nats_server_binary, postgres_binaries
from shared.migrate import migrate

SERVICE_PASSWORD = "pflea-bench"


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@dataclass
class Servers:
    root: Path
    postgres: EmbeddedPostgres
    nats: EmbeddedNats
    template: str = ""

    @property
    def admin_url(self) -> str:
        return self.postgres.url()

    @property
    def nats_url(self) -> str:
        return self.nats.url

    async def new_database(self, tag: str) -> str:
        """The owner URL of a fresh, migrated database (cloned from the template)."""
        name = f"bench_{tag}_{uuid.uuid4().hex[:6]}"
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        finally:
            await admin.close()
        return with_database(self.admin_url, name)

    async def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def _prepare_postgres(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.url())
    try:
        await conn.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    finally:
        await conn.close()
    pg.stop()
    pg.start()


async def _migrated_template(servers: Servers) -> str:
    name = "bench_template"
    admin = await asyncpg.connect(servers.admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(with_database(servers.admin_url, name), service_password=SERVICE_PASSWORD)
    return name


@contextlib.asynccontextmanager
async def running_servers() -> AsyncIterator[Servers]:
    """Both servers in a temp folder that other users may enter (Postgres runs as its own
    OS user when we are root), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pflea-bench-"))
    root.chmod(0o755)
    pg = EmbeddedPostgres(root / "postgres", durable=True)
    nats = EmbeddedNats(root / "nats")
    try:
        pg.start()
        await _prepare_postgres(pg)
        nats.start()
        servers = Servers(root, pg, nats)
        servers.template = await _migrated_template(servers)
        yield servers
    finally:
        nats.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def nats_with_default_sync(servers: Servers) -> AsyncIterator[Servers]:
    """The same servers, but NATS is a second nats-server with JetStream at nats-server's
    default ``sync_interval`` (fsync every 2 minutes) instead of the embedded ``always``: for
    comparison figures only."""
    relaxed = EmbeddedNats(servers.root / "nats-default-sync", durable=False)
    relaxed.start()
    try:
        yield dataclasses.replace(servers, nats=relaxed)
    finally:
        relaxed.stop()


def server_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return f"unknown ({exc})"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"

    return {
        "postgres": first_line([str(postgres_binaries() / "postgres"), "--version"]),
        "nats_server": first_line([str(nats_server_binary()), "--version"]),
    }

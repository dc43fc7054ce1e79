"""The Postgres and nats-server a chaos module owns, so its scenarios may kill, pause and restart
them without touching the session-wide servers the rest of the suite shares."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared.embedded import EmbeddedNats, EmbeddedPostgres
from shared.migrate import migrate
from tests.conftest import SERVICE_PASSWORD


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


class ChaosServers:
    """One Postgres cluster and one nats-server; each scenario gets a fresh database on it."""

    def __init__(self, root: Path, *, durable_nats: bool = True) -> None:
        root.chmod(0o755)  # as root, Postgres runs as its own OS user and must enter the folder
        # Durable (fsync, synchronous commit): an immediate stop must never lose an acked commit.
        self.postgres = EmbeddedPostgres(root / "postgres", durable=True)
        # A SIGKILLed nats-server keeps what it acked only if it fsyncs every write; a module
        # that never kills it may trade that for ~10x the publish rate.
        self.nats = EmbeddedNats(root / "nats", durable=durable_nats)
        self.template = f"chaos_tmpl_{uuid.uuid4().hex[:8]}"
        self.paused: set[str] = set()

    @property
    def admin_url(self) -> str:
        return self.postgres.url()

    @property
    def nats_url(self) -> str:
        return self.nats.url

    async def start(self) -> None:
        self.postgres.start()
        self.nats.start()
        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute(f'CREATE DATABASE "{self.template}"')
        finally:
            await admin.close()
        await migrate(with_database(self.admin_url, self.template), service_password=SERVICE_PASSWORD)

    async def new_database(self) -> str:
        """The owner URL of a fresh, migrated database (cloned from the template)."""
        name = f"chaos_{uuid.uuid4().hex[:12]}"
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

    # The faults. Each leaves the server in a state ensure_up() can always undo.

    def stop_postgres(self, mode: str) -> None:
        self.resume("postgres")
        self.postgres.stop(mode)

    def stop_nats(self, sig: int) -> None:
        self.resume("nats")
        self.nats.stop(sig)

    def pause(self, which: str) -> None:
        (self.postgres if which == "postgres" else self.nats).pause()
        self.paused.add(which)

    def resume(self, which: str) -> None:
        if which in self.paused:
            (self.postgres if which == "postgres" else self.nats).resume()
            self.paused.discard(which)

    def ensure_up(self) -> None:
        """Undo any fault: resume what is paused, start what is stopped (same ports, same data)."""
        for which in list(self.paused):
            self.resume(which)
        if self.postgres.proc is None or self.postgres.proc.poll() is not None:
            self.postgres.start()
        if self.nats.proc is None or self.nats.proc.poll() is not None:
            self.nats.start()

    def stop(self) -> None:
        for which in list(self.paused):
            self.resume(which)  # a stopped process cannot act on SIGTERM
        self.nats.stop(signal.SIGTERM)
        self.postgres.stop("immediate")

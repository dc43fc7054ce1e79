"""A Postgres and a nats-server of our own in one folder, with a migrated template database.

The chaos suite and the benchmark run on these: servers nobody else shares, so a scenario may
stop, pause and restart them, and every figure pays for real commits (Postgres fsyncs and
commits synchronously, as a ledger runs).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

from devstack.databases import DatabaseTemplate
from devstack.embedded import EmbeddedNats, EmbeddedPostgres


class LocalServers:
    """Both servers under ``root``; each user of them gets fresh databases from one template."""

    def __init__(
        self,
        root: Path,
        *,
        prefix: str,
        service_password: str,
        durable_nats: bool = True,
        postgres_config: dict[str, str] | None = None,
    ) -> None:
        root.chmod(0o755)  # as root, Postgres runs as its own OS user and must enter the folder
        self.root = root
        # Durable (fsync, synchronous commit): an immediate stop must never lose an acked commit.
        self.postgres = EmbeddedPostgres(root / "postgres", durable=True, config=postgres_config)
        # A SIGKILLed nats-server keeps what it acked only if it fsyncs every write; a user that
        # never kills it may trade that for ~10x the publish rate.
        self.nats = EmbeddedNats(root / "nats", durable=durable_nats)
        self.template = DatabaseTemplate(self.postgres.url(), prefix, service_password)

    @property
    def admin_url(self) -> str:
        return self.postgres.url()

    @property
    def nats_url(self) -> str:
        return self.nats.url

    async def start(self) -> None:
        self.postgres.start()
        self.nats.start()
        await self.template.create()

    async def new_database(self, tag: str = "") -> str:
        """The owner's URL of a fresh, migrated database."""
        return await self.template.clone(tag)

    async def drop_database(self, url: str) -> None:
        await self.template.drop(url)

    def stop(self) -> None:
        self.nats.stop()
        self.postgres.stop()


Servers = TypeVar("Servers", bound=LocalServers)


def new_root(purpose: str) -> Path:
    """A fresh temp folder (not under pytest's private basetemp: Postgres may run as another user)."""
    return Path(tempfile.mkdtemp(prefix=f"pflea-{purpose}-"))


@contextlib.asynccontextmanager
async def running(servers: Servers) -> AsyncIterator[Servers]:
    """``servers`` started; stopped and their folder removed afterwards, even after a failed start."""
    try:
        await servers.start()
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(servers.root, ignore_errors=True)

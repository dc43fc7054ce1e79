"""The benchmark's own servers: a durable embedded Postgres and a nats-server with JetStream.

Postgres is durable (fsync on, synchronous commit): the setting a ledger runs with, so every
figure pays for real commits. One instrument is switched on, ``track_commit_timestamp``, so the
latency scenario can read each projector transaction's exact commit time
(``pg_xact_commit_timestamp``).
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
from collections.abc import AsyncIterator

from devstack.cluster import NatsCluster
from devstack.embedded import EmbeddedNats, nats_server_binary, postgres_binaries
from devstack.servers import LocalServers, new_root, running

SERVICE_PASSWORD = "pflea-bench"


@contextlib.asynccontextmanager
async def running_servers() -> AsyncIterator[LocalServers]:
    """Both servers in a temp folder, removed afterwards."""
    servers = LocalServers(
        new_root("bench"),
        prefix="bench",
        service_password=SERVICE_PASSWORD,
        postgres_config={"track_commit_timestamp": "on"},
    )
    async with running(servers):
        yield servers


@contextlib.asynccontextmanager
async def nats_with_default_sync(servers: LocalServers) -> AsyncIterator[LocalServers]:
    """The same servers, but NATS is a second nats-server with JetStream at nats-server's
    default ``sync_interval`` (fsync every 2 minutes) instead of the embedded ``always``: for
    comparison figures only."""
    relaxed = EmbeddedNats(servers.root / "nats-default-sync", durable=False)
    relaxed.start()
    try:
        with_relaxed = copy.copy(servers)
        with_relaxed.nats = relaxed
        yield with_relaxed
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


class ClusterNats:
    """What the bench reads of ``servers.nats``, for a cluster: the URL naming every node. Its
    ``proc`` is None: the end-to-end note's CPU accounting leaves the three nodes out."""

    proc = None

    def __init__(self, cluster: NatsCluster) -> None:
        self.cluster = cluster

    @property
    def url(self) -> str:
        return self.cluster.url


@contextlib.asynccontextmanager
async def nats_cluster(servers: LocalServers, size: int = 3) -> AsyncIterator[LocalServers]:
    """The same servers, but NATS is a cluster of ``size`` nodes on this machine, each with
    JetStream at ``sync_interval: always`` as the embedded server."""
    cluster = NatsCluster(servers.root / "nats-cluster", size)
    cluster.start()
    try:
        on_cluster = copy.copy(servers)
        on_cluster.nats = ClusterNats(cluster)  # type: ignore[assignment]
        yield on_cluster
    finally:
        cluster.stop()

"""The Postgres and nats-server a chaos module owns, so its scenarios may kill, pause and restart
them without touching the session-wide servers the rest of the suite shares."""

from __future__ import annotations

import signal
from pathlib import Path

from devstack.cluster import NatsCluster
from devstack.servers import LocalServers
from tests.conftest import SERVICE_PASSWORD


class ChaosServers(LocalServers):
    """One Postgres cluster and one nats-server; each scenario gets a fresh database on it."""

    def __init__(self, root: Path, *, durable_nats: bool = True) -> None:
        super().__init__(root, prefix="chaos", service_password=SERVICE_PASSWORD, durable_nats=durable_nats)
        self.paused: set[str] = set()

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


class ClusterChaosServers(ChaosServers):
    """One Postgres cluster and a 3-node JetStream cluster (NATS_URL names all three nodes),
    so a scenario may SIGKILL a node, or the one leading a stream, and bring it back."""

    def __init__(self, root: Path, *, durable_nats: bool = True, nodes: int = 3) -> None:
        super().__init__(root, durable_nats=durable_nats)
        self.cluster = NatsCluster(root / "cluster", nodes, durable=durable_nats)

    @property
    def nats_url(self) -> str:
        return self.cluster.url

    async def start(self) -> None:
        self.postgres.start()
        self.cluster.start()
        await self.template.create()

    def ensure_up(self) -> None:
        for which in list(self.paused):
            self.resume(which)
        if self.postgres.proc is None or self.postgres.proc.poll() is not None:
            self.postgres.start()
        self.cluster.ensure_up()

    def stop(self) -> None:
        self.cluster.stop(signal.SIGTERM)
        self.postgres.stop("immediate")

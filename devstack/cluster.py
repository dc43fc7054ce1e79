"""A JetStream cluster on one machine: nats-server nodes from the wheel, routed together.

Each node is an :class:`~devstack.embedded.EmbeddedNats` with its own JetStream store, client
port, route port and monitoring port on 127.0.0.1, and the same extra config (e.g. the accounts
of ``pflea up``). A node is healthy when its ``/healthz`` answers 200: nats-server says so only
once it knows the meta leader and every stream and consumer it holds a copy of is current, so a
restarted node is waited for until it has caught up. The tests, the chaos suite and the bench
kill, stop and restart nodes, and ask which node leads a stream.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

from nats.js import JetStreamContext

from devstack.embedded import EmbeddedNats, EmbeddedServerError
from devstack.ports import free_port

CLUSTER_NAME = "pflea"


class ClusterNode(EmbeddedNats):
    """One node: its server name, route port and monitoring port beside the client port."""

    def __init__(self, data_dir: Path, name: str, *, durable: bool, config: str) -> None:
        super().__init__(data_dir, durable=durable, config=config)
        self.name = name
        self.route_port = free_port()
        self.monitor_port = free_port()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        """``/healthz`` says 200: meta leader known, this node's copies current."""
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def monitor(self, endpoint: str) -> dict[str, object]:
        """A monitoring endpoint's JSON (``jsz``, ``varz``, ``routez``)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=2) as answer:
            data: dict[str, object] = json.loads(answer.read())
            return data


class NatsCluster:
    """``size`` routed nodes under ``root``; :attr:`url` names them all, comma-separated."""

    def __init__(self, root: Path, size: int = 3, *, durable: bool = True, config: str = "") -> None:
        self.root = Path(root).absolute()
        names = [f"n{i}" for i in range(1, size + 1)]
        self.nodes = [ClusterNode(self.root / n, n, durable=durable, config=config) for n in names]
        routes = ", ".join(f'"nats://127.0.0.1:{n.route_port}"' for n in self.nodes)
        for node in self.nodes:
            node.extra_config = f"""server_name: {node.name}
http: "127.0.0.1:{node.monitor_port}"
cluster {{
  name: {CLUSTER_NAME}
  listen: "127.0.0.1:{node.route_port}"
  routes: [{routes}]
}}
{config}"""

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this cluster ({', '.join(n.name for n in self.nodes)})")

    def start(self, timeout: float = 60.0) -> str:
        """Every node started, then waited for until all are healthy (a meta leader elected)."""
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_healthy_blocking(timeout)
        return self.url

    def wait_healthy_blocking(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(node.healthy() for node in self.nodes):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"cluster not healthy in {timeout}s: {self.health()}")
            time.sleep(0.1)

    async def wait_healthy(self, timeout: float = 60.0, nodes: list[ClusterNode] | None = None) -> float:
        """Until each of ``nodes`` (default all) is healthy, without blocking the event loop;
        the seconds it took."""
        began = time.monotonic()
        for node in nodes or self.nodes:
            while not await asyncio.to_thread(node.healthy):
                if time.monotonic() - began > timeout:
                    raise EmbeddedServerError(f"{node.name} not healthy in {timeout}s: {self.health()}")
                await asyncio.sleep(0.1)
        return time.monotonic() - began

    def health(self) -> dict[str, str]:
        return {n.name: ("healthy" if n.healthy() else "up" if n.running else "down") for n in self.nodes}

    def kill(self, name: str) -> ClusterNode:
        """SIGKILL a node (its store stays): a machine that died."""
        node = self.node(name)
        node.stop(signal.SIGKILL)
        return node

    def restart(self, name: str) -> ClusterNode:
        """Start a stopped node again on its ports and its store (health is for the caller)."""
        node = self.node(name)
        if not node.running:
            node.start()
        return node

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader, as any running node knows it."""
        for node in self.nodes:
            if node.running:
                try:
                    meta = node.monitor("jsz").get("meta_cluster") or {}
                except (OSError, ValueError):
                    continue
                leader = meta.get("leader") if isinstance(meta, dict) else None
                if leader:
                    return str(leader)
        return None

    def ensure_up(self) -> None:
        """Start any node that is down (same ports, same store)."""
        for node in self.nodes:
            if not node.running:
                node.start()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for node in self.nodes:
            node.stop(sig)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


async def stream_leader(js: JetStreamContext, stream: str) -> str:
    """The server name of the node leading ``stream`` (its Raft group's leader)."""
    info = await js.stream_info(stream)
    if info.cluster is None or not info.cluster.leader:
        raise LookupError(f"stream {stream} has no leader now (or runs on a single server)")
    return info.cluster.leader

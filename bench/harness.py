"""What every scenario gets: the servers, the sizes, a place for logs and profiles, the figures."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client

from bench.processes import ProfiledProcess
from bench.report import Figure
from bench.servers import SERVICE_PASSWORD
from bench.workload import Workload, build_workload
from devstack.processes import service_env
from devstack.servers import LocalServers
from shared.jetstream import StreamSettings, Topology, ensure_streams
from shared.nats_url import parse_nats_url


@dataclass(frozen=True)
class Sizes:
    transactions: int = 200_000  # writer, raw COPY limit and catch-up
    agents: int = 1_000
    limit_messages: int = 50_000  # JetStream publish/consume limits
    e2e_agents: int = 1_000
    e2e_per_agent: int = 50  # e2e backlog: e2e_agents × e2e_per_agent transactions
    latency_rate: float = 1_000.0
    latency_agents: int = 100
    latency_warmup_s: float = 5.0
    latency_window_s: float = 20.0
    rebuild_events: int = 1_000_000
    time_travel_events: int = 100_000
    import_events: int = 100_000  # rows of the article's SQLite file `pflea import sqlite` reads
    time_travel_queries: int = 10
    shards_agents: int = 20_000  # one ingester, nearly all of them idle
    shards_window_s: float = 30.0
    soak_minutes: float = 20.0  # --minutes
    soak_rate: float = 1_000.0  # --rate: transactions/s offered by the simulator
    soak_agents: int = 500
    soak_sample_s: float = 30.0
    ingest_agents: int = 40  # the ingester alone: 5,000 transactions each, so mostly full pages of 200
    ingest_per_agent: int = 5_000
    explorer_events: int = 100_000  # one agent's history, for the web explorer's pages
    explorer_requests: int = 20  # per page

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            transactions=10_000,
            agents=100,
            limit_messages=5_000,
            e2e_agents=100,
            e2e_per_agent=50,
            latency_agents=50,
            latency_warmup_s=2.0,
            latency_window_s=5.0,
            rebuild_events=30_000,
            time_travel_events=5_000,
            import_events=10_000,
            time_travel_queries=5,
            shards_agents=2_000,
            shards_window_s=10.0,
            soak_minutes=1.0,
            soak_rate=200.0,
            soak_agents=50,
            soak_sample_s=10.0,
            ingest_agents=10,
            ingest_per_agent=2_000,
            explorer_events=5_000,
            explorer_requests=5,
        )


@dataclass
class Harness:
    servers: LocalServers
    sizes: Sizes
    log_dir: Path
    profile_dir: Path | None = None
    order: str = "pages"  # of the writer's pre-filled PFLEA_TX; see bench.workload.Workload
    replicas: int = 1  # copies of each stream (PFLEA_STREAM_REPLICAS): 3 on the cluster scenario's
    figures: list[Figure] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def limit(self, name: str) -> float | None:
        """A limit measured earlier in this run, by figure name."""
        for f in self.figures:
            if f.scenario == "limits" and f.name == name:
                return f.value
        return None

    def workload(self) -> Workload:
        if "workload" not in self.cache:
            self.cache["workload"] = build_workload(self.sizes.transactions, self.sizes.agents, self.order)
        workload: Workload = self.cache["workload"]
        return workload

    @staticmethod
    def namespace(tag: str) -> str:
        return f"b{tag}{uuid.uuid4().hex[:6]}"

    def env(self, database_url: str, namespace: str, **extra: str) -> dict[str, str]:
        extra.setdefault("PFLEA_STREAM_REPLICAS", str(self.replicas))
        return service_env(database_url, self.servers.nats_url, namespace, SERVICE_PASSWORD, **extra)

    def service(
        self, scenario: str, name: str, module: str, env: dict[str, str], *args: str, **kw: Any
    ) -> ProfiledProcess:
        log_dir = self.log_dir / scenario
        log_dir.mkdir(parents=True, exist_ok=True)
        profile_dir = self.profile_dir / scenario if self.profile_dir else None
        return ProfiledProcess(module, env, log_dir, *args, name=name, profile_dir=profile_dir, **kw)

    async def nats(self, topology: Topology | None = None) -> Client:
        nc = await nats.connect(**parse_nats_url(self.servers.nats_url).connect_options())
        if topology is not None:
            await ensure_streams(nc.jetstream(), topology, 120, StreamSettings(replicas=self.replicas))
        return nc


def server_pids(h: Harness) -> dict[str, tuple[int, bool]]:
    """nats-server's and Postgres's pid, each with whether its children count (Postgres runs a
    process per connection), for CPU accounting; a cluster's nodes (no single process) are left
    out."""
    servers = (("postgres", h.servers.postgres.proc, True), ("nats-server", h.servers.nats.proc, False))
    return {name: (proc.pid, tree) for name, proc, tree in servers if proc}


async def stream_messages(nc: Client, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.messages)


async def delete_streams(nc: Client, topology: Topology) -> None:
    js = nc.jetstream()
    for name in (topology.tx_stream, topology.events_stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)

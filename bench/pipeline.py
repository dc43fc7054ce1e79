"""The whole pipeline as processes: simulator → ingester → writer → relay → four projectors.

Each run gets its own database and JetStream namespace. Every process's peak RSS is sampled
every 0.5 s for as long as the pipeline runs (``Pipeline.rss``).
"""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from bench.harness import Harness, delete_streams
from bench.processes import ProfiledProcess, RssSampler, stop_all
from devstack.ports import free_port
from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS


class Pipeline:
    def __init__(self, h: Harness, scenario: str, rss: RssSampler) -> None:
        self.h = h
        self.scenario = scenario
        self.rss = rss
        self.topology = Topology(h.namespace(scenario[:3]))
        self.database_url = ""
        self.sim_port = free_port()
        self.processes: list[ProfiledProcess] = []

    async def prepare(self, setup_sql: str = "") -> None:
        self.database_url = await self.h.servers.new_database(self.scenario.replace("-", "_"))
        nc = await self.h.nats(self.topology)  # streams exist before any service starts
        await nc.close()
        if setup_sql:
            conn = await asyncpg.connect(self.database_url)
            try:
                await conn.execute(setup_sql)
            finally:
                await conn.close()

    def _start(
        self, name: str, module: str, *args: str, ready_url: str | None = None, **env: str
    ) -> ProfiledProcess:
        environment = self.h.env(self.database_url, self.topology.namespace, **env)
        proc = self.h.service(self.scenario, name, module, environment, *args, ready_url=ready_url).start()
        self.processes.append(proc)
        self.rss.watch(name, proc.pid)
        return proc

    async def start_sinks(self) -> None:
        """The writer and the four projectors, ready."""
        # As `pflea up` and compose run it: appends in one process, the log tailers in another.
        started = [
            self._start("writer", "services.writer", PFLEA_WRITER_PARTS="append,commands"),
            self._start("relay", "services.relay"),
        ]
        started += [self._start(f"projector-{n}", "services.projectors", n) for n in PROJECTIONS]
        await asyncio.gather(*(p.wait_ready() for p in started))

    async def start_simulator(self, agents: int, backlog: int, rate: float, *, bounded: bool = False) -> None:
        """``bounded``: the simulator keeps its default window of history, as ``make up`` runs
        it (a soak); else the whole backlog stays servable, so every run ingests all of it."""
        history = {} if bounded else {"PFLEA_SIM_HISTORY": str(max(backlog, 5_000))}
        sim = self._start(
            "simulator",
            "services.simulator",
            # Not a ledger service (no /readyz): ready when its admin API answers, as compose checks it.
            ready_url=f"http://127.0.0.1:{self.sim_port}/admin/stats",
            PFLEA_SIM_PORT=str(self.sim_port),
            PFLEA_SIM_AGENTS=str(agents),
            PFLEA_SIM_BACKLOG=str(backlog),
            PFLEA_SIM_RATE=str(rate),
            **history,
        )
        await sim.wait_ready()

    async def start_ingester(self, **env: str) -> float:
        """Start polling; returns ``time.monotonic()`` when the ingester is ready."""
        ingester = self._start(
            "ingester",
            "services.ingester",
            PURPLEFLEA_API_URL=f"http://127.0.0.1:{self.sim_port}",
            PFLEA_AGENTS_FROM_SIMULATOR="1",
            **env,
        )
        return await ingester.wait_ready()

    async def simulator_stats(self) -> dict[str, int]:
        """The simulator's counters (requests served, items served, ...), or {} if it is gone."""
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                response = await client.get(f"http://127.0.0.1:{self.sim_port}/admin/stats")
            stats: dict[str, int] = response.json()
            return stats
        except (httpx.HTTPError, ValueError):
            return {}

    def process(self, name: str) -> ProfiledProcess:
        return next(p for p in self.processes if p.name == name)

    def stop(self) -> None:
        self.rss.sample()
        stop_all(list(reversed(self.processes)))

    async def cleanup(self) -> None:
        nc = await self.h.nats()
        try:
            await delete_streams(nc, self.topology)
        finally:
            await nc.close()
        if self.database_url:
            await self.h.servers.drop_database(self.database_url)


async def pipeline_state(conn: asyncpg.Connection) -> tuple[int, int]:
    """(last position in the log, lowest position applied by any projection)."""
    row = await conn.fetchrow(
        """SELECT (SELECT coalesce(max(position), 0) FROM events) AS head,
                  (SELECT min(position) FROM projection_positions) AS low"""
    )
    return int(row["head"]), int(row["low"])

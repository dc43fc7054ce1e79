"""One chaos scenario run: the real services as subprocesses, the fault schedule, convergence.

A run owns a fresh database and JetStream namespace on the module's :class:`ChaosServers`, an
in-process simulator as ground truth, and the services it starts. It watches that no service
exits unless the schedule made it; after the faults stop it waits, with a deadline, until the
system has caught up with the truth (a system that is merely safe because it stopped fails),
stops every service with SIGTERM (each must exit 0), and runs the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from devstack.processes import ServiceProcess
from services.simulator import FaultKnobs, Simulator
from services.simulator.feed import StoredTx
from shared.jetstream import NATS_ERRORS, Topology
from shared.nats_conn import connect_nats
from shared.settings import load_settings
from tests.chaos import poison
from tests.chaos.checker import PROJECTIONS, Findings, check
from tests.chaos.clock import SkewedClock
from tests.chaos.report import Progress, Verdict
from tests.chaos.schedule import Schedule, Step
from tests.chaos.servers import ChaosServers
from tests.support import service_env, simulator_feeds

PIPELINE = ("ingester", "writer", "relay", *(f"projector-{name}" for name in PROJECTIONS))
# Small, quick pipeline knobs; a scenario overrides what it is about.
BASE_ENV = {
    "PFLEA_INGEST_PAGE_LIMIT": "25",
    "PFLEA_INGEST_POLL_INTERVAL_S": "0.1",
    "PFLEA_INGEST_IDLE_POLL_MAX_S": "0.5",
    "PFLEA_INGEST_TIMEOUT_S": "2",
    "PFLEA_WRITER_BATCH_SIZE": "100",
    "PFLEA_PROJECTOR_BATCH_SIZE": "200",
    "PFLEA_RELAY_POLL_S": "0.2",
    "PFLEA_ACK_WAIT_S": "2",  # redelivery after a kill waits this long
}
STOP_TIMEOUT_S = 20.0
CHECK_ATTEMPTS = 5


def service_command(name: str) -> tuple[str, tuple[str, ...]]:
    """``writer-2`` is a second writer, ``projector-pnl-2`` a second pnl projector replica."""
    kind, _, rest = name.partition("-")
    if kind == "projector":
        return "services.projectors", (rest.split("-")[0],)
    if kind in ("ingester", "writer", "relay"):
        return f"services.{kind}", ()
    raise ValueError(f"unknown service {name!r}")


class ChaosRun:
    """One scenario and seed: its database, namespace, services, schedule and verdict."""

    def __init__(
        self,
        servers: ChaosServers,
        schedule: Schedule,
        database_url: str,
        log_dir: Path,
        sim: Simulator | None,
        sim_url: str | None,
        env: dict[str, str],
    ) -> None:
        self.servers = servers
        self.schedule = schedule
        self.database_url = database_url
        self.log_dir = log_dir
        self.sim = sim
        self.base_faults = sim.faults if sim is not None else FaultKnobs()
        self.topology = Topology(f"c{uuid.uuid4().hex[:10]}")
        settings = load_settings(
            {},
            database_url=database_url,
            nats_url=servers.nats_url,
            namespace=self.topology.namespace,
            data_dir=log_dir,
        )
        extra = dict(BASE_ENV, **env)
        if sim is not None and sim_url is not None:
            extra["PURPLEFLEA_API_URL"] = sim_url
            extra["PURPLEFLEA_AGENTS"] = ",".join(f"{c.agent_id}:{c.api_key}" for c in sim.credentials)
            extra["PURPLEFLEA_FEEDS"] = simulator_feeds(sim_url)
        self.env = service_env(settings, **extra)
        self.procs: dict[str, ServiceProcess] = {}
        self.clocks: dict[str, SkewedClock] = {}
        self.expected_down: set[str] = set()
        self.problems: list[str] = []
        self.external: set[uuid.UUID] = set()
        self.notes: dict[str, object] = {}
        self._nc: Client | None = None
        self._watcher: asyncio.Task[None] | None = None

    # Services

    def proc(self, name: str) -> ServiceProcess:
        if name not in self.procs:
            module, args = service_command(name)
            folder = self.log_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            self.procs[name] = ServiceProcess(module, self.env, folder, *args)
        return self.procs[name]

    def start(self, name: str, **env: str) -> ServiceProcess:
        if name in self.clocks:
            env = dict(self.clocks[name].env(self.env), **env)
        self.expected_down.discard(name)
        if "PFLEA_CRASH_AT" in env:
            self.expected_down.add(name)  # it is meant to die at its crash point
        return self.proc(name).start(**env)

    def kill(self, name: str) -> None:
        self.expected_down.add(name)
        self.proc(name).kill()

    def skew_clock(self, name: str) -> SkewedClock:
        """Give ``name`` a wall clock the schedule can jump (applies from its next start)."""
        clock = self.clocks[name] = SkewedClock(self.log_dir / name / "clock")
        return clock

    async def start_services(self, names: tuple[str, ...] = PIPELINE) -> None:
        for name in names:
            self.start(name)
        for name in names:
            await self.proc(name).wait_ready(30)
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Note any service that exits without the schedule having stopped it."""
        while True:
            for name, proc in self.procs.items():
                if name not in self.expected_down and proc.returncode is not None:
                    self.expected_down.add(name)  # noted once; end_faults restarts it
                    self.problems.append(
                        f"{name} exited by itself with {proc.returncode}:\n{proc.log_tail(15)}"
                    )
            await asyncio.sleep(0.2)

    # The schedule

    async def play(self) -> None:
        print(self.schedule)
        began = time.monotonic()
        for step in self.schedule.steps:
            delay = step.at_s - (time.monotonic() - began)
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule is the clock here, not a wait for state
            await self.perform(step)

    async def perform(self, step: Step) -> None:
        match step.action:
            case "start":
                extra = dict(item.split("=", 1) for item in step.arg.split()) if step.arg else {}
                self.start(step.target, **extra)
            case "kill":
                self.kill(step.target)
            case "await-exit":
                self.expected_down.add(step.target)
                code = await self.proc(step.target).wait_exit(30)
                if code != int(step.arg):
                    self.problems.append(f"{step.target} exited {code}, expected {step.arg}")
            case "await-ready":
                await self.proc(step.target).wait_ready(30)
            case "stop-postgres":
                self.servers.stop_postgres(step.arg)
            case "start-postgres":
                self.servers.postgres.start()
            case "stop-nats":
                self.servers.stop_nats(signal.Signals[f"SIG{step.arg}"])
            case "start-nats":
                self.servers.nats.start()
            case "pause":
                self.servers.pause(step.target)
            case "resume":
                self.servers.resume(step.target)
            case "source-faults":
                assert self.sim is not None
                knobs = msgspec.json.decode(step.arg, type=dict[str, float])
                self.sim.set_faults(msgspec.structs.replace(self.base_faults, **knobs))
            case "clock":
                self.clocks[step.target].jump(step.arg)
            case "poison":
                assert self.sim is not None
                poison.inject(self.sim, step.target, step.arg)
            case _:
                raise ValueError(f"unknown chaos action {step.action!r}")

    # Recovery

    def freeze_load(self) -> None:
        """No new source transactions from here on, so the truth is final."""
        if self.sim is not None:
            # The simulator derives growth from its config's rate and has no other clock state.
            self.sim.config = msgspec.structs.replace(self.sim.config, rate=0.0)

    async def end_faults(self) -> None:
        """Undo every fault, and bring back any service that is down (noted if it died alone)."""
        self.freeze_load()
        if self.sim is not None:
            self.sim.set_faults(self.base_faults)
        self.servers.ensure_up()
        for name, proc in self.procs.items():
            if not proc.alive:
                self.start(name)

    def truth(self) -> list[StoredTx]:
        return self.sim.truth() if self.sim is not None else []

    async def nats(self) -> Client:
        if self._nc is None:
            self._nc = await connect_nats(self.servers.nats_url, "pflea-chaos")
        return self._nc

    async def js(self) -> JetStreamContext:
        return (await self.nats()).jetstream()

    async def progress(self, conn: asyncpg.Connection, truth: list[StoredTx]) -> Progress:
        """Cheap figures first (indexes, consumer info); the per-stream scans only once those
        say done, so that polling a 100k-event log does not itself load the machine."""
        good = [tx.id for tx in truth if tx.malformed is None]
        row = await conn.fetchrow(
            """SELECT
                 (SELECT count(*) FROM quarantine WHERE source = 'ingester') AS quarantined,
                 (SELECT coalesce(max(position), 0) FROM events) AS head,
                 (SELECT coalesce(max(position), 0) FROM relay_checkpoints) AS relayed,
                 (SELECT coalesce(sum(lag_events), 0) FROM projection_status) AS lag"""
        )
        progress = Progress(expected=len(good), expected_quarantined=len(truth) - len(good), **dict(row))
        js = await self.js()
        consumers = [(self.topology.tx_stream, self.topology.writer_durable)] + [
            (self.topology.events_stream, self.topology.projector_durable(p)) for p in PROJECTIONS
        ]
        for stream, durable in consumers:
            try:
                info = await js.consumer_info(stream, durable, timeout=2)
                progress.pending[durable] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except Exception:  # not created yet, or the server is still coming back
                progress.pending[durable] = None
        if not progress.quiet:
            return progress
        progress.stored = await conn.fetchval(
            "SELECT count(DISTINCT data->>'tx_id') FROM events WHERE data->>'tx_id' = ANY($1::text[])", good
        )
        progress.behind = await conn.fetchval(
            """SELECT count(*) FROM (SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) s
               CROSS JOIN unnest($1::text[]) AS p(name)
               LEFT JOIN projection_checkpoints c ON c.projection = p.name AND c.stream_id = s.stream_id
               WHERE c.version IS DISTINCT FROM s.v""",
            list(PROJECTIONS),
        )
        return progress

    async def converge(self, timeout: float) -> float | None:
        """Seconds until the system caught up with the truth, or None (noted) at the deadline."""
        began = time.monotonic()
        truth = self.truth()
        last = Progress()
        while time.monotonic() - began < timeout:
            try:
                conn = await asyncpg.connect(self.database_url, timeout=5)
                try:
                    last = await self.progress(conn, truth)
                finally:
                    await conn.close()
            except (OSError, asyncpg.PostgresError, TimeoutError):
                pass  # a server still coming back: keep polling until the deadline
            if last.done:
                return time.monotonic() - began
            if os.environ.get("PFLEA_CHAOS_DEBUG"):
                print(f"{time.monotonic() - began:6.1f}s {last}")
            await asyncio.sleep(0.25)
        self.problems.append(f"did not converge within {timeout:.0f}s after the faults stopped: {last}")
        for name, proc in self.procs.items():
            self.problems.append(f"--- {name} log tail ---\n{proc.log_tail(12)}")
        return None

    async def stop_services(self) -> None:
        """SIGTERM everything; a clean stop is exit 0 (truth 8), whatever it went through."""
        if self._watcher is not None:
            self._watcher.cancel()
        alive = [(n, p) for n, p in self.procs.items() if p.alive]
        for _, proc in alive:
            proc.send_signal(signal.SIGTERM)
        for name, proc in alive:
            code = await proc.wait_exit(STOP_TIMEOUT_S)
            if code != 0:
                self.problems.append(f"{name} exited {code} on SIGTERM:\n{proc.log_tail(15)}")

    async def finish(
        self, converge_s: float = 60.0, measure: Callable[[], Awaitable[None]] | None = None
    ) -> Verdict:
        """End the faults, wait for convergence, stop cleanly, then check every invariant.

        ``measure`` runs once converged, before the services stop (e.g. to read consumer info).
        """
        await self.end_faults()
        recovery = await self.converge(converge_s)
        if measure is not None:
            await measure()
        await self.stop_services()
        conn = await asyncpg.connect(self.database_url)
        try:
            findings = await self._check(conn)
        finally:
            await conn.close()
        verdict = Verdict(self.schedule, findings, recovery, self.problems, self.notes)
        verdict.record()
        return verdict

    async def _check(self, conn: asyncpg.Connection) -> Findings:
        """Every invariant, read-only, so asked again when NATS could not answer: a cluster node
        brought back a moment ago may refuse JetStream requests (503) while it catches up."""
        for attempt in range(CHECK_ATTEMPTS):
            try:
                return await check(conn, await self.js(), self.topology, self.truth(), self.external)
            except NATS_ERRORS as exc:
                if attempt == CHECK_ATTEMPTS - 1:
                    raise
                self.notes.setdefault("check_retried", repr(exc))
                await asyncio.sleep(1.0)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for proc in self.procs.values():
            proc.kill()
        if self._nc is not None:
            with contextlib.suppress(Exception):  # a server a failed scenario left down
                await self._nc.close()

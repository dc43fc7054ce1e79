"""End to end: simulator → ingester → writer → relay → all four projectors caught up.

**Throughput.** The simulator (its own process, ``rate`` 0) starts with ``e2e_per_agent``
transactions for each of ``e2e_agents`` agents (small pages: about 8 transactions per feed
request); the writer and projectors are up and idle. A second workload takes the ingest
scenario's sizes (``ingest_agents`` × ``ingest_per_agent``: mostly full pages of 200), where
what a feed request costs is spread over 200 events and the rest of the pipeline shows.
The clock runs from the ingester's ``/readyz`` answering until ``count(*) FROM events`` equals the
simulator's total and every projection's ``projection_positions.position`` equals the log's last
position. The note records when each stage finished (PFLEA_TX full, events written, PFLEA_EVENTS
full, each projection caught up) so the slowest stage can be read off.

Its limit is the slowest of the three measured ones (raw COPY, JetStream publish, consume):
every event passes each of them at least once (and JetStream publish twice: PFLEA_TX, then
PFLEA_EVENTS). The same run is repeated on a second nats-server at nats-server's default
``sync_interval`` (fsync every 2 minutes), as an information figure: what the pipeline does
when JetStream's fsync is not the bottleneck.

**Memory.** Peak RSS of each process over this run and the latency run (:mod:`bench.latency`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time

import asyncpg
from nats.aio.client import Client

from bench.harness import Harness, Sizes, server_pids, stream_messages
from bench.pipeline import Pipeline, pipeline_state
from bench.processes import BenchError, RssSampler, cpu_seconds
from bench.report import Figure, Target
from bench.servers import nats_with_default_sync
from bench.workload import holds_events
from shared.projections.registry import PROJECTIONS

MB = 1024 * 1024
LIMITS = ("raw COPY", "JetStream publish", "JetStream consume")


async def _stage_marks(p: Pipeline, conn: asyncpg.Connection, nc: Client, expected: int) -> dict[str, float]:
    """Poll every 0.1 s until every stage holds ``expected``; the monotonic time of each."""
    marks: dict[str, float] = {}
    deadline = time.monotonic() + max(180.0, expected / 300)
    while True:
        now = time.monotonic()
        if now > deadline:
            raise BenchError(f"pipeline did not finish {expected} transactions; stages done: {marks}")
        for proc in p.processes:
            if not proc.alive:
                raise BenchError(f"{proc.name} exited:\n{proc.log_tail()}")
        if "ingested" not in marks and await _published(p) >= expected:
            marks["ingested"] = now
        head, _ = await pipeline_state(conn)
        if "written" not in marks and await holds_events(conn, expected):
            marks["written"] = now
        if "relayed" not in marks and await stream_messages(nc, p.topology.events_stream) >= expected:
            marks["relayed"] = now
        if "written" in marks:
            for row in await conn.fetch("SELECT projection, position FROM projection_positions"):
                if row["position"] >= head:
                    marks.setdefault(row["projection"], now)
        if all(name in marks for name in PROJECTIONS) and "relayed" in marks:
            return marks
        await asyncio.sleep(0.1)


async def _published(p: Pipeline) -> float:
    """Transactions the ingester has published to PFLEA_TX (its own counter: a PFLEA_TX message
    holds a batch of them)."""
    metrics = await p.process("ingester").metrics()
    return metrics.get("pflea_ingester_transactions_published_total", 0.0)


@dataclasses.dataclass(frozen=True)
class Backlog:
    """What the simulator holds at the start, and the rate the pipeline must reach on it."""

    agents: int
    per_agent: int
    label: str  # in the figure's name; "" for the small-page workload every earlier run used
    target: float  # events/s, at default durability

    @property
    def transactions(self) -> int:
        return self.agents * self.per_agent


def small_pages(s: Sizes) -> Backlog:
    return Backlog(s.e2e_agents, s.e2e_per_agent, "", 6_000)


def full_pages(s: Sizes) -> Backlog:
    return Backlog(s.ingest_agents, s.ingest_per_agent, ", pages of 200", 10_000)


async def throughput(
    h: Harness, rss: RssSampler, *, relaxed: bool = False, variant: str = "", backlog: Backlog | None = None
) -> Figure:
    """One end-to-end run; its figure (added to ``h``), named with ``variant`` if given."""
    w = backlog or small_pages(h.sizes)
    expected = w.transactions
    # A run of its own for logs and profiles (``--profile``), each variant apart.
    name = " ".join(["end-to-end", w.label, "relaxed" if relaxed else "", variant])
    p = Pipeline(h, "-".join(re.findall(r"[a-z0-9]+", name.lower())), rss)
    await p.prepare()
    nc = await h.nats()
    conn = await asyncpg.connect(p.database_url)
    servers = server_pids(h)
    server_cpu = {n: cpu_seconds(pid, tree=tree) for n, (pid, tree) in servers.items()}
    try:
        await p.start_simulator(w.agents, w.per_agent, 0)
        await p.start_sinks()
        started = await p.start_ingester()
        marks = await _stage_marks(p, conn, nc, expected)
        quarantined = await conn.fetchval("SELECT count(*) FROM quarantine")
        sim = await p.simulator_stats()
        cpu = {proc.name: cpu_seconds(proc.pid) for proc in p.processes}
        for n, (pid, tree) in servers.items():
            cpu[n] = cpu_seconds(pid, tree=tree) - server_cpu[n]
    finally:
        p.stop()
        await conn.close()
        await nc.close()
        await p.cleanup()
    seconds = max(marks.values()) - started
    names = [LIMITS[0], "JetStream publish, sync_interval 2 min", LIMITS[2]] if relaxed else LIMITS
    limits = {name: h.limit(name) for name in names}
    known = {k: v for k, v in limits.items() if v}
    slowest = min(known, key=lambda k: known[k]) if known else None
    stages = ", ".join(f"{k} {v - started:.1f} s" for k, v in sorted(marks.items(), key=lambda kv: kv[1]))
    return h.add(
        Figure(
            "end-to-end",
            "simulator → 4 read models"
            + w.label
            + (", JetStream sync_interval 2 min" if relaxed else "")
            + variant,
            expected / seconds,
            "events/s",
            f"slowest limit ({slowest})" if slowest else None,
            known.get(slowest) if slowest else None,
            None if relaxed or variant else Target("min", w.target, unit="events/s"),
            note=f"{expected:,} transactions, {w.agents:,} agents, {quarantined} quarantined; "
            f"{sim.get('requests', 0):,} feed requests served by the end; stage done at: {stages}"
            + ("; for comparison only: JetStream without fsync on every write" if relaxed else "")
            + "; "
            + _cpu_note(cpu, expected, seconds),
            detail={
                "stages_s": {k: v - started for k, v in marks.items()},
                "simulator": sim,
                "cpu_s": cpu,
                "cpu_us_per_event": {k: 1e6 * v / expected for k, v in cpu.items()},
            },
        )
    )


def _cpu_note(cpu: dict[str, float], events: int, seconds: float) -> str:
    """Where the machine's CPU went: the budget every event spends across the processes."""
    total = sum(cpu.values())
    per_event = 1e6 * total / events
    cores = os.cpu_count() or 1
    parts = ", ".join(f"{name} {s:.1f}" for name, s in sorted(cpu.items(), key=lambda kv: -kv[1]))
    return (
        f"CPU seconds: {parts} (in all {total:.1f} s = {per_event:.0f} µs per event; {cores} cores "
        f"for {seconds:.1f} s = {cores * seconds:.1f} CPU s, so at most {cores * 1e6 / per_event:,.0f} "
        "events/s on this machine at this cost)"
    )


def memory_figures(h: Harness, rss: RssSampler) -> None:
    for name, peak in sorted(rss.peak.items()):
        service = name != "simulator"
        h.add(
            Figure(
                "memory",
                f"peak RSS {name}",
                peak / MB,
                "MB",
                target=Target("max", 200, unit="MB") if service else None,
                note="" if service else "the stand-in for Purple Flea, not a ledger service",
            )
        )


async def run(h: Harness) -> None:
    from bench import latency

    rss = RssSampler(0.5)
    rss.start()
    try:
        await throughput(h, rss)
        await throughput(h, rss, backlog=full_pages(h.sizes))
        await latency.run(h, rss)
        async with nats_with_default_sync(h.servers) as servers:
            on_relaxed = dataclasses.replace(h, servers=servers)
            await throughput(on_relaxed, rss, relaxed=True)
            await latency.run(on_relaxed, rss, relaxed=True)
    finally:
        await rss.stop()
    memory_figures(h, rss)

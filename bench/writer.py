"""Writer: a pre-filled PFLEA_TX drained into Postgres by the real ``python -m services.writer``.

PFLEA_TX is filled first (the ingester's messages, see :mod:`bench.workload`); then the writer
starts as `pflea up` and compose run it: one process appending (``PFLEA_WRITER_PARTS=append,
commands``), one tailing the log (``python -m services.relay``). Both clocks start when both answer
``/readyz``:

- **writer events/s**: until ``count(*) FROM events`` reaches the total (polled every 0.1 s via
  ``max(position)``, confirmed with ``count(*)``).
- **relay events/s**: until PFLEA_EVENTS holds the total. The relay tails the writer, so it
  cannot finish before the writer does.
- **relay alone**: then the relay again on the whole stored log (its checkpoint set back to 0)
  into a PFLEA_EVENTS of a namespace of its own, nothing else running: what the relay and
  nats-server can do, and their CPU per event.

The database and PFLEA_EVENTS are kept for the catch-up scenario.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg
from nats.aio.client import Client

from bench.harness import Harness, delete_streams, stream_messages
from bench.processes import BenchError, cpu_seconds
from bench.report import Figure, Target
from bench.workload import holds_events, publish_tx
from devstack.processes import wait_until
from shared.jetstream import Topology


@dataclass
class RelayedLog:
    """A database holding ``events`` events, all of them also on ``topology``'s PFLEA_EVENTS."""

    database_url: str
    topology: Topology
    events: int


@dataclass
class Drained:
    """How the writer and the relay drained PFLEA_TX: seconds from ready until the table, then
    PFLEA_EVENTS, held every event; CPU seconds of each process over that time; the writer's
    own metrics at the end."""

    write_s: float
    relay_s: float
    cpu: dict[str, float]
    metrics: dict[str, float]


async def _drain(h: Harness, db: str, nc: Client, topology: Topology, total: int) -> Drained:
    """Run the writer until both the table and PFLEA_EVENTS hold ``total``."""
    relay = h.service("writer", "relay", "services.relay", h.env(db, topology.namespace)).start()
    await relay.wait_ready()
    env = h.env(db, topology.namespace, PFLEA_WRITER_PARTS="append,commands")
    writer = h.service("writer", "writer", "services.writer", env).start()
    conn = await asyncpg.connect(db)
    nats_server = h.servers.nats.proc
    try:
        ready = await writer.wait_ready()
        pids = {"writer": writer.pid, "relay": relay.pid}
        if nats_server:
            pids["nats-server"] = nats_server.pid
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        written_at = relayed_at = 0.0
        deadline = time.monotonic() + max(120.0, total / 500)
        while not (written_at and relayed_at):
            if time.monotonic() > deadline or not (writer.alive and relay.alive):
                tails = f"{writer.log_tail()}\n{relay.log_tail()}"
                raise BenchError(f"writer did not drain {total} transactions:\n{tails}")
            now = time.monotonic()
            if not written_at and await holds_events(conn, total):
                written_at = now
            if not relayed_at and await stream_messages(nc, topology.events_stream) >= total:
                relayed_at = now
                cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
            await asyncio.sleep(0.1)
        stored = await conn.fetchval("SELECT count(*) FROM events")
        if stored != total:
            raise BenchError(f"writer stored {stored} events for {total} transactions")
        metrics = await writer.metrics()
    finally:
        await conn.close()
        writer.stop()
        relay.stop()
    return Drained(written_at - ready, relayed_at - ready, cpu, metrics)


async def run(h: Harness) -> None:
    workload = h.workload()
    total = len(workload)
    topology = Topology(h.namespace("w"))
    db = await h.servers.new_database("writer")
    nc = await h.nats(topology)
    try:
        fill_s = await publish_tx(nc.jetstream(), topology, workload.messages)
        batches = len(workload.messages)
        await wait_until(lambda: _full(nc, topology.tx_stream, batches), 30, "PFLEA_TX pre-filled")
        drained = await _drain(h, db, nc, topology, total)
        write_s, relay_s, metrics = drained.write_s, drained.relay_s, drained.metrics
    finally:
        await nc.close()
    copy_limit = h.limit("raw COPY")
    h.add(
        Figure(
            "writer",
            "writer PFLEA_TX → events",
            total / write_s,
            "events/s",
            "raw COPY",
            copy_limit,
            Target("min", 0.5, on="ratio"),
            note=f"{total:,} transactions over {workload.agents:,} agents "
            f"(PFLEA_TX pre-filled with {batches:,} messages as the ingester batches them, "
            f"{total / fill_s:,.0f} transactions/s); {write_s:.1f} s from ready; "
            + batch_note(metrics, "pflea_writer_batch_seconds", "append + commit"),
            detail={
                "batches": metrics.get("pflea_writer_batch_seconds_count"),
                "batch_seconds": metrics.get("pflea_writer_batch_seconds_sum"),
                "transactions": total,
            },
        )
    )
    h.add(
        Figure(
            "writer",
            "relay events → PFLEA_EVENTS",
            total / relay_s,
            "events/s",
            "JetStream publish",
            h.limit("JetStream publish"),
            note="publishes from the events table while the writer appends (its own process); "
            "clock from the writer's /readyz until PFLEA_EVENTS holds every event; "
            + cpu_note(drained.cpu, total)
            + " (nats-server's includes serving the writer)",
            detail={f"cpu_us_per_event_{name}": 1e6 * s / total for name, s in drained.cpu.items()},
        )
    )
    relay_alone_s, relay_alone_cpu = await _relay_backlog(h, db, total)
    h.add(
        Figure(
            "writer",
            "relay alone, events table → PFLEA_EVENTS",
            total / relay_alone_s,
            "events/s",
            "JetStream atomic batch publish",
            h.limit("JetStream atomic batch publish"),
            note="the writer's log relayed again from position 0 into a stream of its own, nothing "
            "else running; clock from the relay's /readyz until that stream holds every event; "
            + cpu_note(relay_alone_cpu, total),
            detail={f"cpu_us_per_event_{name}": 1e6 * s / total for name, s in relay_alone_cpu.items()},
        )
    )
    h.cache["relayed_log"] = RelayedLog(db, topology, total)


async def _relay_backlog(h: Harness, db: str, total: int) -> tuple[float, dict[str, float]]:
    """The relay alone on ``db``'s whole log, into a PFLEA_EVENTS of a namespace of its own: its
    seconds from ready until that stream held ``total``, and the CPU seconds of it and nats-server."""
    topology = Topology(h.namespace("r"))
    nc = await h.nats(topology)
    conn = await asyncpg.connect(db)
    try:
        await conn.execute("UPDATE relay_checkpoints SET position = 0")
        relay = h.service("writer", "relay-alone", "services.relay", h.env(db, topology.namespace)).start()
        try:
            ready = await relay.wait_ready()
            pids = {"relay": relay.pid}
            if h.servers.nats.proc:
                pids["nats-server"] = h.servers.nats.proc.pid
            cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            deadline = time.monotonic() + max(120.0, total / 500)
            while await stream_messages(nc, topology.events_stream) < total:
                if time.monotonic() > deadline or not relay.alive:
                    raise BenchError(f"the relay did not publish {total} events:\n{relay.log_tail()}")
                await asyncio.sleep(0.05)
            done = time.monotonic()
            cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        finally:
            relay.stop()
        await delete_streams(nc, topology)
    finally:
        await conn.close()
        await nc.close()
    return done - ready, cpu


def cpu_note(cpu: dict[str, float], events: int) -> str:
    """CPU µs per event of each process until PFLEA_EVENTS held every event."""
    by_cost = sorted(cpu.items(), key=lambda item: -item[1])
    each = ", ".join(f"{name} {1e6 * seconds / events:,.0f}" for name, seconds in by_cost)
    return f"CPU µs per event until then: {each}"


def batch_note(metrics: dict[str, float], histogram: str, what: str) -> str:
    """What a service's ``*_batch_seconds`` histogram says: where its time went."""
    count, total = metrics.get(histogram + "_count"), metrics.get(histogram + "_sum")
    if not count or total is None:
        return f"({what} time not scraped)"
    return f"{what}: {count:,.0f} batches, mean {1000 * total / count:.0f} ms, {total:.1f} s in all"


async def _full(nc: Client, stream: str, total: int) -> bool:
    return await stream_messages(nc, stream) >= total

"""Catch-up: each projector, started alone on a backlog already on PFLEA_EVENTS.

The backlog is the writer scenario's (its database and PFLEA_EVENTS). Each projector process
is started in turn, its durable consumer new, so it reads the stream from the start. Its clock
runs from its ``/readyz`` answering until ``projection_positions.position`` reaches the log's last
position; then every stream's checkpoint is checked against the log (``caught up`` means both).

The limit each is compared to is measured on the same backlog first: a bare durable consumer
fetching and acking every PFLEA_EVENTS message (relay headers and all) and doing nothing else.
"""

from __future__ import annotations

import time

import asyncpg

from bench import writer
from bench.harness import Harness
from bench.limits import consume_seconds
from bench.processes import BenchError
from bench.report import Figure, Target
from devstack.processes import wait_until
from shared.projections.registry import PROJECTIONS

_BEHIND = """
    SELECT count(*) FROM (SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) s
    LEFT JOIN projection_checkpoints c ON c.projection = $1 AND c.stream_id = s.stream_id
    WHERE coalesce(c.version, 0) <> s.v
"""


async def _catch_up(h: Harness, log: writer.RelayedLog, name: str) -> tuple[float, dict[str, float]]:
    env = h.env(log.database_url, log.topology.namespace)
    proc = h.service("catchup", f"projector-{name}", "services.projectors", env, name).start()
    conn = await asyncpg.connect(log.database_url)
    try:
        head = await conn.fetchval("SELECT max(position) FROM events")
        ready = await proc.wait_ready()

        async def done() -> float | None:
            if not proc.alive:
                raise BenchError(f"projector {name} exited:\n{proc.log_tail()}")
            position = await conn.fetchval(
                "SELECT position FROM projection_positions WHERE projection = $1", name
            )
            return time.monotonic() if position >= head else None

        finished = await wait_until(
            done, max(120.0, log.events / 500), f"projector {name} caught up", interval=0.1
        )
        behind = await conn.fetchval(_BEHIND, name)
        if behind:
            raise BenchError(f"projector {name}: {behind} streams' checkpoints behind the log")
        metrics = await proc.metrics()
    finally:
        await conn.close()
        proc.stop()
    return float(finished) - ready, metrics


async def _events_consume_limit(h: Harness, log: writer.RelayedLog) -> Figure:
    nc = await h.nats()
    try:
        seconds = await consume_seconds(
            nc, log.topology.events_stream, log.topology.events_filter, log.events
        )
    finally:
        await nc.close()
    return Figure(
        "limits",
        "JetStream consume, PFLEA_EVENTS",
        log.events / seconds,
        "msgs/s",
        note=f"the catch-up backlog itself ({log.events:,} relayed events, relay headers and all), "
        "pulled as the services pull (batches of 1,000), ack each",
    )


async def run(h: Harness) -> None:
    log: writer.RelayedLog | None = h.cache.get("relayed_log")
    if log is None:
        raise BenchError("catch-up needs the writer scenario's log; run it first")
    limit_figure = h.add(await _events_consume_limit(h, log))
    limit = limit_figure.value
    for name in PROJECTIONS:
        seconds, metrics = await _catch_up(h, log, name)
        batches = writer.batch_note(
            {k.replace(f"{{projection={name}}}", ""): v for k, v in metrics.items()},
            "pflea_projector_batch_seconds",
            "apply + commit",
        )
        h.add(
            Figure(
                "catch-up",
                f"projector {name}",
                log.events / seconds,
                "events/s",
                limit_figure.name,
                limit,
                Target("min", 20_000, unit="events/s"),
                note=f"{log.events:,} events backlog, {seconds:.1f} s; {batches}",
            )
        )

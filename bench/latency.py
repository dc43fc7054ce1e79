"""Latency at a steady rate: from ingest publish to read-model commit, per event.

The simulator generates ``latency_rate`` transactions a second across ``latency_agents`` agents
(round-robin); the ingester polls each agent every second, as configured by default. After
``latency_warmup_s`` the next ``latency_window_s`` seconds of transactions are measured.

For each event of the window:

- **ingest publish** = when the bench's own subscriber to ``<ns>.tx.>`` received the ingester's
  PFLEA_TX message carrying it (a core subscription: PFLEA_TX is a work queue, so a message the
  writer stored is gone from the stream, JetStream timestamp and all, when the bench reads). The
  time the transaction waited in the simulator for the next poll is not counted.
- **written** = the commit time of the writer's transaction that inserted it
  (``pg_xact_commit_timestamp(events.xmin)``).
- **relayed** = the JetStream timestamp of its PFLEA_EVENTS message.
- **read-model commit** = for each projection, the commit time of the first projector
  transaction whose ``projection_positions.position`` reached the event's position. A bench-only
  trigger logs every update of that row in ``bench_commits``; the row's ``xmin`` is the
  projector's transaction, and ``track_commit_timestamp`` (on in the bench's Postgres) gives its
  exact commit time. One replica per projector consumes in position order, so that commit is the
  one that applied the event.

The reported latency of an event is to the *last* of the four read models (all caught up).
Postgres and NATS stamp with the same machine clock.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.harness import Harness
from bench.pipeline import Pipeline, pipeline_state
from bench.processes import RssSampler
from bench.report import Figure, Target
from devstack.processes import wait_until
from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS
from shared.wire import HDR_POSITION, decode_tx_message

SETUP_SQL = """
CREATE TABLE bench_commits (projection text NOT NULL, position bigint NOT NULL);
CREATE FUNCTION bench_log_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
BEGIN
    INSERT INTO bench_commits VALUES (NEW.projection, NEW.position);
    RETURN NULL;
END;
$$;
CREATE TRIGGER bench_log_commit AFTER UPDATE ON projection_positions
    FOR EACH ROW EXECUTE FUNCTION bench_log_commit();
"""


async def stream_times(nc: Client, stream: str, subject: str, by_position: bool) -> dict[int, float]:
    """Stream sequence (or the ``Pflea-Position`` header) → JetStream timestamp, for every message
    (of a limits stream: PFLEA_EVENTS)."""
    js = nc.jetstream()
    total = (await js.stream_info(stream)).state.messages
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    times: dict[int, float] = {}
    deadline = time.monotonic() + 60
    received = 0
    try:
        while received < total and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(1000, timeout=2.0)
            except TimeoutError:  # nats-py raises both its own and asyncio's
                continue
            received += len(msgs)
            for m in msgs:
                key = (
                    int(m.headers[HDR_POSITION]) if by_position and m.headers else m.metadata.sequence.stream
                )
                times[key] = m.metadata.timestamp.timestamp()
        return times
    finally:
        await sub.unsubscribe()


async def _commit_times(conn: asyncpg.Connection) -> dict[str, tuple[list[int], list[float]]]:
    rows = await conn.fetch(
        """SELECT projection, position, pg_xact_commit_timestamp(xmin) AS committed
           FROM bench_commits ORDER BY projection, position, committed"""
    )
    out: dict[str, tuple[list[int], list[float]]] = {name: ([], []) for name in PROJECTIONS}
    for r in rows:
        positions, times = out[r["projection"]]
        positions.append(r["position"])
        times.append(r["committed"].timestamp())
    return out


def _first_commit(commits: tuple[list[int], list[float]], position: int) -> float | None:
    positions, times = commits
    i = bisect.bisect_left(positions, position)
    return times[i] if i < len(times) else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def watch_publishes(nc: Client, topology: Topology) -> tuple[dict[str, float], Subscription]:
    """Event id → when its PFLEA_TX message was published (seen by a subscriber), from now on."""
    times: dict[str, float] = {}

    async def seen(msg: Msg) -> None:
        now = time.time()
        for envelope in decode_tx_message(msg.data):
            times.setdefault(str(envelope.event_id), now)

    return times, await nc.subscribe(topology.tx_filter, cb=seen)


async def _measure(
    p: Pipeline, nc: Client, window: tuple[float, float], tx_times: dict[str, float]
) -> dict[str, list[float]]:
    """Per-stage latencies (ms) of every event published to PFLEA_TX inside ``window``."""
    relay_times = await stream_times(nc, p.topology.events_stream, p.topology.events_filter, by_position=True)
    conn = await asyncpg.connect(p.database_url)
    try:
        events = await conn.fetch(
            """SELECT position, event_id::text AS event_id,
                      pg_xact_commit_timestamp(xmin) AS written FROM events"""
        )
        commits = await _commit_times(conn)
    finally:
        await conn.close()
    stages: dict[str, list[float]] = {"written": [], "relayed": [], "all read models": []}
    stages.update({name: [] for name in PROJECTIONS})
    for e in events:
        ingested = tx_times.get(e["event_id"])
        if ingested is None or not window[0] <= ingested < window[1]:
            continue
        found = [_first_commit(commits[name], e["position"]) for name in PROJECTIONS]
        projected = [t for t in found if t is not None]
        if len(projected) < len(found):
            continue
        stages["written"].append((e["written"].timestamp() - ingested) * 1000)
        if (relayed := relay_times.get(e["position"])) is not None:
            stages["relayed"].append((relayed - ingested) * 1000)
        for name, t in zip(PROJECTIONS, projected, strict=True):
            stages[name].append((t - ingested) * 1000)
        stages["all read models"].append((max(projected) - ingested) * 1000)
    return stages


async def run(h: Harness, rss: RssSampler, *, relaxed: bool = False) -> None:
    """``relaxed``: ``h.servers`` is a nats-server at the default ``sync_interval``; the figures
    are information, named for it."""
    s = h.sizes
    p = Pipeline(h, "latency", rss)
    await p.prepare(SETUP_SQL)
    nc = await h.nats()
    try:
        await p.start_sinks()
        await p.start_simulator(s.latency_agents, 0, s.latency_rate)
        tx_times, watching = await watch_publishes(nc, p.topology)
        await p.start_ingester()
        start = time.time() + s.latency_warmup_s
        window = (start, start + s.latency_window_s)
        await asyncio.sleep(s.latency_warmup_s + s.latency_window_s + 0.5)
        p.process("ingester").stop()
        await watching.unsubscribe()
        await _wait_caught_up(p)
        stages = await _measure(p, nc, window, tx_times)
    finally:
        p.stop()
        await nc.close()
        await p.cleanup()
    _figures(h, stages, ", JetStream sync_interval 2 min" if relaxed else "")


async def _wait_caught_up(p: Pipeline) -> None:
    conn = await asyncpg.connect(p.database_url)
    try:

        async def caught_up() -> bool:
            head, low = await pipeline_state(conn)
            return low >= head

        await wait_until(caught_up, 60, "projectors caught up after the latency window")
    finally:
        await conn.close()


def _figures(h: Harness, stages: dict[str, list[float]], variant: str = "") -> None:
    total = stages["all read models"]
    s = h.sizes
    if not total:
        h.add(Figure("latency", "p99 ingest → read models", None, "ms", note="no event in the window"))
        return
    rate = len(total) / s.latency_window_s
    breakdown = "; ".join(
        f"{k} p50 {statistics.median(v):.0f} / p99 {percentile(v, 0.99):.0f} ms"
        for k, v in stages.items()
        if v
    )
    h.add(
        Figure(
            "latency",
            f"p50 ingest → read models @ {s.latency_rate:,.0f}/s{variant}",
            statistics.median(total),
            "ms",
            note=f"{len(total):,} events in {s.latency_window_s:.0f} s ({rate:,.0f}/s achieved, "
            f"{s.latency_agents} agents); per stage from ingest publish: {breakdown}",
        )
    )
    h.add(
        Figure(
            "latency",
            f"p99 ingest → read models @ {s.latency_rate:,.0f}/s{variant}",
            percentile(total, 0.99),
            "ms",
            target=None if variant else Target("max", 250, unit="ms"),
            detail={
                k: {"p50": statistics.median(v), "p99": percentile(v, 0.99), "max": max(v), "n": len(v)}
                for k, v in stages.items()
                if v
            },
        )
    )

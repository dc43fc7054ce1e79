"""Partitioned writers: the same pre-filled PFLEA_TX drained by one writer (P=1) and by three
writer processes on three partitions (P=3), in one run, so the ratio is P=3 over P=1.

No relay runs (the writer's throughput alone). The appends of all partitions still serialise
on the global-order lock (``pflea_writer_batch_seconds`` is append + commit, the time a batch
holds it), so on two cores P=3 shows what partitioning costs and where the lock sits, not a
speed-up; README "Growing past one machine" turns these figures into a capacity model.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from bench.harness import Harness, stream_messages
from bench.processes import BenchError
from bench.report import Figure
from bench.workload import holds_events, publish_tx
from bench.writer import batch_note
from devstack.processes import wait_until
from shared.jetstream import StreamSettings, Topology, declare_streams

BATCHES = "pflea_writer_batch_seconds"


async def _drain(h: Harness, partitions: int) -> tuple[int, float, list[dict[str, float]]]:
    workload = h.workload()
    total = len(workload)
    topology = Topology(h.namespace(f"p{partitions}"))
    db = await h.servers.new_database(f"partitions{partitions}")
    nc = await h.nats()
    try:
        js = nc.jetstream()
        await declare_streams(
            js, topology, duplicate_window_s=120, shape=StreamSettings(partitions=partitions)
        )
        await publish_tx(js, topology, workload.messages)
        batches = len(workload.messages)
        await wait_until(
            lambda: _holds(nc, topology.tx_stream, batches), 30, f"PFLEA_TX (P={partitions}) pre-filled"
        )
        env = h.env(db, topology.namespace, PFLEA_WRITER_PARTS="append")
        writers = [
            h.service("partitions", f"writer-p{partitions}-{i}", "services.writer", env).start()
            for i in range(partitions)
        ]
        conn = await asyncpg.connect(db)
        try:
            ready = max([await w.wait_ready() for w in writers])
            deadline = time.monotonic() + max(120.0, total / 500)
            while not await holds_events(conn, total):
                if time.monotonic() > deadline or not all(w.alive for w in writers):
                    raise BenchError(f"P={partitions} did not drain:\n" + writers[0].log_tail())
                await asyncio.sleep(0.1)
            seconds = time.monotonic() - ready
            stored = await conn.fetchval("SELECT count(*) FROM events")
            if stored != total:
                raise BenchError(f"P={partitions} stored {stored} events for {total} transactions")
            metrics = [await w.metrics() for w in writers]
        finally:
            await conn.close()
            for w in writers:
                w.stop()
    finally:
        await nc.close()
    return total, seconds, metrics


async def _holds(nc, stream: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await stream_messages(nc, stream) >= n


def _merged(metrics: list[dict[str, float]], histogram: str) -> dict[str, float]:
    return {key: sum(m.get(key, 0.0) for m in metrics) for key in (histogram + "_count", histogram + "_sum")}


async def run(h: Harness) -> None:
    total, one_s, one = await _drain(h, 1)
    _, three_s, three = await _drain(h, 3)
    h.add(
        Figure(
            "partitions",
            "writer, P=1 (one writer)",
            total / one_s,
            "events/s",
            note=f"{total:,} transactions; "
            + batch_note(
                _merged(one, "pflea_writer_batch_seconds"), "pflea_writer_batch_seconds", "lock held"
            ),
        )
    )
    h.add(
        Figure(
            "partitions",
            "writer, P=3 (three writers)",
            total / three_s,
            "events/s",
            "writer, P=1 (one writer)",
            total / one_s,
            note="same workload, three writer processes each appending one partition; "
            + batch_note(_merged(three, BATCHES), BATCHES, "lock held"),
        )
    )

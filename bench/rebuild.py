"""Rebuild: ``services.projectors.rebuild.rebuild(owner_dsn, model)`` of each projection over a
log of ``rebuild_events`` events (1,000 agents), generated server-side for speed.

Its limit, measured on the same log just before: **log scan**, the rebuild's own query read
through an asyncpg cursor (prefetch 20,000, one REPEATABLE READ transaction) doing nothing
with the rows: how fast Python can receive the log at all.

On the same log, **verify**: ``shared.chain.verify_chains`` (what ``pflea verify`` runs),
recomputing every hash chain; the target is 1M events in under a minute.
"""

from __future__ import annotations

import time

from bench.harness import Harness
from bench.report import Figure, Target
from bench.workload import generate_log
from services.projectors.rebuild import rebuild
from shared.chain import verify_chains
from shared.db import connect
from shared.projections.registry import PROJECTIONS

_SCAN_SQL = """
    SELECT stream_id, version, position, event_type, data,
           (metadata->>'schema_version')::int AS schema_version, recorded_at
    FROM events WHERE position > $1 ORDER BY position
"""
AGENTS = 1_000


async def _scan(url: str) -> tuple[int, float]:
    conn = await connect(url)
    try:
        started = time.perf_counter()
        rows = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for _ in conn.cursor(_SCAN_SQL, 0, prefetch=20000):
                rows += 1
        return rows, time.perf_counter() - started
    finally:
        await conn.close()


async def run(h: Harness) -> None:
    events = h.sizes.rebuild_events
    url = await h.servers.new_database("rebuild")
    try:
        conn = await connect(url)
        try:
            generated_s = await generate_log(conn, events, AGENTS)
            await conn.execute("VACUUM ANALYZE events")
        finally:
            await conn.close()
        rows, scan_s = await _scan(url)
        scan = h.add(
            Figure(
                "limits",
                "log scan",
                rows / scan_s,
                "events/s",
                note=f"the rebuild's query over {rows:,} events, rows received and dropped "
                f"(log generated server-side at {events / generated_s:,.0f} events/s)",
            )
        )
        conn = await connect(url)
        try:
            started = time.perf_counter()
            verified = await verify_chains(conn)
            verify_s = time.perf_counter() - started
        finally:
            await conn.close()
        h.add(
            Figure(
                "verify",
                "pflea verify",
                verified.events / verify_s,
                "events/s",
                "log scan",
                scan.value,
                Target("min", 1_000_000 / 60, unit="events/s"),
                note=f"{verified.events:,} events in {verified.streams:,} streams recomputed in "
                f"{verify_s:.1f} s ({'intact' if verified.intact else f'{len(verified.breaks)} breaks!'})",
            )
        )
        for name, model in PROJECTIONS.items():
            report = await rebuild(url, model)
            h.add(
                Figure(
                    "rebuild",
                    f"rebuild {name}",
                    report.events / report.seconds,
                    "events/s",
                    "log scan",
                    scan.value,
                    Target("min", 50_000, unit="events/s"),
                    note=f"{report.events:,} events → {report.rows:,} rows in {report.seconds:.1f} s",
                )
            )
    finally:
        await h.servers.drop_database(url)

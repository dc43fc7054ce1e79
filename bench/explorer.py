"""The web explorer: each page's time and weight for one agent with ``explorer_events`` events.

The agent's history is generated server-side (as the time-travel scenario's), its snapshots are
taken as the writer's snapshotter would (``PFLEA_SNAPSHOT_EVERY``), and its read models rebuilt
(``pflea rebuild``'s code). The explorer then runs in this process as it does in its own
(``services.web.app.make_app`` on a ``pflea_reader`` pool and a NATS connection), on
127.0.0.1, and each page is requested ``explorer_requests`` times over HTTP, logged in as the
operator. The time is the whole request as a local client sees it (an upper bound on the
server's time); the budget is 150 ms a page, reported as a ratio to it. The weight is the page's
HTML plus the static files it loads; the budget is 300 KB.
"""

from __future__ import annotations

import re
import statistics
import time

import aiohttp
import nats
from aiohttp import web

from bench.harness import Harness
from bench.report import Figure, Target
from bench.servers import SERVICE_PASSWORD
from bench.workload import generate_log
from services.projectors.rebuild import rebuild
from services.web.app import make_app
from services.web.auth import Gate
from shared.db import READER_ROLE, WRITER_ROLE, connect, create_pool, role_dsn
from shared.history import stream_head, take_snapshots
from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS
from shared.settings import Settings
from shared.store import EventStore

AGENT_PREFIX = "web-agent-"
AGENT = AGENT_PREFIX + "00000"
TOKEN = "bench-operator-token"
PAGE_BUDGET_MS = 150.0
WEIGHT_BUDGET_KB = 300.0


async def _prepare(url: str, events: int) -> None:
    conn = await connect(url)
    try:
        await generate_log(conn, events, 1, prefix=AGENT_PREFIX)
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()
    writer = await create_pool(role_dsn(url, WRITER_ROLE, SERVICE_PASSWORD), max_size=2)
    try:
        async with writer.acquire() as conn:
            head = await stream_head(conn, AGENT)
            await take_snapshots(EventStore(writer), conn, AGENT, Settings().snapshot_every, head)
    finally:
        await writer.close()
    for model in PROJECTIONS.values():
        await rebuild(url, model)


async def _pages(url: str) -> dict[str, str]:
    """Each page measured, by name: the newest and the first event in the what-ifs."""
    conn = await connect(url)
    try:
        head = await stream_head(conn, AGENT)
        at_version = "SELECT event_id FROM events WHERE stream_id = $1 AND version = $2"
        newest = await conn.fetchval(at_version, AGENT, head)
        first = await conn.fetchval(at_version, AGENT, 1)
        escrow = await conn.fetchval(
            """SELECT event_id FROM events WHERE stream_id = $1
               AND event_type IN ('AgentRegistered', 'EscrowLocked', 'EscrowReleased')
               ORDER BY version LIMIT 1""",
            AGENT,
        )
        asset = await conn.fetchval("SELECT asset FROM balances WHERE agent_id = $1 LIMIT 1", AGENT)
    finally:
        await conn.close()
    base = f"/agents/{AGENT}"
    return {
        "leaderboard": "/",
        "agent": base,
        "agent, events of one type, further back": f"{base}?type=BetPlaced&before={head // 2}",
        "explain a balance": f"{base}/explain?asset={asset}&figure=balance",
        "time travel, a version": f"{base}/history?version={head // 3}",
        "time travel, a time": f"{base}/history?at=2025-01-01T12:00:00Z&by=recorded",
        "what-if, newest event off": f"{base}/what-if?without={newest}",
        "operations": "/operations",
        # Its sums are taken out of the actual state (AgentFold.without): no refold.
        "what-if, first event off": f"{base}/what-if?without={first}",
        # An escrow event's effect depends on the state before it: every event after it is
        # folded again, the price of switching off an early stateful event.
        "what-if, first escrow event off (a refold)": f"{base}/what-if?without={escrow}",
    }


async def _measure(base: str, path: str, requests: int) -> tuple[list[float], int]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(base, headers=headers) as client:
        weight = 0
        async with client.get(path) as r:  # warm up; the weight of the page and what it loads
            assert r.status == 200, f"{path}: {r.status} {(await r.text())[:300]}"
            html = await r.text()
        weight = len(html.encode())
        for asset in sorted(set(_static_assets(html))):
            async with client.get(asset) as r:
                weight += len(await r.read())
        timings = []
        for _ in range(requests):
            started = time.perf_counter()
            async with client.get(path) as r:
                await r.read()
            timings.append((time.perf_counter() - started) * 1000)
    return timings, weight


def _static_assets(html: str) -> list[str]:
    return re.findall(r'(?:href|src)="(/static/[^"]+)"', html)


async def run(h: Harness) -> None:
    events, requests = h.sizes.explorer_events, h.sizes.explorer_requests
    url = await h.servers.new_database("explorer")
    reader = nc = runner = None
    try:
        started = time.perf_counter()
        await _prepare(url, events)
        prepared_s = time.perf_counter() - started
        pages = await _pages(url)
        reader = await create_pool(role_dsn(url, READER_ROLE, SERVICE_PASSWORD), max_size=10)
        nc = await nats.connect(h.servers.nats_url)
        app = make_app(reader, nc, Topology(h.namespace("web")), Gate(TOKEN, h.log_dir))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        heaviest = ("", 0)
        for name, path in pages.items():
            timings, weight = await _measure(base, path, requests)
            heaviest = max(heaviest, (name, weight), key=lambda x: x[1])
            info_only = name.endswith("(a refold)")
            h.add(
                Figure(
                    "explorer",
                    f"{name} (ms)",
                    statistics.median(timings),
                    "ms",
                    limit_name="page budget",
                    limit_value=PAGE_BUDGET_MS,
                    target=None if info_only else Target("max", 1.0, on="ratio"),
                    note=f"median of {requests} requests, max {max(timings):.1f} ms; {events:,} events; "
                    f"{weight / 1024:.1f} KB"
                    + ("; not a target: see the scenario's docstring" if info_only else ""),
                )
            )
        h.add(
            Figure(
                "explorer",
                "heaviest page (KB)",
                heaviest[1] / 1024,
                "KB",
                limit_name="page weight budget",
                limit_value=WEIGHT_BUDGET_KB,
                target=Target("max", 1.0, on="ratio"),
                note=f"{heaviest[0]}: HTML and the static files it loads; "
                f"history generated, snapshotted and projected in {prepared_s:.0f} s",
            )
        )
    finally:
        if runner is not None:
            await runner.cleanup()
        if nc is not None:
            await nc.close()
        if reader is not None:
            await reader.close()
        await h.servers.drop_database(url)

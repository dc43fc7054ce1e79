"""One ingester with 20,000 agents on the simulator's 6 feeds, nearly all idle.

What an agent costs the ingester when it does nothing: the simulator (its own process) serves
``shards_agents`` agents with two transactions each and then ``20`` transactions/s over all of
them (an agent gets one every ~1,000 s); a writer stores what is published. Measured:

* **first round**: from the ingester's ``/readyz`` until the simulator has answered as many feed
  requests as there are (agent, feed) pairs and every backlog transaction is stored: each agent
  read once on each feed, cursors from Postgres included;
* **round while idle**: over a window after that, (agent, feed) pairs ÷ feed requests per second,
  i.e. how long until every agent is looked at again;
* **CPU while idle**: the ingester's CPU seconds over that window ÷ its length (1.0 = one core);
* **RSS**: the ingester's resident memory at the end of the window, and its peak.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import asyncpg
import psutil

from bench.harness import Harness
from bench.pipeline import Pipeline
from bench.processes import RssSampler, cpu_seconds
from bench.report import Figure, Target
from services.simulator.feed import FEEDS
from shared.jetstream import ingest_bucket

MB = 1024 * 1024
BACKLOG = 2
RATE = 20.0


async def run(h: Harness) -> None:
    agents = h.sizes.shards_agents
    pairs = agents * len(FEEDS)
    rss = RssSampler(0.5)
    rss.start()
    p = Pipeline(h, "shards", rss)
    await p.prepare()
    conn = await asyncpg.connect(p.database_url)
    try:
        await p.start_simulator(agents, BACKLOG, RATE)
        writer = p._start("writer", "services.writer", PFLEA_WRITER_PARTS="append,commands")
        await writer.wait_ready()
        launched = time.monotonic()
        ingester = p._start(
            "ingester",
            "services.ingester",
            PURPLEFLEA_API_URL=f"http://127.0.0.1:{p.sim_port}",
            PFLEA_AGENTS_FROM_SIMULATOR="1",
        )
        ready = await ingester.wait_ready(timeout=300)
        base = (await p.simulator_stats()).get("requests", 0)
        backlog = agents * BACKLOG

        async def first_round_done() -> bool:
            served = (await p.simulator_stats()).get("requests", 0) - base
            stored = await conn.fetchval("SELECT count(*) FROM events")
            return served >= pairs and stored >= backlog

        while not await first_round_done():
            await asyncio.sleep(0.5)
        first_round = time.monotonic() - ready

        window = h.sizes.shards_window_s
        requests0 = (await p.simulator_stats()).get("requests", 0)
        cpu0, t0 = cpu_seconds(ingester.pid), time.monotonic()
        await asyncio.sleep(window)
        requests1 = (await p.simulator_stats()).get("requests", 0)
        cpu1, t1 = cpu_seconds(ingester.pid), time.monotonic()
        rss_now = ingester_rss(ingester.pid)
        metrics = await ingester.metrics()
    finally:
        p.stop()
        await conn.close()
        await rss.stop()
        nc = await h.nats()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(f"KV_{ingest_bucket(p.topology)}")
        await nc.close()
        await p.cleanup()

    polls_per_s = (requests1 - requests0) / (t1 - t0)
    cpu_share = (cpu1 - cpu0) / (t1 - t0)
    note = (
        f"{agents:,} agents × {len(FEEDS)} feeds = {pairs:,} (agent, feed) pairs, {BACKLOG} transactions "
        f"each then {RATE:g}/s over all; ready {ready - launched:.1f} s after start; "
        f"{polls_per_s:,.0f} feed requests/s while idle; poll lag at the end "
        f"{metrics.get('pflea_ingester_poll_lag_seconds', 0):.1f} s; "
        f"slots held {metrics.get('pflea_ingester_slots_held', 0):.0f}"
    )
    h.add(Figure("shards", "first round of polls, 20k agents", first_round, "s", note=note))
    h.add(
        Figure(
            "shards",
            "round of polls while idle",
            pairs / polls_per_s if polls_per_s else None,
            "s",
            note=f"{pairs:,} pairs ÷ {polls_per_s:,.0f} requests/s over {t1 - t0:.0f} s",
        )
    )
    h.add(
        Figure(
            "shards",
            "ingester CPU while idle",
            cpu_share,
            "cores",
            note=f"{cpu1 - cpu0:.1f} CPU s over {t1 - t0:.0f} s = "
            f"{1000 * (cpu1 - cpu0) / max(1, requests1 - requests0):.2f} ms per feed request; idle "
            "agents are polled as often as the workers allow (PFLEA_INGEST_IDLE_POLL_MAX_S)",
        )
    )
    h.add(
        Figure("shards", "ingester RSS while idle", rss_now / MB, "MB", target=Target("max", 200, unit="MB"))
    )
    h.add(
        Figure(
            "shards",
            "ingester peak RSS",
            rss.peak.get("ingester", 0) / MB,
            "MB",
            target=Target("max", 200, unit="MB"),
        )
    )


def ingester_rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0

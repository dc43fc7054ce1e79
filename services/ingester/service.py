"""Wire the ingester: a client per feed, a poller per (agent, feed), bounded concurrency."""

from __future__ import annotations

import asyncio
import logging

from services.ingester.client import FeedClient
from services.ingester.poller import AgentPoller
from services.ingester.recent import RecentIds
from shared.db import INGESTER_ROLE, service_pool
from shared.jetstream import StreamSettings, Topology, ensure_streams
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.service import require
from shared.settings import Settings, SettingsError

log = logging.getLogger(__name__)


async def run_ingester(settings: Settings, lifecycle: Lifecycle) -> None:
    database_url = require(settings.database_url, "DATABASE_URL")
    nats_url = require(settings.nats_url, "NATS_URL")
    topology = Topology(settings.namespace)
    casino = FeedClient(settings.purpleflea_api_url, settings.ingest_timeout_s, settings.ingest_concurrency)
    feeds: list[FeedClient] = []
    pool = await service_pool(database_url, INGESTER_ROLE, max_size=4)
    nc = await connect_nats(nats_url, "pflea-ingester")
    try:
        agents = list(settings.purpleflea_agents)
        configured = settings.feeds()
        if settings.agents_from_simulator:
            agents += await _simulator_agents(casino, lifecycle)
            if not settings.purpleflea_feeds:
                configured = tuple(await casino.simulator_feeds())
        feeds += [
            FeedClient(
                f.url,
                settings.ingest_timeout_s,
                settings.ingest_concurrency,
                name=f.name,
                max_page_bytes=settings.ingest_max_page_bytes,
            )
            for f in configured
        ]
        if not agents:
            raise SettingsError("PURPLEFLEA_AGENTS", "no agents to poll")
        js = nc.jetstream()
        await ensure_streams(js, topology, settings.duplicate_window_s, StreamSettings.of(settings))
        gate = asyncio.Semaphore(settings.ingest_concurrency)
        quarantine = Quarantine(pool, "ingester")
        recent = RecentIds(settings.ingest_page_limit, settings.ingest_recent_ids)
        pollers = [
            AgentPoller(
                agent,
                feed=feed,
                js=js,
                pool=pool,
                quarantine=quarantine,
                topology=topology,
                settings=settings,
                lifecycle=lifecycle,
                gate=gate,
                reconnects=lambda: int(nc.stats["reconnects"]),
                recent=recent,
            )
            for agent in agents
            for feed in feeds
        ]
        lifecycle.ready = True
        names = ",".join(f"{f.name}={f.url}" for f in configured)
        log.info("ingesting", extra={"agents": len(agents), "feeds": names})
        results = await asyncio.gather(*(p.run() for p in pollers), return_exceptions=True)
        for poller, result in zip(pollers, results, strict=True):
            if isinstance(result, BaseException) and not lifecycle.stopping.is_set():
                log.error("poller stopped: %r", result, extra={"agent": poller.agent.agent_id})
    finally:
        await nc.drain()
        for client in (casino, *feeds):
            await client.close()
        await pool.close()


async def _simulator_agents(feed: FeedClient, lifecycle: Lifecycle) -> list:
    """Ask the simulator for its agents, waiting for it to come up."""
    while True:
        try:
            return await feed.simulator_agents()
        except Exception as exc:
            log.warning("simulator not answering yet: %r", exc)
            if await lifecycle.sleep(1.0):
                return []

"""Wire the ingester: a client per feed, the slots this replica leases, their agents' pollers
in one schedule run by a bounded set of workers."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from prometheus_client import Gauge

from services.ingester.client import FeedClient
from services.ingester.poller import AgentPoller
from services.ingester.recent import RecentIds
from services.ingester.schedule import PollSchedule
from services.ingester.shards import AgentShards
from shared.db import INGESTER_ROLE, service_pool
from shared.jetstream import StreamSettings, Topology, ensure_ingest_bucket, ensure_streams, ingest_bucket
from shared.membership import Membership
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.service import require
from shared.settings import AgentCredential, Settings, SettingsError

log = logging.getLogger(__name__)

SLOTS_HELD = Gauge(
    "pflea_ingester_slots_held", "Slots (shares of the agents) this replica holds the lease of"
)


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
        await ensure_ingest_bucket(js, topology, settings.ingest_lease_ttl_s, settings.stream_replicas)
        gate = asyncio.Semaphore(settings.ingest_concurrency)
        quarantine = Quarantine(pool, "ingester")
        recent = RecentIds(settings.ingest_page_limit, settings.ingest_recent_ids)
        schedule = PollSchedule(
            settings.ingest_concurrency, lifecycle, may_poll=lambda slot: membership.holds(slot)
        )

        def reconnects() -> int:
            return int(nc.stats["reconnects"])

        lease_of: dict[int, Callable[[], bool]] = {}  # one per slot, shared by its pollers

        def make_poller(agent: AgentCredential, feed: FeedClient, slot: int) -> AgentPoller:
            if slot not in lease_of:
                lease_of[slot] = functools.partial(membership.holds, slot)
            return AgentPoller(
                agent,
                feed=feed,
                js=js,
                pool=pool,
                quarantine=quarantine,
                topology=topology,
                settings=settings,
                lifecycle=lifecycle,
                gate=gate,
                reconnects=reconnects,
                recent=recent,
                may_publish=lease_of[slot],
            )

        shards = AgentShards(
            agents,
            feeds,
            settings.ingest_slots,
            schedule,
            make_poller,
            spread_s=settings.ingest_poll_interval_s,
            pool=pool,
        )
        membership = Membership(
            js,
            ingest_bucket(topology),
            shards,
            slots=settings.ingest_slots,
            on_overlap=shards.overlap,
            recreate=lambda: ensure_ingest_bucket(
                js, topology, settings.ingest_lease_ttl_s, settings.stream_replicas
            ),
        )
        async with membership:
            SLOTS_HELD.set_function(lambda: len(membership.held))
            await membership.synced(timeout=30)
            # Ready once polling its share: after a SIGKILL, the leases of this replica's
            # previous life must expire first (a TTL at most).
            if not await membership.settled(timeout=4 * membership.ttl_s):
                log.warning("not holding every slot this replica should own yet; ready anyway")
            lifecycle.ready = True
            names = ",".join(f"{f.name}={f.url}" for f in configured)
            log.info(
                "ingesting",
                extra={
                    "agents": len(agents),
                    "feeds": names,
                    "member": membership.member_id,
                    "slots": settings.ingest_slots,
                },
            )
            await schedule.run()  # until SIGTERM; then the leases are given up as the block ends
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

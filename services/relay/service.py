"""Wire the relay and the snapshotter: the two tailers of the events table, one process.

Both are woken by the NOTIFY of every append (and poll every ``PFLEA_RELAY_POLL_S``), so they
need nothing from the writer; in a process of their own they take no CPU from the appends.
Replicas are safe: one relay leads (a Postgres advisory lock) while the others stand by, and
every snapshotter may work (a snapshot at a version never changes).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from nats.aio.client import Client

from services.relay.relay import Relay
from services.relay.snapshots import Snapshotter
from shared.db import WRITER_ROLE, service_pool
from shared.jetstream import StreamSettings, Topology, ensure_streams
from shared.lag import report_tailer_lag
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.service import require, run_together
from shared.settings import Settings
from shared.store import EventStore

log = logging.getLogger(__name__)

PARTS = ("relay", "snapshots")


async def run_relay(settings: Settings, lifecycle: Lifecycle) -> None:
    dsn = require(settings.database_url, "DATABASE_URL")
    nats_url = require(settings.nats_url, "NATS_URL")
    topology = Topology(settings.namespace)
    pool = await service_pool(dsn, WRITER_ROLE, min_size=2, max_size=16)
    nc = await connect_nats(nats_url, "pflea-relay")
    try:
        await ensure_streams(
            nc.jetstream(), topology, settings.duplicate_window_s, StreamSettings.of(settings)
        )
        jobs = tailers(PARTS, EventStore(pool), nc, topology, settings, lifecycle, dsn)
        log.info("running %s", ", ".join(PARTS))
        lifecycle.checks.append(lambda: nc.is_connected)
        lifecycle.ready = True
        lag = asyncio.create_task(report_tailer_lag(pool))
        try:
            await run_together(jobs, lifecycle)
        finally:
            lag.cancel()
    finally:
        await nc.drain()
        await pool.close()


def tailers(
    parts: Iterable[str],
    store: EventStore,
    nc: Client,
    topology: Topology,
    settings: Settings,
    lifecycle: Lifecycle,
    dsn: str,
    *,
    wakeup: asyncio.Event | None = None,
) -> list[Coroutine[Any, Any, None]]:
    """The relay and/or the snapshotter, as ``parts`` says; ``wakeup`` is set by an appender in
    the same process (NOTIFY wakes them otherwise)."""
    jobs: list[Coroutine[Any, Any, None]] = []
    if "relay" in parts:
        relay = Relay(
            store,
            nc.jetstream(),
            topology,
            lifecycle,
            dsn,
            poll_s=settings.relay_poll_s,
            wakeup=wakeup,
            reconnects=lambda: int(nc.stats["reconnects"]),
            duplicate_window_s=settings.duplicate_window_s,
            stream_shape=StreamSettings.of(settings),
        )
        jobs.append(relay.run())
    if "snapshots" in parts:
        every = settings.snapshot_every
        jobs.append(Snapshotter(store, lifecycle, every=every, poll_s=settings.relay_poll_s).run())
    return jobs

"""Wire the writer: the PFLEA_TX consumer ("append"), the command handler ("commands"), the
relay and the snapshotter, sharing one pool and one NATS connection.

``PFLEA_WRITER_PARTS`` picks the parts a process runs; by default one process runs them all.
The relay and the snapshotter only tail the events table (woken by NOTIFY), so they can run in
a process of their own (``PFLEA_WRITER_PARTS=relay,snapshots``), which `pflea up` and compose
do: then they don't take CPU from the appends, and the relay's publishing is not slowed by them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from services.writer.commands import CommandHandler
from services.writer.consumer import TxConsumer
from services.writer.purpleflea import PurpleFleaCommands
from services.writer.relay import Relay
from services.writer.snapshots import Snapshotter
from shared.db import WRITER_ROLE, create_pool, role_dsn
from shared.jetstream import Topology, ensure_streams
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.service import require
from shared.settings import DEFAULT_FAUCET_URL, Settings
from shared.store import EventStore

log = logging.getLogger(__name__)


async def run_writer(settings: Settings, lifecycle: Lifecycle) -> None:
    dsn = role_dsn(require(settings.database_url, "DATABASE_URL"), WRITER_ROLE, settings.db_service_password)
    nats_url = require(settings.nats_url, "NATS_URL")
    topology = Topology(settings.namespace)
    pool = await create_pool(dsn, min_size=2, max_size=16)
    nc = await connect_nats(nats_url, "pflea-writer")
    purpleflea = _purpleflea(settings)
    try:
        js = nc.jetstream()
        await ensure_streams(js, topology, settings.duplicate_window_s)
        store = EventStore(pool)
        parts = settings.writer_parts
        committed = asyncio.Event()
        jobs: list[Coroutine[Any, Any, None]] = []
        if "append" in parts:
            quarantine = Quarantine(pool, "writer")
            consumer = TxConsumer(
                js, store, quarantine, topology, settings, lifecycle, dsn, on_commit=committed
            )
            jobs.append(consumer.run())
        if "relay" in parts:
            relay = Relay(
                store,
                js,
                topology,
                lifecycle,
                dsn,
                poll_s=settings.relay_poll_s,
                wakeup=committed,
                reconnects=lambda: int(nc.stats["reconnects"]),
                duplicate_window_s=settings.duplicate_window_s,
            )
            jobs.append(relay.run())
        if "commands" in parts:
            jobs.append(CommandHandler(nc, store, topology, settings, lifecycle, purpleflea).run())
        if "snapshots" in parts:
            every = settings.snapshot_every
            jobs.append(Snapshotter(store, lifecycle, every=every, poll_s=settings.relay_poll_s).run())
        log.info("running %s", ", ".join(parts))
        lifecycle.checks.append(lambda: nc.is_connected)
        lifecycle.ready = True
        tasks = [asyncio.create_task(job) for job in jobs]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                lifecycle.stop()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks)
    finally:
        await nc.drain()
        if purpleflea is not None:
            await purpleflea.close()
        await pool.close()


def _purpleflea(settings: Settings) -> PurpleFleaCommands | None:
    """The Purple Flea API for agents with a key (PURPLEFLEA_AGENTS or the simulator's); without
    any, every command is decided locally."""
    if not settings.purpleflea_agents and not settings.agents_from_simulator:
        return None
    return PurpleFleaCommands(
        settings.purpleflea_api_url,
        _faucet_url(settings),
        settings.purpleflea_agents,
        from_simulator=settings.agents_from_simulator,
        timeout_s=settings.ingest_timeout_s,
        budget_s=settings.command_timeout_s / 2,
    )


def _faucet_url(settings: Settings) -> str:
    """PURPLEFLEA_FAUCET_URL; against the simulator (unless set) its faucet base, ``<url>/faucet``."""
    if settings.agents_from_simulator and settings.purpleflea_faucet_url == DEFAULT_FAUCET_URL:
        return settings.purpleflea_api_url.rstrip("/") + "/faucet"
    return settings.purpleflea_faucet_url

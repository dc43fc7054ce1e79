"""Wire the writer: the PFLEA_TX consumer ("append") and the command handler ("commands"),
sharing one pool and one NATS connection; ``PFLEA_WRITER_PARTS`` picks the parts a process runs.

The relay and the snapshotter run in their own process, ``python -m services.relay``. For one
release the writer still runs them when ``PFLEA_WRITER_PARTS`` names them, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from services.relay.service import PARTS as RELAY_PARTS
from services.relay.service import tailers
from services.writer.commands import CommandHandler
from services.writer.consumer import TxConsumer
from services.writer.partitions import PartitionedAppends
from services.writer.purpleflea import PurpleFleaCommands
from shared.db import WRITER_ROLE, service_pool
from shared.jetstream import StreamSettings, Topology, ensure_streams
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.service import require, run_together
from shared.settings import DEFAULT_FAUCET_URL, Settings
from shared.store import EventStore

log = logging.getLogger(__name__)


async def run_writer(settings: Settings, lifecycle: Lifecycle) -> None:
    dsn = require(settings.database_url, "DATABASE_URL")
    nats_url = require(settings.nats_url, "NATS_URL")
    topology = Topology(settings.namespace)
    pool = await service_pool(dsn, WRITER_ROLE, min_size=2, max_size=16)
    nc = await connect_nats(nats_url, "pflea-writer")
    purpleflea = _purpleflea(settings)
    try:
        js = nc.jetstream()
        await ensure_streams(
            js,
            topology,
            settings.duplicate_window_s,
            StreamSettings.of(settings),
        )
        store = EventStore(pool)
        parts = settings.writer_parts
        committed = asyncio.Event()
        jobs: list[Coroutine[Any, Any, None]] = []
        if "append" in parts:
            quarantine = Quarantine(pool, "writer")
            appends = PartitionedAppends(
                js,
                topology,
                lifecycle,
                dsn,
                lambda count, part: TxConsumer(
                    js,
                    store,
                    quarantine,
                    topology,
                    settings,
                    lifecycle,
                    dsn,
                    on_commit=committed,
                    partitions=count,
                    part=part,
                ),
            )
            jobs.append(appends.run())
        if "commands" in parts:
            jobs.append(CommandHandler(nc, store, topology, settings, lifecycle, purpleflea).run())
        if moved := [p for p in parts if p in RELAY_PARTS]:
            log.warning(
                "PFLEA_WRITER_PARTS names %s, which moved to `python -m services.relay`: run that "
                "and drop them from PFLEA_WRITER_PARTS; this release still runs them here, the "
                "next one will not",
                ", ".join(moved),
            )
            jobs += tailers(moved, store, nc, topology, settings, lifecycle, dsn, wakeup=committed)
        log.info("running %s", ", ".join(parts))
        lifecycle.checks.append(lambda: nc.is_connected)
        lifecycle.ready = True
        await run_together(jobs, lifecycle)
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

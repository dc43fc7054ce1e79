"""Run one projection as a service: a durable pull consumer on PFLEA_EVENTS, ack after commit."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge, Histogram

from services.projectors.apply import apply_batch
from services.projectors.catch_up import CHECK_EVERY_S, CatchUp
from shared.consumer import PullLoop
from shared.db import TRANSIENT_DB_ERRORS
from shared.faults import crash_point, delay_s
from shared.jetstream import NATS_ERRORS, Topology, ack_all, pull_consumer_config
from shared.lag import report_projection_lag
from shared.ops import Lifecycle
from shared.projections.model import ReadModel
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.wire import BadMessage, DeliveredEvent, delivered_event

log = logging.getLogger(__name__)

RECEIVED = Counter("pflea_projector_messages_received_total", "Events fetched", ["projection"])
APPLIED = Counter("pflea_projector_events_applied_total", "Events applied to the read model", ["projection"])
SKIPPED = Counter("pflea_projector_events_skipped_total", "Events already applied", ["projection"])
BATCH_SECONDS = Histogram(
    "pflea_projector_batch_seconds",
    "Apply + commit time per batch",
    ["projection"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
LAG = Gauge("pflea_projector_lag_events", "Messages not yet applied (consumer pending)", ["projection"])


class ProjectorRunner:
    def __init__(
        self,
        model: ReadModel[Any],
        pool: asyncpg.Pool,
        js: JetStreamContext,
        topology: Topology,
        settings: Settings,
        lifecycle: Lifecycle,
    ) -> None:
        self.model = model
        self.pool = pool
        self.js = js
        self.topology = topology
        self.settings = settings
        self.lifecycle = lifecycle
        self.quarantine = Quarantine(pool, f"projector:{model.name}")
        config = pull_consumer_config(
            topology.projector_durable(model.name),
            topology.events_filter,
            ack_wait_s=settings.ack_wait_s,
            max_deliver=-1,  # an event is never given up on: poison is quarantined by the runner
            max_ack_pending=max(4 * settings.projector_batch_size, 1000),
        )
        self.loop = PullLoop(
            js, topology.events_stream, config, lifecycle, batch=settings.projector_batch_size
        )
        self.catch_up = CatchUp(model, pool, js, topology.events_stream, self.quarantine)

    async def run(self) -> None:
        lag = asyncio.create_task(self._report_lag())
        lag_seconds = asyncio.create_task(report_projection_lag(self.pool, self.model.name))
        catch_up = asyncio.create_task(self._catch_up())
        try:
            await self.loop.run(self.handle)
        finally:
            lag.cancel()
            lag_seconds.cancel()
            catch_up.cancel()

    async def handle(self, msgs: list[Msg]) -> None:
        name = self.model.name
        RECEIVED.labels(name).inc(len(msgs))
        delivered: list[DeliveredEvent] = []
        for msg in msgs:
            try:
                delivered.append(delivered_event(msg.data, msg.headers))
            except BadMessage as exc:
                await self.quarantine.put(msg.data, f"projector {name}: {exc}", subject=msg.subject)
                await msg.term()
        if delivered and not await self._apply_until_committed(delivered):
            return  # stopping while Postgres is away: unacked, so redelivered later
        crash_point("projector.after_commit")
        await ack_all(msgs)

    async def _apply_until_committed(self, delivered: list[DeliveredEvent]) -> bool:
        name = self.model.name
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    applied = await apply_batch(conn, self.model, delivered, self.quarantine)
                    if slow := delay_s("projector.apply"):  # a slow database, for the chaos tests
                        await asyncio.sleep(slow)
                    crash_point("projector.before_commit")
            except TRANSIENT_DB_ERRORS as exc:
                attempt += 1
                log.warning("apply failed (%r); retry %d", exc, attempt, extra={"projection": name})
                if await self.lifecycle.sleep(min(0.1 * 2**attempt, 5.0)):
                    return False
                continue
            BATCH_SECONDS.labels(name).observe(time.perf_counter() - started)
            APPLIED.labels(name).inc(applied)
            SKIPPED.labels(name).inc(max(len(delivered) - applied, 0))
            return True

    async def _catch_up(self) -> None:
        """At start and then periodically: apply from Postgres what PFLEA_EVENTS dropped before
        delivering it (see :mod:`.catch_up`)."""
        while True:
            try:
                await self.catch_up.check()
            except (*NATS_ERRORS, *TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
                log.warning(
                    "catch-up check failed (%r); trying again", exc, extra={"projection": self.model.name}
                )
            await asyncio.sleep(CHECK_EVERY_S)

    async def _report_lag(self) -> None:
        while True:
            pending = await self.loop.pending()
            if pending is not None:
                LAG.labels(self.model.name).set(pending)
            await asyncio.sleep(5)

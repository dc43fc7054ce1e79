"""NATS is the transport, Postgres the record: a nats-server that comes back with nothing
(its JetStream store gone) costs re-polling and republishing, never a transaction."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack.embedded import EmbeddedNats
from devstack.processes import ServiceProcess, wait_until
from services.simulator import Simulator, load_simulator_config, running_simulator
from shared.settings import Settings
from tests.reference import assert_read_models_match_fold
from tests.support import service_env, simulator_feeds
from tests.test_ingest_pipeline import accounted, assert_exactly_once
from tests.test_projector_services import caught_up


def pipeline(
    settings: Settings, nats_url: str, sim: Simulator, url: str, tmp_path: Path, *, page_limit: int
) -> list[ServiceProcess]:
    """Ingester, writer, relay and the balance projector on ``nats_url``, fed by ``sim`` at ``url``."""
    env = service_env(
        settings,
        NATS_URL=nats_url,
        PURPLEFLEA_API_URL=url,
        PURPLEFLEA_AGENTS=",".join(f"{c.agent_id}:{c.api_key}" for c in sim.credentials),
        PURPLEFLEA_FEEDS=simulator_feeds(url),
        PFLEA_INGEST_PAGE_LIMIT=str(page_limit),
        PFLEA_INGEST_POLL_INTERVAL_S="0.2",
    )
    return [
        ServiceProcess("services.ingester", env, tmp_path),
        ServiceProcess("services.writer", env, tmp_path),
        ServiceProcess("services.relay", env, tmp_path),
        ServiceProcess("services.projectors", env, tmp_path, "balance"),
    ]


async def assert_ledger_exact(settings: Settings, sim: Simulator) -> None:
    """Every transaction of ``sim`` exactly once, and the balance read model equal to a fold."""
    await assert_exactly_once(settings.database_url, sim)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await assert_read_models_match_fold(conn, ["balances"])
    finally:
        await conn.close()


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    base = Path(tempfile.mkdtemp(prefix="pflea-nats-loss-"))
    server = EmbeddedNats(base / "nats", durable=False)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


async def test_a_nats_server_that_loses_its_store_loses_no_transaction(
    settings: Settings, own_nats: EmbeddedNats, tmp_path: Path
) -> None:
    sim = Simulator(load_simulator_config({}, port=0, seed=5, agents=10, backlog=300, rate=0))
    async with running_simulator(sim.config, sim) as url:
        procs = pipeline(settings, own_nats.url, sim, url, tmp_path, page_limit=20)
        try:
            for proc in procs:
                proc.start()
            total = len(sim.truth())

            async def progress(at_least: int) -> bool:
                return (await accounted(settings.database_url, sim))[0] >= at_least

            await wait_until(lambda: progress(total // 3), 60, "a third ingested")
            own_nats.stop(sig=9)
            shutil.rmtree(own_nats.data_dir / "jetstream")  # every stream, message and consumer
            own_nats.start()
            await wait_until(lambda: progress(total), 90, "every transaction after the loss", 0.3)
            await wait_until(
                lambda: caught_up(settings.database_url, "balance"), 60, "balance caught up", 0.3
            )
            for proc in procs:
                assert proc.terminate() == 0, proc.log_tail()
        finally:
            for proc in procs:
                proc.kill()
    await assert_ledger_exact(settings, sim)

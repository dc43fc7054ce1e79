"""Pytest plumbing for the chaos modules: their own servers, one run per scenario and seed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack.servers import new_root, running
from services.simulator import FaultKnobs, Simulator, load_simulator_config, running_simulator
from tests.chaos.harness import ChaosRun
from tests.chaos.schedule import Schedule
from tests.chaos.servers import ChaosServers


@pytest.fixture(scope="module", name="chaos_servers")
async def chaos_servers_fixture(request: pytest.FixtureRequest) -> AsyncIterator[ChaosServers]:
    """A Postgres and a nats-server this module may kill, pause and restart at will.

    A module that never kills nats-server may set ``CHAOS_DURABLE_NATS = False`` for speed.
    """
    durable_nats = getattr(request.module, "CHAOS_DURABLE_NATS", True)
    async with running(ChaosServers(new_root("chaos"), durable_nats=durable_nats)) as servers:
        yield servers


# The checker compares the store with every transaction the simulator made (its truth), so a
# scenario's simulator keeps them all, not the service's bounded window (PFLEA_SIM_HISTORY).
TRUTH_KEPT = 1_000_000


def simulator(
    seed: int, *, agents: int = 6, backlog: int = 40, rate: float = 30.0, malformed_rate: float = 0.05
) -> Simulator:
    """A seeded Purple Flea with a backlog, live load (``rate`` transactions/s overall) and a
    few malformed items, so quarantine writes happen under every fault too."""
    faults = FaultKnobs(malformed_rate=malformed_rate)
    config = load_simulator_config(
        {},
        port=0,
        seed=seed,
        agents=agents,
        backlog=backlog,
        rate=rate,
        faults=faults,
        history=TRUTH_KEPT,
    )
    return Simulator(config)


@contextlib.asynccontextmanager
async def chaos_run(
    servers: ChaosServers,
    schedule: Schedule,
    log_dir: Path,
    *,
    sim: Simulator | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ChaosRun]:
    servers.ensure_up()  # whatever an earlier, failed scenario left behind
    database_url = await servers.new_database()
    try:
        async with contextlib.AsyncExitStack() as stack:
            sim_url = None
            if sim is not None:
                sim_url = await stack.enter_async_context(running_simulator(sim.config, sim))
            run = ChaosRun(servers, schedule, database_url, log_dir, sim, sim_url, env or {})
            try:
                yield run
            except BaseException:
                print(f"chaos run failed; logs in {log_dir}\n{schedule}")
                raise
            finally:
                await run.close()
    finally:
        servers.ensure_up()
        await servers.drop_database(database_url)

"""Chaos: our own processes die at the worst moments, under load; nothing is lost or doubled.

Each test runs the whole pipeline (simulator → ingester → writer/relay → four projectors) as
real processes on servers this module owns, injects its seeded faults, stops them, waits for
the system to catch up and runs the one invariant checker (tests/chaos/checker.py).
Seeds: ``PFLEA_CHAOS_SEEDS`` (default 1,2,3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import JetStreamContext

from shared.jetstream import Topology
from shared.wire import decode_tx_message
from tests.chaos import scenarios
from tests.chaos.fixtures import chaos_run, chaos_servers_fixture, simulator  # noqa: F401 - fixture
from tests.chaos.harness import PIPELINE
from tests.chaos.schedule import chaos_seeds
from tests.chaos.servers import ChaosServers
from tests.support import stream_messages

pytestmark = [pytest.mark.chaos, pytest.mark.parametrize("seed", chaos_seeds())]


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid.split("[")[0]


async def test_writer_sigkilled_at_random_points_under_load_loses_and_doubles_nothing(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.writer_sigkills(seed, _test_id(request))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()


async def test_writer_killed_after_commit_before_ack_or_relay_loses_and_doubles_nothing(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.writer_crash_points(seed, _test_id(request))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()


async def test_projector_killed_before_or_after_commit_applies_everything_once(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.projector_crash_points(seed, _test_id(request))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()


async def test_ingester_republishing_after_the_dedup_window_is_stopped_by_the_database(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    window_s = 2.0  # JetStream's minimum is 100 ms; 2 s passes quickly and is never flaky
    schedule = scenarios.ingester_outlives_dedup_window(seed, _test_id(request), window_s)
    env = {"PFLEA_DUPLICATE_WINDOW_S": str(window_s)}
    sim = simulator(seed, rate=0)  # the backlog only: every page is published before any commit
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=sim, env=env) as run:
        await run.start_services(tuple(n for n in PIPELINE if n.startswith("projector-") or n == "relay"))
        await run.play()
        verdict = await run.finish()
        js = await run.js()
        published = await _transactions_in(js, run.topology)
    good = sum(tx.malformed is None for tx in sim.truth())
    assert verdict.ok, verdict.explain()
    # The scenario proves what it claims only if JetStream really let the repeats through.
    assert published > good, (
        f"PFLEA_TX holds {published} transactions for {good} in the feed: no repeat got past"
    )


async def _transactions_in(js: JetStreamContext, topology: Topology) -> int:
    """Transactions in PFLEA_TX (a message holds a batch of them)."""
    msgs = await stream_messages(js, topology.tx_stream, topology.tx_filter)
    return sum(len(decode_tx_message(m.data)) for m in msgs)

"""Chaos on the whole pipeline: processes die at the worst moments, the servers under them die,
restart and hang, the source misbehaves and wall clocks jump; nothing is lost or doubled.

Each scenario (the table in tests/chaos/scenarios.py) runs the whole pipeline (simulator →
ingester → writer/relay → four projectors) as real processes on servers this module owns, so it
may SIGKILL, stop with ``-m immediate`` or SIGSTOP them. It plays its seeded faults, stops them,
waits for the system to catch up by itself and runs the one invariant checker
(tests/chaos/checker.py), then what the scenario must show besides.
Seeds: ``PFLEA_CHAOS_SEEDS`` (default 1,2,3).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingester.pages import split_page
from shared.transactions import Rejected, parse_transaction
from tests.chaos.fixtures import chaos_run, chaos_servers_fixture  # noqa: F401 - fixture
from tests.chaos.poison import poison_item
from tests.chaos.scenarios import SCENARIOS, Scenario
from tests.chaos.schedule import chaos_seeds
from tests.chaos.servers import ChaosServers

pytestmark = pytest.mark.chaos


@pytest.mark.parametrize("seed", chaos_seeds())
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
async def test_the_pipeline_loses_and_doubles_nothing_under(
    chaos_servers: ChaosServers, scenario: Scenario, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sim = scenario.simulator(seed)
    schedule = scenario.schedule(seed, request.node.nodeid, sim)
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=sim, env=scenario.env) as run:
        scenario.prepare(run)
        await run.start_services(scenario.services)
        await run.play()
        verdict = await run.finish(measure=lambda: scenario.measure(run))
        assert verdict.ok, f"not so: {scenario.claim}\n{verdict.explain()}"
        await scenario.expect(run, verdict)


def test_a_page_with_an_item_nested_10k_deep_is_split_not_dropped() -> None:
    """Found by the poison scenario: msgspec raises RecursionError, not DecodeError, on such a
    page; it escaped split_page and ended that agent's poller for good."""
    good = poison_item("nan_token", "t1", "2026-01-01T00:00:00Z").replace(b"NaN", b'"1.00"')
    deep = poison_item("deep_nesting", "t2", "2026-01-01T00:00:00Z")
    items = split_page(
        b'{"transactions":[' + good + b"," + deep + b"," + good.replace(b"t1", b"t3") + b"]}"
    ).items
    assert [parse_transaction(items[i], "a", "pf").tx_id for i in (0, 2)] == ["t1", "t3"]
    with pytest.raises(Rejected, match="nested"):
        parse_transaction(items[1], "a", "pf")

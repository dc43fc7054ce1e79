"""Chaos from outside: a misbehaving source, poison in the feed, and wall clocks that jump.

Seeds: ``PFLEA_CHAOS_SEEDS`` (default 1,2,3). Each run ends with the one invariant checker.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from services.ingester.pages import split_page
from services.simulator import MALFORMED_KINDS
from shared.transactions import Rejected, parse_transaction
from tests.chaos import scenarios
from tests.chaos.fixtures import chaos_run, chaos_servers_fixture, simulator  # noqa: F401 - fixture
from tests.chaos.poison import KINDS as POISON_KINDS
from tests.chaos.poison import poison_item
from tests.chaos.schedule import chaos_seeds, rng_for
from tests.chaos.servers import ChaosServers

pytestmark = pytest.mark.chaos
seeds = pytest.mark.parametrize("seed", chaos_seeds())


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid.split("[")[0]


@seeds
async def test_repeated_pages_429_storms_5xx_and_hangs_lose_and_double_nothing(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.source_storms(seed, _test_id(request))
    env = {"PFLEA_INGEST_TIMEOUT_S": "0.5"}  # a hang is a timeout, well before hang_s
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed), env=env) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
        stats = run.sim.stats if run.sim else None
    assert verdict.ok, verdict.explain()
    assert stats is not None and stats.too_many_requests and stats.server_errors and stats.hangs
    assert stats.repeated_pages, "the schedule must have served repeated pages"


@seeds
async def test_every_poison_kind_is_quarantined_and_none_stalls_the_pipeline(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sim = simulator(seed, backlog=50, malformed_rate=0.4)  # >= 17 malformed per agent: every kind
    schedule = scenarios.poison_feed(seed, _test_id(request), list(sim.feeds))
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=sim) as run:
        await run.start_services()
        await run.play()
        verdict = await run.finish()
    assert verdict.ok, verdict.explain()
    seen = {tx.malformed for tx in sim.truth() if tx.malformed}
    assert seen >= {*MALFORMED_KINDS, *POISON_KINDS}, f"kinds never served: {set(MALFORMED_KINDS) - seen}"


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


@seeds
async def test_wall_clocks_jumping_an_hour_neither_reorder_nor_drop_anything(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    skewed = [
        "ingester",
        "writer",
        f"projector-{rng_for('clock-skew-victim', seed).choice(['balance', 'pnl'])}",
        "relay",
    ]
    schedule = scenarios.clock_jumps(seed, _test_id(request), skewed)
    async with chaos_run(chaos_servers, schedule, tmp_path, sim=simulator(seed)) as run:
        clocks = [run.skew_clock(name) for name in skewed]
        run.notes["clock"] = clocks[0].mechanism.split(" ")[0]
        await run.start_services()
        await run.play()
        verdict = await run.finish()
        spans = {name: _log_time_span_h(run.proc(name).log_path) for name in skewed}
    assert verdict.ok, verdict.explain()
    assert verdict.findings.reordered == 0, f"events out of source order: {verdict.findings.reorder_samples}"
    # The skew really happened: each skewed service's own log stamps its start and stop an hour apart.
    assert all(span >= 0.9 for span in spans.values()), f"log time spans (hours): {spans}"


def _log_time_span_h(log: Path) -> float:
    stamps = [
        datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00"))
        for line in log.read_text().splitlines()
        if line.startswith('{"ts"')
    ]
    return (max(stamps) - min(stamps)).total_seconds() / 3600 if stamps else 0.0

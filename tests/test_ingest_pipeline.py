"""Simulator → ingester → PFLEA_TX → writer → Postgres, with the simulator as ground truth.

Every source transaction must end up exactly once in ``events`` or in ``quarantine``: through
SIGKILLs of the writer and of the ingester, repeated pages, 429s, 5xx and malformed items.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.ingester.client import CursorRejected
from services.ingester.poller import AgentPoller, fair_interval
from services.simulator import FaultKnobs, Simulator, load_simulator_config, running_simulator
from shared.settings import Settings
from tests.support import service_env, simulator_feeds


async def accounted(url: str, sim: Simulator) -> tuple[int, int]:
    """(#truth items found exactly once in events or quarantine, #truth items)."""
    truth = sim.truth()
    conn = await asyncpg.connect(url)
    try:
        stored = Counter(r[0] for r in await conn.fetch("SELECT data->>'tx_id' FROM events"))
        quarantined = {bytes(r[0]) for r in await conn.fetch("SELECT raw FROM quarantine")}
    finally:
        await conn.close()
    found = 0
    for tx in truth:
        if tx.malformed is None:
            found += stored.get(tx.id, 0) == 1
        else:
            found += tx.raw in quarantined
    return found, len(truth)


async def assert_exactly_once(url: str, sim: Simulator) -> None:
    truth = sim.truth()
    conn = await asyncpg.connect(url)
    try:
        stored = Counter(r[0] for r in await conn.fetch("SELECT data->>'tx_id' FROM events"))
        quarantined = [bytes(r[0]) for r in await conn.fetch("SELECT raw FROM quarantine")]
        gaps = await conn.fetchval(
            "SELECT count(*) FROM (SELECT max(version) m, count(*) n FROM events GROUP BY stream_id) s "
            "WHERE m <> n"
        )
    finally:
        await conn.close()
    good = {tx.id for tx in truth if tx.malformed is None}
    bad = [tx for tx in truth if tx.malformed is not None]
    missing = good - set(stored)
    doubled = {k: n for k, n in stored.items() if n > 1}
    extra = set(stored) - good
    assert not missing, f"{len(missing)} transactions never became events"
    assert not doubled, f"{len(doubled)} transactions were stored twice"
    assert not extra, f"{len(extra)} events have no source transaction"
    assert gaps == 0
    assert all(tx.raw in quarantined for tx in bad), "a malformed transaction was neither stored nor kept"
    assert len(quarantined) == len(set(quarantined)), "a quarantined item was copied twice"


@pytest.fixture
async def simulator() -> Simulator:
    config = load_simulator_config(
        {},
        port=0,
        seed=7,
        agents=12,
        backlog=400,
        rate=0,
        faults=FaultKnobs(
            repeat_page_rate=0.2,
            too_many_requests_rate=0.05,
            retry_after=0,
            server_error_rate=0.05,
            malformed_rate=0.05,
        ),
    )
    return Simulator(config)


def _services(
    settings: Settings, sim: Simulator, url: str, tmp_path: Path
) -> tuple[ServiceProcess, ServiceProcess]:
    agents = ",".join(f"{c.agent_id}:{c.api_key}" for c in sim.credentials)
    env = service_env(
        settings,
        PURPLEFLEA_API_URL=url,
        PURPLEFLEA_AGENTS=agents,
        PURPLEFLEA_FEEDS=simulator_feeds(url),
        PFLEA_INGEST_PAGE_LIMIT="25",
        PFLEA_INGEST_POLL_INTERVAL_S="0.1",
        PFLEA_WRITER_BATCH_SIZE="100",
    )
    return (
        ServiceProcess("services.ingester", env, tmp_path),
        ServiceProcess("services.writer", env, tmp_path),
    )


async def test_every_transaction_lands_once_through_crashes_and_faults(
    settings: Settings, js_streams: nats.NATS, simulator: Simulator, tmp_path: Path
) -> None:
    config = simulator.config
    async with running_simulator(config, simulator) as url:
        ingester, writer = _services(settings, simulator, url, tmp_path)
        try:
            ingester.start()
            writer.start()
            total = len(simulator.truth())
            db = settings.database_url

            async def progress(at_least: int) -> bool:
                found, _ = await accounted(db, simulator)
                return found >= at_least

            await wait_until(lambda: progress(total // 4), 60, "a quarter ingested")
            writer.kill()  # mid-batch, as likely as not
            writer.start()
            await wait_until(lambda: progress(total // 2), 60, "half ingested")
            ingester.kill()
            ingester.start()
            simulator.set_faults(FaultKnobs())  # faults off: the system must now converge
            await wait_until(lambda: progress(total), 90, "every transaction accounted for", interval=0.3)
            await ingester.wait_ready()
            await writer.wait_ready()
            assert ingester.terminate() == 0, ingester.log_tail()
            assert writer.terminate() == 0, writer.log_tail()
        finally:
            ingester.kill()
            writer.kill()
    await assert_exactly_once(settings.database_url, simulator)


async def test_a_bad_key_for_one_agent_does_not_stop_the_others(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    sim = Simulator(load_simulator_config({}, port=0, seed=3, agents=3, backlog=20, rate=0))
    creds = list(sim.credentials)
    async with running_simulator(sim.config, sim) as url:
        agents = ",".join(f"{c.agent_id}:{'wrong-key' if i == 0 else c.api_key}" for i, c in enumerate(creds))
        env = service_env(
            settings, PURPLEFLEA_API_URL=url, PURPLEFLEA_AGENTS=agents, PURPLEFLEA_FEEDS=simulator_feeds(url)
        )
        ingester = ServiceProcess("services.ingester", env, tmp_path).start()
        writer = ServiceProcess("services.writer", env, tmp_path).start()
        try:
            conn = await asyncpg.connect(settings.database_url)
            try:

                async def others_done() -> bool:
                    n = await conn.fetchval(
                        "SELECT count(*) FROM events WHERE stream_id = ANY($1)",
                        [c.agent_id for c in creds[1:]],
                    )
                    return n == 40

                await wait_until(others_done, 60, "the other agents' transactions")
                assert (
                    await conn.fetchval("SELECT count(*) FROM events WHERE stream_id = $1", creds[0].agent_id)
                    == 0
                )
            finally:
                await conn.close()
            log = ingester.log_path.read_text()
            assert "refused" in log and creds[0].agent_id in log
            assert "wrong-key" not in log and creds[1].api_key not in log, "an API key was logged"
        finally:
            ingester.kill()
            writer.kill()


def test_an_idle_agent_is_polled_less_and_less_often_and_at_once_again_when_busy() -> None:
    settings = Settings(ingest_poll_interval_s=1.0, ingest_idle_poll_max_s=5.0)
    poller = SimpleNamespace(settings=settings, idle_polls=0, rate=1.0)
    idle = [AgentPoller._next_interval(poller, 0) for _ in range(6)]  # type: ignore[arg-type]
    for got, want in zip(idle, [1, 2, 4, 5, 5, 5], strict=True):
        assert want * 0.9 <= got <= want * 1.1
    assert AgentPoller._next_interval(poller, 3) == 1.0  # type: ignore[arg-type]


def test_the_poll_interval_follows_the_square_root_of_a_feeds_rate_between_its_bounds() -> None:
    assert fair_interval(5.0, 1.0, 5.0) == fair_interval(1.0, 1.0, 5.0) == 1.0  # an item a poll or more
    assert fair_interval(0.25, 1.0, 5.0) == pytest.approx(2.0)  # a quarter the rate: half as often
    assert fair_interval(0.25, 0.5, 5.0) == pytest.approx(0.5 / math.sqrt(0.125))
    assert fair_interval(0.01, 1.0, 5.0) == fair_interval(0.0, 1.0, 5.0) == 5.0
    rates = [2.0, 1.0, 0.5, 0.1, 0.05, 0.02, 0.0]
    intervals = [fair_interval(r, 1.0, 5.0) for r in rates]
    assert intervals == sorted(intervals), "a quieter feed is never polled more often"


def test_a_feeds_rate_is_what_its_polls_bring_over_the_last_minute() -> None:
    settings = Settings(ingest_poll_interval_s=1.0, ingest_idle_poll_max_s=8.0)
    busy = SimpleNamespace(settings=settings, idle_polls=0, rate=1.0, polled_at=None)
    t = 0.0
    for _ in range(60):  # ten minutes of 20 items every 10 s
        AgentPoller._count(busy, 20, t)  # type: ignore[arg-type]
        t += 10.0
    assert busy.rate == pytest.approx(2.0, rel=0.01)
    assert AgentPoller._next_interval(busy, 20) == 1.0  # type: ignore[arg-type]
    for _ in range(60):  # then ten minutes of one item every 10 s
        AgentPoller._count(busy, 1, t)  # type: ignore[arg-type]
        t += 10.0
    assert busy.rate == pytest.approx(0.1, rel=0.01)
    assert AgentPoller._next_interval(busy, 1) == pytest.approx(1 / math.sqrt(0.1), rel=0.01)  # type: ignore[arg-type]


def test_a_feed_that_pruned_the_cursor_is_polled_as_a_busy_one_until_quiet_again() -> None:
    settings = Settings(ingest_poll_interval_s=1.0, ingest_idle_poll_max_s=8.0)
    quiet = SimpleNamespace(
        settings=settings,
        idle_polls=4,
        rate=0.02,
        polled_at=0.0,
        since="tx-9",
        recent=set(),
        resets_in_a_row=0,
        agent=SimpleNamespace(agent_id="agent-q"),
    )
    assert AgentPoller._next_interval(quiet, 0) == pytest.approx(8.0, rel=0.1)  # type: ignore[arg-type]
    quiet.idle_polls = 4
    refused = CursorRejected("tx-9", 400, b'{"error":"unknown_since"}')
    assert AgentPoller._read_again_from_the_start(quiet, refused) == 0.0  # type: ignore[arg-type]
    assert quiet.since is None and quiet.idle_polls == 0
    assert AgentPoller._next_interval(quiet, 1) == 1.0  # type: ignore[arg-type]
    t = 0.0
    for _ in range(30):  # then five minutes of an item every 10 s: back to a quiet feed's pace
        t += 10.0
        AgentPoller._count(quiet, 1, t)  # type: ignore[arg-type]
    assert AgentPoller._next_interval(quiet, 1) == pytest.approx(1 / math.sqrt(0.1), rel=0.05)  # type: ignore[arg-type]


async def test_an_ingester_whose_cursor_fell_out_of_the_window_stores_what_is_kept_exactly_once(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    sim = Simulator(load_simulator_config({}, port=0, seed=19, agents=3, backlog=40, rate=0, history=60))
    first = {tx.id for tx in sim.truth()}
    async with running_simulator(sim.config, sim) as url:
        ingester, writer = _services(settings, sim, url, tmp_path)
        conn = await asyncpg.connect(settings.database_url)
        try:

            async def stored() -> Counter[str]:
                return Counter(r[0] for r in await conn.fetch("SELECT data->>'tx_id' FROM events"))

            async def holds(ids: set[str | None]) -> bool:
                return ids <= set(await stored())

            ingester.start()
            writer.start()
            await wait_until(lambda: holds(first), 60, "the backlog stored")
            assert ingester.terminate() == 0, ingester.log_tail()
            for agent_id in sim.feeds:  # while it is down, each agent's casino cursor drops out
                feed = sim.feed(agent_id)
                for _ in range(100):
                    feed.generate(0.0, sim.config.numeric_amount_rate)
            kept = {tx.id for tx in sim.truth()}
            assert len(first - kept) > 60, "most of what was stored is no longer served"
            ingester.start()
            await wait_until(lambda: holds(kept), 60, "every transaction still kept stored")
            log = ingester.log_path.read_text()
            assert "no longer knows this cursor" in log, "the test must make the cursor fall out"
            counts = await stored()
            assert not {k: n for k, n in counts.items() if n > 1}, "a transaction was stored twice"
            assert ingester.terminate() == 0 and writer.terminate() == 0
        finally:
            await conn.close()
            ingester.kill()
            writer.kill()

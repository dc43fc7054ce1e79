"""A full PFLEA_TX: the ingester is refused, backs off and waits; once the writer runs, every
transaction is stored exactly once and in feed order. Real simulator, ingester, writer, NATS,
Postgres; PFLEA_TX limited to a handful of messages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import asyncpg
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.ingester.backpressure import MAX_WAIT_S, Backpressure, no_room, wait_s
from services.simulator import FaultKnobs, Simulator, load_simulator_config, running_simulator
from shared.jetstream import StreamSettings, Topology, declare_streams
from shared.settings import Settings
from tests.support import service_env, simulator_feeds
from tests.test_ingest_pipeline import accounted, assert_exactly_once

HELD = 4  # PFLEA_TX_MAX_MSGS
REFUSED = "pflea_ingester_publish_refused_total{reason=maximum messages exceeded}"


def test_only_a_want_of_room_is_a_refusal_to_wait_out() -> None:
    full = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10077, description="maximum bytes exceeded"
    )
    too_big = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10077, description="message size exceeds maximum allowed"
    )
    disk = nats.js.errors.ServiceUnavailableError(
        code=503, err_code=10023, description="insufficient resources"
    )
    assert no_room(full) == "maximum bytes exceeded"
    assert no_room(disk) == "insufficient resources"
    assert no_room(too_big) is None and no_room(TimeoutError()) is None
    waits = [wait_s(n) for n in range(1, 40)]
    assert all(0 < w <= MAX_WAIT_S for w in waits) and max(waits) > MAX_WAIT_S / 2


def test_an_incident_is_logged_once_when_it_starts_and_once_when_every_poller_got_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    incident, a, b = Backpressure(), object(), object()
    with caplog.at_level(logging.WARNING, logger="services.ingester.backpressure"):
        for _ in range(5):
            incident.refused(a, "maximum messages exceeded", "PFLEA_TX")
            incident.refused(b, "maximum bytes exceeded", "PFLEA_TX")
        incident.accepted(a, "PFLEA_TX")
        assert [r.getMessage() for r in caplog.records] == [
            "PFLEA_TX has no room (maximum messages exceeded): pollers hold their pages and retry with "
            "back-off up to 10.0s; the writer is behind or stopped (logged once per incident; "
            "pflea_ingester_publish_refused_total counts)"
        ]
        incident.accepted(b, "PFLEA_TX")
        incident.accepted(b, "PFLEA_TX")  # a poller that was never refused again: nothing to say
    assert len(caplog.records) == 2
    assert caplog.records[1].getMessage().startswith("PFLEA_TX takes publishes again: 10 refused in ")
    assert (incident.waiting, incident.started, incident.refusals) == (set(), None, 0)


async def _feed_order_kept(url: str, sim: Simulator) -> None:
    """Each (agent, feed)'s transactions are stored in the order the feed lists them."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            """SELECT stream_id, metadata->>'feed' AS feed, data->>'tx_id' AS tx
               FROM events ORDER BY stream_id, version"""
        )
    finally:
        await conn.close()
    stored: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        stored.setdefault((r["stream_id"], r["feed"]), []).append(r["tx"])
    for (agent, feed), txs in stored.items():
        listed = [tx.id for tx in sim.truth(agent) if tx.feed == feed and tx.malformed is None]
        assert txs == listed, f"{agent}'s {feed} feed stored out of order"


@pytest.fixture
def simulator() -> Simulator:
    config = load_simulator_config(
        {}, port=0, seed=15, agents=6, backlog=300, rate=0, faults=FaultKnobs(malformed_rate=0.02)
    )
    return Simulator(config)


async def test_a_full_tx_stream_holds_the_ingester_back_and_loses_nothing(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    js = js_streams.jetstream()
    tiny = StreamSettings(tx_max_msgs=HELD, tx_max_bytes=-1, events_max_msgs=-1, events_max_bytes=-1)
    assert await declare_streams(js, topology, settings.duplicate_window_s, tiny) == []
    async with running_simulator(simulator.config, simulator) as url:
        agents = ",".join(f"{c.agent_id}:{c.api_key}" for c in simulator.credentials)
        env = service_env(
            settings,
            PURPLEFLEA_API_URL=url,
            PURPLEFLEA_AGENTS=agents,
            PURPLEFLEA_FEEDS=simulator_feeds(url),
            PFLEA_INGEST_PAGE_LIMIT="20",
            PFLEA_INGEST_POLL_INTERVAL_S="0.1",
            PFLEA_TX_MAX_MSGS=str(HELD),
        )
        ingester = ServiceProcess("services.ingester", env, tmp_path)
        writer = ServiceProcess("services.writer", env, tmp_path)
        try:
            ingester.start()
            await ingester.wait_ready()

            async def refused(at_least: float) -> bool:
                return (await ingester.metrics()).get(REFUSED, 0) >= at_least

            # Writer stopped: the stream fills, and every poller with a page is refused, again and again.
            await wait_until(lambda: refused(30), 60, "the ingester refused for want of room", 0.3)
            assert (await js.stream_info(topology.tx_stream)).state.messages == HELD
            conn = await asyncpg.connect(settings.database_url)
            try:
                assert await conn.fetchval("SELECT count(*) FROM events") == 0, "no writer ran"
            finally:
                await conn.close()
            log = ingester.log_path.read_text()
            assert log.count("has no room (maximum messages exceeded)") == 1, "logged once per incident"
            assert "publish failed" not in log, "a refusal is waited out, not logged per retry"

            held_back = (await ingester.metrics()).get(REFUSED, 0)
            writer.start()
            started = time.monotonic()
            db = settings.database_url

            async def all_accounted() -> bool:
                found, total = await accounted(db, simulator)
                return found == total

            await wait_until(all_accounted, 120, "every transaction stored or quarantined", 0.5)
            drained_s = time.monotonic() - started
            await assert_exactly_once(db, simulator)
            await _feed_order_kept(db, simulator)
            await wait_until(
                lambda: "takes publishes again" in ingester.log_path.read_text(),
                30,
                "the incident's end logged",
            )
            assert (await ingester.metrics()).get("pflea_ingester_backpressure_pollers", -1) == 0
            ended = [
                line for line in ingester.log_path.read_text().splitlines() if "takes publishes again" in line
            ]
            print(
                f"\nbackpressure: {held_back:.0f} publishes refused before the writer started; "
                f"{len(simulator.truth())} transactions through a {HELD}-message PFLEA_TX "
                f"{drained_s:.1f} s after it started; {ended[-1]}"
            )
            assert ingester.terminate() == 0, ingester.log_tail()
            assert writer.terminate() == 0, writer.log_tail()
        finally:
            ingester.kill()
            writer.kill()

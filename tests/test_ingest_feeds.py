"""Feeds that are not quite what we assumed: missing fields, refused cursors, bodies that are no
page, and bodies without end. Real NATS, Postgres and HTTP servers; the ingester and writer run as
real processes, or a poller in this process where its counters are the point."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import nats
import pytest
from prometheus_client import REGISTRY

from devstack.ports import free_port
from devstack.processes import ServiceProcess, wait_until
from services.ingester.client import FeedClient, Transient
from services.ingester.poller import CURSOR_RESET, AgentPoller
from services.simulator import FaultKnobs, Simulator, load_simulator_config, running_simulator
from shared.db import INGESTER_ROLE, create_pool, role_dsn
from shared.events import UnknownTransaction
from shared.jetstream import Topology
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.settings import AgentCredential, Settings
from shared.store import EventStore, NewEvent
from tests.conftest import SERVICE_PASSWORD
from tests.feed_server import FeedServer, body, drip, gzip_bomb
from tests.support import service_env, simulator_feeds
from tests.test_ingest_pipeline import accounted

AGENT = AgentCredential("agent-x", "key-x")
RESET_LINE = CURSOR_RESET


def services(settings: Settings, url: str, agents: str, tmp_path: Path, **env: str) -> list[ServiceProcess]:
    environment = service_env(
        settings,
        PURPLEFLEA_API_URL=url,
        PURPLEFLEA_AGENTS=agents,
        PFLEA_INGEST_POLL_INTERVAL_S="0.1",
        PFLEA_INGEST_IDLE_POLL_MAX_S="0.2",
        **env,
    )
    return [ServiceProcess(m, environment, tmp_path) for m in ("services.ingester", "services.writer")]


async def rows(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT data->>'tx_id' AS tx_id, occurred_at, data->'extra'->>'occurred_at_source' AS source "
            "FROM events ORDER BY stream_id, version"
        )
    finally:
        await conn.close()


async def quarantined(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch("SELECT raw, reason FROM quarantine")
    finally:
        await conn.close()


async def stored_count(url: str, n: int, *running: ServiceProcess) -> bool:
    for proc in running:
        assert proc.alive, f"{proc.module} exited:\n{proc.log_tail()}"
    return len(await rows(url)) >= n


def metric(text: str, name: str) -> float:
    """A sample's value in a Prometheus text exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}/metrics")).text


def tx(tx_id: str, type_: str, amount: str, **fields: Any) -> dict[str, Any]:
    return {"id": tx_id, "type": type_, "amount": amount, **fields}


async def test_a_transaction_without_created_at_is_stored_once_as_first_seen_through_a_cursor_reset(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    feed = FeedServer(
        [
            tx("a-1", "deposit", "10", created_at="2026-01-01T00:00:00Z"),
            tx("a-2", "bet", "2.5", game="dice"),  # no created_at
            tx("a-3", "win", "5", game="dice", created_at=None, asset=None),
            tx("a-4", "fee", "0.1", reason=None, created_at="2026-01-01T00:02:00Z"),
        ]
    )
    db = settings.database_url
    async with feed.running() as url:
        ingester, writer = services(settings, url, f"{AGENT.agent_id}:{AGENT.api_key}", tmp_path)
        try:
            before = datetime.now(UTC)
            ingester.start()
            writer.start()
            await wait_until(
                lambda: stored_count(db, 4, ingester, writer), 60, "the four transactions stored"
            )
            after = datetime.now(UTC)
            first = {r["tx_id"]: r for r in await rows(db)}
            assert first["a-1"]["occurred_at"] == datetime(2026, 1, 1, tzinfo=UTC)
            assert first["a-1"]["source"] is None and first["a-4"]["source"] is None
            for tx_id in ("a-2", "a-3"):
                assert first[tx_id]["source"] == "first_seen"
                assert before <= first[tx_id]["occurred_at"] <= after

            # The feed forgets every cursor it gave (pruned, or reset) and moves on.
            await ingester.wait_ready()
            assert ingester.terminate() == 0, ingester.log_tail()
            feed.forgotten = {str(item["id"]) for item in feed.items}
            feed.items += [
                tx("a-5", "deposit", "1"),
                tx("a-6", "bet", "1", created_at="2026-02-01T00:00:00Z"),
            ]
            ingester.start()
            await wait_until(
                lambda: stored_count(db, 6, ingester, writer), 60, "the two new transactions stored"
            )
            await ingester.wait_ready()
            assert ingester.terminate() == 0, ingester.log_tail()
            assert writer.terminate() == 0, writer.log_tail()
        finally:
            ingester.kill()
            writer.kill()
    stored = await rows(db)
    assert [r["tx_id"] for r in stored] == ["a-1", "a-2", "a-3", "a-4", "a-5", "a-6"], (
        "lost, doubled or reordered"
    )
    again = {r["tx_id"]: r for r in stored}
    for tx_id in ("a-2", "a-3"):
        assert again[tx_id]["occurred_at"] == first[tx_id]["occurred_at"], "the first stored copy must win"
    assert again["a-5"]["source"] == "first_seen"
    assert await quarantined(db) == []
    assert ingester.log_path.read_text().count(RESET_LINE) == 1


async def plant_unknown_cursors(store: EventStore, agents: list[str]) -> None:
    """A newest ingested transaction per agent whose id the simulator never served."""
    for agent in agents:
        event = UnknownTransaction(tx_id=f"pruned-{agent}", source_type="test_pruned")
        await store.append(agent, "agent", [NewEvent.of(event)], None)


async def test_a_cursor_the_simulator_does_not_know_is_recovered_by_reading_again_from_the_start(
    settings: Settings, js_streams: nats.NATS, store: EventStore, tmp_path: Path
) -> None:
    faults = FaultKnobs(
        repeat_page_rate=0.2,
        too_many_requests_rate=0.05,
        retry_after=0,
        server_error_rate=0.05,
        malformed_rate=0.05,
    )
    sim = Simulator(load_simulator_config({}, port=0, seed=11, agents=4, backlog=60, rate=0, faults=faults))
    agents = [c.agent_id for c in sim.credentials]
    port = free_port()
    db = settings.database_url
    async with running_simulator(sim.config, sim) as url:
        credentials = ",".join(f"{c.agent_id}:{c.api_key}" for c in sim.credentials)
        ingester, writer = services(
            settings,
            url,
            credentials,
            tmp_path,
            PFLEA_INGEST_PAGE_LIMIT="25",
            PFLEA_DUPLICATE_WINDOW_S="1",
            PURPLEFLEA_FEEDS=simulator_feeds(url),
        )

        async def all_accounted() -> bool:
            found, total = await accounted(db, sim)
            return found == total

        try:
            ingester.start()
            writer.start()
            await wait_until(all_accounted, 90, "the backlog accounted for", interval=0.3)
            await ingester.wait_ready()
            assert ingester.terminate() == 0, ingester.log_tail()
            await plant_unknown_cursors(store, agents)
            for agent in agents:
                for _ in range(20):  # the feeds move on while the ingester is away
                    sim.feed(agent).generate(faults.malformed_rate, 0.1)
            ingester.start(PFLEA_METRICS_PORT=str(port))
            await wait_until(all_accounted, 90, "the feeds read again and accounted for", interval=0.3)
            await ingester.wait_ready()
            resets = metric(await scrape(port), "pflea_ingester_cursor_resets_total")
            assert ingester.terminate() == 0, ingester.log_tail()
            assert writer.terminate() == 0, writer.log_tail()
        finally:
            ingester.kill()
            writer.kill()
    truth = sim.truth()
    stored = Counter(r["tx_id"] for r in await rows(db))
    good = {t.id for t in truth if t.malformed is None}
    assert {k for k in good if stored[k] != 1} == set(), "a transaction was lost or doubled"
    assert set(stored) - good == {f"pruned-{agent}" for agent in agents}
    malformed = {t.raw for t in truth if t.malformed is not None}
    assert {bytes(r["raw"]) for r in await quarantined(db)} == malformed, "something else was quarantined"
    assert resets == len(agents)
    assert ingester.log_path.read_text().count(RESET_LINE) == len(agents)


async def test_bodies_that_are_no_page_are_retried_not_quarantined(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path
) -> None:
    feed = FeedServer([tx(f"b-{i}", "deposit", "1", created_at="2026-01-01T00:00:00Z") for i in range(3)])
    feed.faults = [
        body(404, b"<html>Not Found</html>"),  # the first page: no cursor to blame
        None,
        body(200, b"<html><body>Bad gateway, try again</body></html>"),
        None,
        body(200, b""),
        None,
        body(200, b'{"transactions": [{"id": "b-9", "type": "deposit"'),  # cut off
        None,
        body(200, b'{"status": "maintenance"}', "application/json"),
        None,
        body(502, b"<html>502 Bad Gateway</html>"),
    ]
    port = free_port()
    db = settings.database_url
    async with feed.running() as url:
        ingester, writer = services(settings, url, f"{AGENT.agent_id}:{AGENT.api_key}", tmp_path)
        try:
            writer.start()
            ingester.start(PFLEA_METRICS_PORT=str(port))
            await wait_until(lambda: stored_count(db, 3, ingester, writer), 60, "the page stored")

            async def faults_served() -> bool:
                return not feed.faults

            await wait_until(faults_served, 60, "every fault served")
            feed.items.append(tx("b-3", "deposit", "1", created_at="2026-01-01T00:00:00Z"))
            await wait_until(
                lambda: stored_count(db, 4, ingester, writer), 60, "a later page stored after the faults"
            )
            text = await scrape(port)
        finally:
            ingester.kill()
            writer.kill()
    assert [r["tx_id"] for r in await rows(db)] == ["b-0", "b-1", "b-2", "b-3"]
    assert await quarantined(db) == []
    errors = 'pflea_ingester_feed_errors_total{kind="%s"}'
    assert metric(text, errors % "bad_body") == 4
    assert metric(text, errors % "http_4xx") == 1
    assert metric(text, errors % "transient") == 1
    assert metric(text, "pflea_ingester_cursor_resets_total") == 0
    log = ingester.log_path.read_text()
    assert "HTTP 200 but page: not a transactions list" in log and "Bad gateway" in log
    assert "Traceback" not in log


@contextlib.asynccontextmanager
async def poller_for(feed_url: str, settings: Settings, js: nats.NATS) -> AsyncIterator[AgentPoller]:
    """An ingester poller for ``AGENT`` in this process, on the test's NATS and Postgres."""
    feed = FeedClient(feed_url, settings.ingest_timeout_s, max_page_bytes=settings.ingest_max_page_bytes)
    pool = await create_pool(role_dsn(settings.database_url, INGESTER_ROLE, SERVICE_PASSWORD), max_size=2)
    try:
        yield AgentPoller(
            AGENT,
            feed=feed,
            js=js.jetstream(),
            pool=pool,
            quarantine=Quarantine(pool, "ingester"),
            topology=Topology(settings.namespace),
            settings=settings,
            lifecycle=Lifecycle(),
            gate=asyncio.Semaphore(1),
        )
    finally:
        await feed.close()
        await pool.close()


def feed_errors(kind: str) -> float:
    return REGISTRY.get_sample_value("pflea_ingester_feed_errors_total", {"kind": kind}) or 0.0


UNBOUNDED = [
    ("gzip_bomb", gzip_bomb(64 << 20), "too_large"),
    (
        "oversized",
        body(200, b'{"transactions": [' + b" " * (2 << 20) + b"]}", "application/json"),
        "too_large",
    ),
    ("drip", drip(0.1), "deadline"),
]


@pytest.mark.parametrize(("name", "answer", "kind"), UNBOUNDED, ids=[u[0] for u in UNBOUNDED])
async def test_an_unbounded_body_is_a_clear_error_within_the_deadline(
    name: str, answer: Any, kind: str
) -> None:
    feed = FeedServer()
    feed.faults = [answer]
    async with feed.running() as url:
        client = FeedClient(url, timeout_s=1.0, max_page_bytes=1 << 20)
        try:
            with pytest.raises(Transient) as info:
                async with asyncio.timeout(10):  # the test's deadline: far above the client's
                    await client.fetch(AGENT, None, 100)
        finally:
            await client.close()
    assert info.value.kind == kind
    variable = "PFLEA_INGEST_MAX_PAGE_BYTES" if kind == "too_large" else "PFLEA_INGEST_TIMEOUT_S"
    assert variable in str(info.value), "the error must say which setting bounds it"


async def test_the_poller_outlives_unbounded_bodies_and_goes_on(
    settings: Settings, js_streams: nats.NATS, topology: Topology
) -> None:
    feed = FeedServer([tx("c-1", "deposit", "1", created_at="2026-01-01T00:00:00Z")])
    feed.faults = [answer for _, answer, _ in UNBOUNDED]
    settings = msgspec.structs.replace(settings, ingest_timeout_s=1.0, ingest_max_page_bytes=1 << 20)
    before = {kind: feed_errors(kind) for kind in ("too_large", "deadline")}
    async with feed.running() as url, poller_for(url, settings, js_streams) as poller:
        task = asyncio.create_task(poller.run())
        js = js_streams.jetstream()

        async def published() -> bool:
            return (await js.stream_info(topology.tx_stream)).state.messages > 0

        try:
            await wait_until(published, 60, "the page after the faults published")
            assert not task.done(), "the poller stopped"
        finally:
            poller.lifecycle.stop()
            await asyncio.wait_for(task, 10)
    assert not feed.faults
    assert feed_errors("too_large") - before["too_large"] == 2
    assert feed_errors("deadline") - before["deadline"] == 1
    assert await quarantined(settings.database_url) == []

"""Projectors as real processes on PFLEA_EVENTS: replicas, redeliveries and SIGKILL."""

from __future__ import annotations

import random
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.errors import NotFoundError

from devstack.processes import ServiceProcess, wait_until
from shared.atomic_batch import without_batch_headers
from shared.jetstream import Topology
from shared.settings import Settings
from shared.store import EventStore
from shared.wire import HDR_MSG_ID
from tests.reference import assert_read_models_match_fold, generate
from tests.support import service_env
from tests.test_writer_relay import relayed


async def caught_up(url: str, projection: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        behind = await conn.fetchval(
            """SELECT count(*) FROM (SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) s
               LEFT JOIN projection_checkpoints c ON c.projection = $1 AND c.stream_id = s.stream_id
               WHERE coalesce(c.version, 0) <> s.v""",
            projection,
        )
        return behind == 0
    finally:
        await conn.close()


async def consumer_drained(nc: nats.NATS, topology: Topology, projection: str) -> bool:
    try:
        info = await nc.jetstream().consumer_info(
            topology.events_stream, topology.projector_durable(projection)
        )
    except NotFoundError:
        return False  # not created yet
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture
def processes() -> list[ServiceProcess]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


async def test_three_replicas_with_redeliveries_and_shuffled_order_equal_one(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    store: EventStore,
    tmp_path: Path,
    processes: list[ServiceProcess],
) -> None:
    await store.append_batch(generate(11, agents=30, events=3000))
    env = service_env(settings, PFLEA_PROJECTOR_BATCH_SIZE="13", PFLEA_ACK_WAIT_S="2")
    processes.append(ServiceProcess("services.relay", env, tmp_path).start())
    await wait_until(lambda: _stream_count(js_streams, topology, 3000), 60, "relay published the log")
    # Every event again, shuffled, under fresh message ids: out-of-order repeats for the replicas.
    msgs = await relayed(js_streams, topology)
    random.Random(11).shuffle(msgs)
    js = js_streams.jetstream()
    for i, m in enumerate(msgs):
        headers = without_batch_headers(m.headers) | {HDR_MSG_ID: f"again-{i}"}
        await js.publish_async(m.subject, m.data, headers=headers)
    await js.publish_async_completed()
    for i in range(3):
        (tmp_path / f"replica{i}").mkdir()
        processes.append(
            ServiceProcess("services.projectors", env, tmp_path / f"replica{i}", "balance").start()
        )
    processes.append(ServiceProcess("services.projectors", env, tmp_path, "portfolio").start())
    for name in ("balance", "portfolio"):
        await wait_until(lambda n=name: consumer_drained(js_streams, topology, n), 90, f"{name} drained", 0.3)
        assert await caught_up(settings.database_url, name)
    conn = await asyncpg.connect(settings.database_url)
    try:
        await assert_read_models_match_fold(conn, ["balances", "portfolio"])
        assert await conn.fetchval("SELECT count(*) FROM quarantine") == 0
    finally:
        await conn.close()
    for proc in processes:
        await proc.wait_ready()
        assert proc.terminate() == 0, proc.log_tail()


@pytest.mark.parametrize("crash_at", ["projector.after_commit:3", "projector.before_commit:3"])
async def test_a_projector_killed_around_its_commit_never_applies_twice(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    store: EventStore,
    tmp_path: Path,
    processes: list[ServiceProcess],
    crash_at: str,
) -> None:
    await store.append_batch(generate(12, agents=10, events=800))
    env = service_env(settings, PFLEA_PROJECTOR_BATCH_SIZE="50", PFLEA_ACK_WAIT_S="2")
    processes.append(ServiceProcess("services.relay", env, tmp_path).start())
    projector = ServiceProcess("services.projectors", env, tmp_path, "pnl")
    processes.append(projector)
    projector.start(PFLEA_CRASH_AT=crash_at)
    assert await projector.wait_exit(60) == 137, projector.log_tail()
    projector.start()
    await wait_until(lambda: consumer_drained(js_streams, topology, "pnl"), 60, "pnl drained", 0.3)
    assert await caught_up(settings.database_url, "pnl")
    conn = await asyncpg.connect(settings.database_url)
    try:
        await assert_read_models_match_fold(conn, ["pnl"])
    finally:
        await conn.close()


async def _stream_count(nc: nats.NATS, topology: Topology, n: int) -> bool:
    info = await nc.jetstream().stream_info(topology.events_stream)
    return info.state.messages >= n

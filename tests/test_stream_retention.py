"""PFLEA_TX is a work queue that refuses publishes when full; an existing limits PFLEA_TX (from
before) is re-created only once its consumers have stored everything. Real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from devstack.processes import wait_until
from shared.db import OWNER_ROLE, role_dsn
from shared.jetstream import DAY, NATS_ERRORS, StreamSettings, Topology, declare_streams, pull_consumer_config
from shared.settings import Settings
from tests.conftest import SERVICE_PASSWORD
from tests.support import REPO

TINY = StreamSettings(tx_max_msgs=3, tx_max_bytes=-1, events_max_msgs=-1, events_max_bytes=-1)


@pytest.fixture
async def js(nats_url: str, topology: Topology) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        for name in (topology.tx_stream, topology.events_stream):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
        await nc.close()


async def _old_limits_tx_stream(js: JetStreamContext, topology: Topology) -> None:
    """PFLEA_TX as releases before this one declared it: limits retention, 7 days, drop oldest."""
    await js.add_stream(
        StreamConfig(
            name=topology.tx_stream,
            subjects=[topology.tx_filter],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            max_age=7 * DAY,
            storage=StorageType.FILE,
            duplicate_window=60,
        )
    )


async def _writer_sub(js: JetStreamContext, topology: Topology) -> JetStreamContext.PullSubscription:
    config = pull_consumer_config(topology.writer_durable, topology.tx_filter, ack_wait_s=30, max_deliver=-1)
    return await js.pull_subscribe(topology.tx_filter, durable=topology.writer_durable, config=config)


async def test_a_full_tx_stream_refuses_new_publishes_and_an_ack_makes_room(
    js: JetStreamContext, topology: Topology
) -> None:
    await declare_streams(js, topology, 60, TINY)
    info = await js.stream_info(topology.tx_stream)
    assert (info.config.retention, info.config.discard) == (RetentionPolicy.WORK_QUEUE, DiscardPolicy.NEW)
    assert not info.config.max_age
    for i in range(3):
        await js.publish(topology.tx_subject("agent-a"), f"tx {i}".encode())
    with pytest.raises(nats.js.errors.APIError) as refused:
        await js.publish(topology.tx_subject("agent-a"), b"tx 3")
    assert (refused.value.err_code, refused.value.description) == (10077, "maximum messages exceeded")
    sub = await _writer_sub(js, topology)
    [first] = await sub.fetch(1, timeout=5)
    await first.ack_sync()  # stored: the work queue drops it, making room for one more
    await js.publish(topology.tx_subject("agent-a"), b"tx 3")
    assert (await js.stream_info(topology.tx_stream)).state.messages == 3


async def test_the_events_stream_keeps_limits_retention_and_drops_its_oldest(
    js: JetStreamContext, topology: Topology
) -> None:
    limits = StreamSettings(tx_max_msgs=-1, tx_max_bytes=-1, events_max_msgs=2, events_max_bytes=-1)
    await declare_streams(js, topology, 60, limits)
    for i in range(5):
        await js.publish(topology.event_subject("agent-a", "BetPlaced"), f"event {i}".encode())
    state = (await js.stream_info(topology.events_stream)).state
    assert (state.messages, state.first_seq, state.last_seq) == (2, 4, 5)


async def test_a_drained_limits_tx_stream_becomes_a_work_queue_and_no_acked_publish_is_lost(
    js: JetStreamContext, topology: Topology
) -> None:
    """A publisher and a storing consumer run throughout the change: every publish the server
    acknowledged was either stored through the old stream or is in the new one."""
    await _old_limits_tx_stream(js, topology)
    acked: list[str] = []
    stored: set[str] = set()
    refused = 0
    stop = asyncio.Event()

    async def publisher() -> None:
        nonlocal refused
        i = 0
        while not stop.is_set():
            try:
                await js.publish(topology.tx_subject("agent-a"), f"tx-{i}".encode(), timeout=2)
                acked.append(f"tx-{i}")
                i += 1
            except NATS_ERRORS:
                refused += 1  # fenced, or between delete and create: retried, never skipped
            await asyncio.sleep(0.01)

    async def writer() -> None:
        sub = await _writer_sub(js, topology)
        while not stop.is_set():
            try:
                msgs = await sub.fetch(5, timeout=0.2)
            except NATS_ERRORS:
                with contextlib.suppress(*NATS_ERRORS):  # the consumer went with the old stream
                    sub = await _writer_sub(js, topology)
                continue
            for m in msgs:
                with contextlib.suppress(*NATS_ERRORS):  # an ack lost with the old stream: redelivered
                    await m.ack_sync()
                    stored.add(m.data.decode())
            await asyncio.sleep(0.1)  # slower than the publisher: the fence has a backlog to wait out

    tasks = [asyncio.create_task(publisher()), asyncio.create_task(writer())]
    await wait_until(lambda: len(stored) >= 20, 20, "the old stream in use")
    deferred = await declare_streams(js, topology, 60, StreamSettings.of(Settings()), drain_wait_s=20)
    after = len(acked)
    await wait_until(
        lambda: len(acked) >= after + 20, 20, f"publishes into the new stream ({refused} refused)"
    )
    stop.set()
    await asyncio.gather(*tasks)
    info = await js.stream_info(topology.tx_stream)
    assert deferred == []
    assert (info.config.retention, info.config.discard) == (RetentionPolicy.WORK_QUEUE, DiscardPolicy.NEW)
    assert refused > 0, "the fence never refused a publish: the change went untested"
    sub = await _writer_sub(js, topology)
    left = await sub.fetch(info.state.messages, timeout=5) if info.state.messages else []
    assert set(acked) <= stored | {m.data.decode() for m in left}


async def test_a_limits_tx_stream_holding_unstored_messages_is_kept_until_they_are_stored(
    js: JetStreamContext, topology: Topology
) -> None:
    await _old_limits_tx_stream(js, topology)
    sub = await _writer_sub(js, topology)  # the writer's consumer, which has read nothing yet
    for i in range(5):
        await js.publish(topology.tx_subject("agent-a"), f"tx-{i}".encode())

    [note] = await declare_streams(js, topology, 60, StreamSettings.of(Settings()), drain_wait_s=0.5)
    assert "holds messages not yet stored (writer: 5 pending, 0 unacknowledged)" in note
    assert "run `pflea migrate`" in note
    info = await js.stream_info(topology.tx_stream)
    assert info.state.messages == 5, "nothing unstored may be deleted"
    assert (info.config.retention, info.config.discard, info.config.max_age) == (
        RetentionPolicy.LIMITS,
        DiscardPolicy.NEW,
        0,
    ), "meanwhile it must drop nothing: no max age, a full stream refuses"
    await js.publish(topology.tx_subject("agent-a"), b"tx-5")  # and it still takes publishes

    msgs = await sub.fetch(6, timeout=5)
    assert [m.data for m in msgs] == [f"tx-{i}".encode() for i in range(6)]
    for m in msgs:
        await m.ack_sync()
    assert await declare_streams(js, topology, 60, StreamSettings.of(Settings()), drain_wait_s=5) == []
    info = await js.stream_info(topology.tx_stream)
    assert (info.config.retention, info.state.messages) == (RetentionPolicy.WORK_QUEUE, 0)


async def _pflea_migrate(settings: Settings, nats_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    environ.update(
        DATABASE_URL=role_dsn(settings.database_url, OWNER_ROLE, SERVICE_PASSWORD),
        NATS_URL=nats_url,
        PFLEA_NAMESPACE=settings.namespace,
        PFLEA_DATA_DIR=str(settings.data_dir),
        **env,
    )
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli", "migrate"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_pflea_migrate_says_what_to_do_and_converts_once_the_writer_caught_up(
    js: JetStreamContext, topology: Topology, settings: Settings, nats_url: str
) -> None:
    await _old_limits_tx_stream(js, topology)
    sub = await _writer_sub(js, topology)
    await js.publish(topology.tx_subject("agent-a"), b"tx-0")

    first = await _pflea_migrate(settings, nats_url, PFLEA_TX_MAX_MSGS="1000")
    assert first.returncode == 0, first.stderr  # the services may start: nothing is at risk
    assert "streams declared" in first.stdout
    assert "holds messages not yet stored (writer: 1 pending" in first.stderr
    assert (await js.stream_info(topology.tx_stream)).config.retention == RetentionPolicy.LIMITS

    [msg] = await sub.fetch(1, timeout=5)
    await msg.ack_sync()
    second = await _pflea_migrate(settings, nats_url, PFLEA_TX_MAX_MSGS="1000")
    assert second.returncode == 0 and "not yet stored" not in second.stderr, second.stderr
    config = (await js.stream_info(topology.tx_stream)).config
    assert (config.retention, config.max_msgs) == (RetentionPolicy.WORK_QUEUE, 1000)

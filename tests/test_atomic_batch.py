"""Atomic batch publish (shared/atomic_batch.py) against a real nats-server: a batch is stored
once, whole and in order, or not at all."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from shared.atomic_batch import (
    DUPLICATE,
    HDR_BATCH_COMMIT,
    HDR_BATCH_ID,
    MAX_BATCH,
    NOT_ENABLED,
    BatchRefused,
    publish_atomic,
)
from shared.jetstream import StreamSettings, Topology, declare_streams


def batch(topology: Topology, n: int, tag: str = "") -> list[tuple[str, bytes, dict[str, str]]]:
    return [
        (
            topology.event_subject(f"agent-{i % 7}", "FundsDeposited"),
            f"{tag}{i}".encode(),
            {"Pflea-Position": str(i)},
        )
        for i in range(1, n + 1)
    ]


async def held(nc: nats.NATS, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


async def stored(nc: nats.NATS, stream: str) -> list[Msg]:
    """Every message of ``stream``, in stream order."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    return [await js.get_msg(stream, seq) for seq in range(info.state.first_seq, info.state.last_seq + 1)]


async def test_a_batch_is_stored_once_whole_and_in_order_with_one_ack(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    ack = await publish_atomic(js, batch(topology, MAX_BATCH), timeout=30)
    assert (ack.count, ack.seq) == (MAX_BATCH, MAX_BATCH)
    msgs = await stored(js_streams, topology.events_stream)
    assert [m.data for m in msgs] == [str(i).encode() for i in range(1, MAX_BATCH + 1)]
    assert len({(m.headers or {})[HDR_BATCH_ID] for m in msgs}) == 1
    assert [m.seq for m in msgs if HDR_BATCH_COMMIT in (m.headers or {})] == [MAX_BATCH]


async def test_one_message_is_a_batch_too(js_streams: nats.NATS, topology: Topology) -> None:
    ack = await publish_atomic(js_streams.jetstream(), batch(topology, 1), timeout=10)
    assert (ack.count, ack.seq) == (1, 1)


async def test_a_batch_published_again_with_its_msg_id_is_refused_and_not_doubled(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    messages = batch(topology, 50)
    messages[0][2]["Nats-Msg-Id"] = "relay:1-50"
    await publish_atomic(js, messages, timeout=10)
    with pytest.raises(BatchRefused) as refused:
        await publish_atomic(js, messages, timeout=10)
    assert refused.value.err_code == DUPLICATE
    assert await held(js_streams, topology.events_stream) == 50


async def test_a_stream_without_atomic_batches_refuses_them_and_stores_nothing(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    name = f"PLAIN_{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE))
    try:
        messages = [(f"{name}.x", b"x", {}) for _ in range(3)]
        with pytest.raises(BatchRefused) as refused:
            await publish_atomic(js, messages, timeout=10)
        assert refused.value.err_code == NOT_ENABLED
        assert await held(js_streams, name) == 0
    finally:
        await js.delete_stream(name)


def test_a_batch_holds_at_most_what_the_server_takes() -> None:
    with pytest.raises(ValueError, match="1 to 1000"):
        asyncio.run(publish_atomic(None, [("s", b"", {})] * (MAX_BATCH + 1), timeout=1))  # type: ignore[arg-type]


PUBLISHER = """
import asyncio, sys, nats
from shared.atomic_batch import publish_atomic
async def main():
    nc = await nats.connect(sys.argv[1])
    messages = [(sys.argv[2], str(i).encode(), {}) for i in range(1, 101)]
    await publish_atomic(nc.jetstream(), messages, timeout=10)
asyncio.run(main())
"""


async def test_a_batch_whose_publisher_died_before_its_commit_is_abandoned_unstored(
    js_streams: nats.NATS, topology: Topology, nats_url: str
) -> None:
    abandoned: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def advisory(msg: Msg) -> None:
        if not abandoned.done():
            abandoned.set_result(json.loads(msg.data))

    await js_streams.subscribe(
        f"$JS.EVENT.ADVISORY.STREAM.BATCH_ABANDONED.{topology.events_stream}", cb=advisory
    )
    subject = topology.event_subject("agent-1", "FundsDeposited")
    env = dict(os.environ, PFLEA_CRASH_AT="atomic_batch.before_commit:1")
    died = subprocess.run(
        [sys.executable, "-c", PUBLISHER, nats_url, subject], env=env, capture_output=True, timeout=60
    )
    assert died.returncode == 137, died.stderr.decode()
    assert b"atomic_batch.before_commit" in died.stderr
    # The server staged it (the first message is a request it answered), then drops it.
    assert (await asyncio.wait_for(abandoned, 60))["reason"] in ("timeout", "incomplete")
    assert await held(js_streams, topology.events_stream) == 0
    ack = await publish_atomic(js_streams.jetstream(), batch(topology, 10), timeout=10)
    assert (ack.count, ack.seq) == (10, 10)


async def test_pflea_migrate_lets_an_events_stream_from_before_take_atomic_batches(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    await js.delete_stream(topology.events_stream)
    [_, events_config] = topology.stream_configs(60, StreamSettings())
    await js.add_stream(dataclasses.replace(events_config, allow_atomic=None))
    await js.publish(topology.event_subject("agent-1", "FundsDeposited"), b"before")
    assert not (await js.stream_info(topology.events_stream)).config.allow_atomic
    await declare_streams(js, topology, 60, StreamSettings())
    assert (await js.stream_info(topology.events_stream)).config.allow_atomic
    assert (await publish_atomic(js, batch(topology, 3), timeout=10)).seq == 4
    assert [m.data for m in await stored(js_streams, topology.events_stream)] == [b"before", b"1", b"2", b"3"]

"""The pull-consumer loop against a real nats-server when its consumer disappears."""

from __future__ import annotations

import asyncio
import logging

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from devstack.processes import wait_until
from shared.consumer import NoResponders, PullLoop, PullStream
from shared.jetstream import Topology, pull_consumer_config
from shared.js_adapter import api_prefix
from shared.ops import Lifecycle

NEVER_S = 3600.0  # a watchdog that cannot be what recovers within a test


async def _consumer_exists(js: nats.js.JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def test_a_consumer_deleted_under_the_loop_is_recreated_at_once_not_by_the_watchdog(
    js_streams: nats.NATS, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.consumer")
    js = js_streams.jetstream()
    durable = "deleted-under-me"
    config = pull_consumer_config(durable, topology.tx_filter, ack_wait_s=30, max_deliver=5)
    lifecycle = Lifecycle()
    handled: list[bytes] = []

    async def handle(msgs: list[Msg]) -> None:
        handled.extend(m.data for m in msgs)
        for m in msgs:
            await m.ack()

    loop = PullLoop(js, topology.tx_stream, config, lifecycle, batch=10, watchdog_s=NEVER_S)
    running = asyncio.create_task(loop.run(handle))
    try:
        await js.publish(topology.tx_subject("agent-1"), b"before")
        await wait_until(lambda: asyncio.sleep(0, b"before" in handled), 20, "the first message handled")
        first = loop.pulls

        await js.delete_consumer(topology.tx_stream, durable)
        await wait_until(
            lambda: _consumer_exists(js, topology.tx_stream, durable), 20, "the consumer re-created"
        )
        # The loop creates the consumer, then swaps in its new pull stream: wait for both.
        await wait_until(
            lambda: loop.pulls is not first,
            20,
            "the loop's own new pull stream (not someone else's re-creation)",
        )
        await js.publish(topology.tx_subject("agent-1"), b"after")
        await wait_until(lambda: asyncio.sleep(0, b"after" in handled), 20, "a message after the deletion")
    finally:
        lifecycle.stop()
        await asyncio.wait_for(running, 20)
    said = [r.getMessage() for r in caplog.records if r.name == "shared.consumer"]
    assert any("409 Consumer Deleted; re-creating the consumer" in line for line in said), said
    # The deleted consumer's subject has no responder: asking again would be refused in a busy loop.
    assert not any("503" in line for line in said), said[:5]


async def test_a_pull_stream_on_a_missing_consumer_says_so_instead_of_waiting(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    pulls = PullStream(js_streams, api_prefix(js), topology.tx_stream, "never-created", batch=10)
    await pulls.start()
    try:
        with pytest.raises(NoResponders):
            # Far longer than the refusal takes; without it take() would wait all of it, then return [].
            await pulls.take(timeout=30)
        with pytest.raises(NoResponders):
            await pulls.take(timeout=30)  # and it stays refused: no new requests go out
        assert pulls.open == 0
    finally:
        await pulls.stop()


async def test_a_batch_handled_for_longer_than_the_ack_wait_is_not_handed_out_again(
    js_streams: nats.NATS, topology: Topology
) -> None:
    """The loop tells the server the batch in hand, and the one buffered behind it, are still
    being worked on: a slow handler (a loaded machine, a writer committing one message at a
    time) sees every message once, delivered once."""
    js = js_streams.jetstream()
    durable = "slow-handler"
    config = pull_consumer_config(durable, topology.tx_filter, ack_wait_s=1, max_deliver=-1)
    lifecycle = Lifecycle()
    deliveries: list[tuple[bytes, int]] = []

    async def handle(msgs: list[Msg]) -> None:
        deliveries.extend((m.data, m.metadata.num_delivered) for m in msgs)
        await asyncio.sleep(3.5)  # three and a half ack waits
        for m in msgs:
            await m.ack()

    sent = [f"tx-{i}".encode() for i in range(6)]
    for data in sent:
        await js.publish(topology.tx_subject("agent-1"), data)
    loop = PullLoop(js, topology.tx_stream, config, lifecycle, batch=3, watchdog_s=NEVER_S)
    running = asyncio.create_task(loop.run(handle))
    try:
        await wait_until(lambda: asyncio.sleep(0, len(deliveries) >= len(sent)), 30, "every message handled")
        info = await wait_until(
            lambda: _acked_all(js, topology.tx_stream, durable), 20, "the server to see every ack"
        )
    finally:
        lifecycle.stop()
        await asyncio.wait_for(running, 20)
    assert sorted(data for data, _ in deliveries) == sorted(sent), deliveries
    assert all(n == 1 for _, n in deliveries), deliveries
    assert info.num_redelivered == 0, info


async def _acked_all(js: nats.js.JetStreamContext, stream: str, durable: str) -> ConsumerInfo | None:
    info = await js.consumer_info(stream, durable)
    return info if not info.num_ack_pending and not info.num_pending else None


async def test_a_pull_stream_of_large_messages_holds_and_hands_out_a_bounded_number_of_bytes(
    js_streams: nats.NATS, topology: Topology
) -> None:
    """Pages of 200 transactions are ~27 KB each: a batch of 1,000 of them would be 27 MB in
    hand (the writer's RSS passed 200 MB on full pages). ``max_bytes`` bounds what is buffered
    and what one take hands out, whatever ``batch`` says in messages."""
    js = js_streams.jetstream()
    durable = "large-messages"
    page = b"x" * 10_000
    for _ in range(100):
        await js.publish(topology.tx_subject("agent-1"), page)
    config = pull_consumer_config(durable, topology.tx_filter, ack_wait_s=30, max_deliver=5)
    await js.add_consumer(topology.tx_stream, config)
    pulls = PullStream(js_streams, api_prefix(js), topology.tx_stream, durable, batch=1000, max_bytes=35_000)
    await pulls.start()
    try:
        taken: list[list[Msg]] = []
        while sum(len(t) for t in taken) < 100:
            await asyncio.sleep(0.05)  # let the stream deliver all it asked for before each take
            assert pulls.buffered_bytes == sum(len(m.data) for m in pulls.buffer)
            assert pulls.buffered_bytes <= 2 * 35_000  # a full buffer, and the request that filled it
            msgs = await pulls.take(timeout=5)
            assert msgs, "the stream stalled"
            taken.append(msgs)
        assert max(len(t) for t in taken) == 3  # 3 × 10,000 bytes fit in 35,000; 4 do not
        assert all(m.data == page for t in taken for m in t)
    finally:
        await pulls.stop()


async def test_messages_carried_over_count_and_one_over_max_bytes_is_still_handed_out(
    js_streams: nats.NATS, topology: Topology
) -> None:
    """What a stream had delivered is carried into the next one (a re-subscribe); a message
    larger than ``max_bytes`` goes out alone rather than never."""
    js = js_streams.jetstream()
    durable = "carried-over"
    for _ in range(2):
        await js.publish(topology.tx_subject("agent-1"), b"y" * 5_000)
    config = pull_consumer_config(durable, topology.tx_filter, ack_wait_s=30, max_deliver=5)
    await js.add_consumer(topology.tx_stream, config)
    first = PullStream(js_streams, api_prefix(js), topology.tx_stream, durable, batch=10)
    await first.start()
    try:
        await wait_until(lambda: asyncio.sleep(0, len(first.buffer) == 2), 10, "both delivered")
    finally:
        await first.stop()
    second = PullStream(js_streams, api_prefix(js), topology.tx_stream, durable, batch=10, max_bytes=1_000)
    second.carry(list(first.buffer))  # as PullLoop.subscribe does: carry, then start
    assert second.buffered_bytes == 10_000
    await second.start()
    try:
        takes = [await second.take(timeout=1) for _ in range(2)]
    finally:
        await second.stop()
    assert [[len(m.data) for m in t] for t in takes] == [[5_000], [5_000]]
    assert second.buffered_bytes == 0

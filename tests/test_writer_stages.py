"""The writer's stages one by one, in this process (no service subprocess): source order,
attempt counting, decoding, and the append that isolates what Postgres refuses."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import msgspec
import nats
import pytest

from services.writer.append import Appender
from services.writer.attempts import AttemptLedger, isolate_after, needs_isolation
from services.writer.decode import decode_items
from services.writer.messages import Item, Tx
from services.writer.order import SourceOrder
from shared.envelope import new_event
from shared.jetstream import Topology, pull_consumer_config
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.store import EventStore, StreamEvent
from shared.transactions import parse_transaction
from shared.wire import tx_messages


def _tx(agent: str, n: int, amount: str = "1") -> Tx:
    raw = b'{"id":"%d","type":"deposit","amount":"%s","created_at":"2026-01-01T00:00:00Z"}' % (
        n,
        amount.encode(),
    )
    envelope = parse_transaction(raw, agent, "casino")
    return Tx(envelope, StreamEvent(agent, "agent", new_event(envelope, n)))


def _item(seq: int, data: bytes, delivered: int = 1) -> Item:
    return Item(seq, "t.tx.agent-a", data, None, delivered, f"key-{seq}")


# --- order ---------------------------------------------------------------------------------------


def test_the_watermark_moves_only_over_a_gapless_run() -> None:
    order = SourceOrder(None, "S", "d")  # type: ignore[arg-type]  # js is not used by these
    order.done([1, 2, 4])
    assert (order.through, order.above) == (2, {4})
    assert order.missing([6]) == [3, 5]
    order.done([3])
    assert (order.through, order.above) == (4, set())
    assert order.missing([5]) == []


async def test_messages_held_by_a_dead_writer_are_read_back_before_a_newer_batch(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    for n in range(1, 7):
        await js.publish(topology.tx_subject("agent-a"), b"m%d" % n)
    config = pull_consumer_config(topology.writer_durable, topology.tx_filter, ack_wait_s=600, max_deliver=-1)
    sub = await js.pull_subscribe(topology.tx_filter, durable=topology.writer_durable, config=config)
    msgs = await sub.fetch(4, timeout=5)  # 1..4: a writer takes them, acks 1 and 2, then dies
    for m in msgs[:2]:
        await m.ack_sync()
    order = SourceOrder(js, topology.tx_stream, topology.writer_durable, hold_s=0.1)
    older = await order.older_than([5, 6], first_deliveries=[5, 6])
    assert [m.seq for m in older] == [3, 4]
    assert [m.data for m in older] == [b"m3", b"m4"]
    order.done([3, 4, 5, 6])
    assert order.through == 6
    # Sequences going back to 1 on first delivery: the stream was re-created; start again.
    assert await order.older_than([1], first_deliveries=[1]) == []
    assert order.through == 0


# --- attempts ------------------------------------------------------------------------------------


def test_a_message_is_suspect_on_its_third_try_by_either_count() -> None:
    threshold = isolate_after(10)
    assert threshold == 3 and isolate_after(2) == 1
    fresh, redelivered = _item(1, b"", delivered=1), _item(2, b"", delivered=3)
    assert not needs_isolation([fresh], {"key-1": 1}, threshold)
    assert needs_isolation([fresh], {"key-1": 2}, threshold)  # our count: this is try 3
    assert needs_isolation([fresh, redelivered], {}, threshold)  # JetStream's count says 3


async def test_attempts_are_counted_in_postgres_before_each_try(store: EventStore) -> None:
    ledger = AttemptLedger(store.pool)
    items = [_item(1, b""), _item(2, b"")]
    assert await ledger.read(items) == {}
    await ledger.count(items)
    assert await ledger.count(items[:1]) == {"key-1": 2}
    assert await ledger.read(items) == {"key-1": 2, "key-2": 1}


# --- decode ------------------------------------------------------------------------------------


def test_a_message_that_is_no_batch_is_set_aside_and_the_others_decode_in_order() -> None:
    good = tx_messages([_tx("agent-a", 1).envelope, _tx("agent-a", 2).envelope])[0].payload
    items = [_item(1, good), _item(2, b"<html>"), _item(3, b'{"agent_id":"x"}')]
    decoded = decode_items(items, Topology("t"))
    assert [t.envelope.tx_id for t in decoded.txs] == ["1", "2"]
    assert [t.event.event.metadata["tx_seq"] for t in decoded.txs] == [1, 1]
    assert [(i.seq, reason.split(":")[0]) for i, reason in decoded.poison] == [
        (2, "envelope"),
        (3, "envelope"),
    ]


# --- append ------------------------------------------------------------------------------------


async def _quarantine(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch("SELECT agent_id, reason FROM quarantine ORDER BY id"))
    finally:
        await conn.close()


@pytest.fixture
def appender(store: EventStore) -> Appender:
    return Appender(store, Quarantine(store.pool, "writer"), Lifecycle())


async def test_a_transaction_postgres_refuses_is_quarantined_alone(
    appender: Appender, store: EventStore, database_url: str
) -> None:
    txs = [_tx("agent-a", n) for n in range(1, 9)]
    refused = _tx("agent-b", 99)
    too_long = "x" * 300  # events.stream_id is at most 200 characters
    txs[5] = Tx(refused.envelope, StreamEvent(too_long, "agent", refused.event.event))
    assert await appender.commit(txs, kept=[])
    assert [e.envelope.tx_id for e in txs if e is not txs[5]] == [
        msgspec.json.decode(e.data)["tx_id"] for e in await store.read_stream("agent-a")
    ]
    [row] = await _quarantine(database_url)
    assert row["agent_id"] == "agent-b" and row["reason"].startswith("postgres:")


async def test_an_event_id_stored_in_another_stream_is_quarantined_and_the_rest_commit(
    appender: Appender, store: EventStore, database_url: str
) -> None:
    first = _tx("agent-a", 1)
    assert await appender.commit([first], kept=[])
    twin = _tx("agent-b", 2, "5")
    forged = Tx(
        twin.envelope,
        StreamEvent(
            "agent-b", "agent", msgspec.structs.replace(twin.event.event, event_id=first.event.event.event_id)
        ),
    )
    assert await appender.commit([forged, _tx("agent-b", 3)], kept=[])
    assert [e.version for e in await store.read_stream("agent-b")] == [1]
    [row] = await _quarantine(database_url)
    assert "stored already in stream 'agent-a'" in row["reason"]
    assert Decimal(msgspec.json.decode((await store.read_stream("agent-a"))[0].data)["amount"]) == 1

"""A transaction's identity is (feed, agent, tx id): through the real writer, equal ids on other
agents or feeds are all stored, an id taken by another stream is quarantined, and a store from
before feeds (ids ``"<source>:<tx id>"``) doubles nothing when the feed is read again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from shared.envelope import TxEnvelope, legacy_event_id, new_event
from shared.jetstream import Topology
from shared.migrate import alias_legacy_event_ids
from shared.settings import Settings
from shared.store import EventStore, NewEvent, StreamEvent
from shared.transactions import parse_transaction
from shared.wire import HDR_MSG_ID, tx_messages
from tests.support import service_env


def raw_tx(tx_id: str, amount: str = "1.00", tx_type: str = "deposit") -> bytes:
    return b'{"id":"%s","type":"%s","amount":"%s","created_at":"2026-01-01T00:00:00Z"}' % (
        tx_id.encode(),
        tx_type.encode(),
        amount.encode(),
    )


async def publish(nc: nats.NATS, topology: Topology, envelopes: list[TxEnvelope]) -> None:
    js = nc.jetstream()
    for message in tx_messages(envelopes):
        await js.publish(
            topology.tx_subject(message.agent_id), message.payload, headers={HDR_MSG_ID: message.msg_id}
        )


async def rows(database_url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


@pytest.fixture
def writer(settings: Settings, tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("services.writer", service_env(settings), tmp_path)
    proc.start()
    yield proc
    proc.kill()


async def _events(url: str) -> list[asyncpg.Record]:
    return await rows(url, "SELECT stream_id, event_id, metadata->>'feed' AS feed, data FROM events")


async def test_equal_tx_ids_of_two_agents_and_of_two_feeds_are_all_stored(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    envelopes = [
        parse_transaction(raw_tx("1"), "agent-a", "casino"),
        parse_transaction(raw_tx("1"), "agent-b", "casino"),
        parse_transaction(raw_tx("1"), "agent-a", "faucet"),
        parse_transaction(raw_tx("2"), "agent-b", "wallet"),
    ]
    await publish(js_streams, topology, envelopes)
    stored = await wait_until(lambda: _at_least(settings.database_url, 4), 60, "four events")
    assert sorted((r["stream_id"], r["feed"]) for r in stored) == [
        ("agent-a", "casino"),
        ("agent-a", "faucet"),
        ("agent-b", "casino"),
        ("agent-b", "wallet"),
    ]
    assert {r["event_id"] for r in stored} == {e.event_id for e in envelopes}


async def test_an_event_id_stored_in_another_stream_is_quarantined_not_skipped(
    settings: Settings, topology: Topology, js_streams: nats.NATS, store: EventStore, writer: ServiceProcess
) -> None:
    incoming = parse_transaction(raw_tx("8", "5.00"), "agent-b", "casino")
    # Another stream already holds the id agent-b's transaction derives to (a hash collision;
    # the writer refuses a forged id before it gets this far, see test_forged_tx.py).
    squatter = parse_transaction(raw_tx("7"), "agent-a", "casino")
    event = msgspec.structs.replace(new_event(squatter, 1), event_id=incoming.event_id)
    await store.append_batch([StreamEvent("agent-a", "agent", event)])
    honest = parse_transaction(raw_tx("9"), "agent-b", "casino")
    await publish(js_streams, topology, [incoming, honest])
    await wait_until(lambda: _at_least(settings.database_url, 2), 60, "the honest event")
    quarantined = await wait_until(
        lambda: rows(settings.database_url, "SELECT agent_id, reason, raw FROM quarantine"),
        30,
        "a quarantine row",
    )
    [row] = quarantined
    assert row["agent_id"] == "agent-b"
    assert "stored already in stream 'agent-a'" in row["reason"] and str(incoming.event_id) in row["reason"]
    assert b'"tx_id":"8"' in bytes(row["raw"])
    assert len(await _events(settings.database_url)) == 2


async def test_a_store_from_before_feeds_keeps_deduplicating_after_the_upgrade(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    store: EventStore,
    database_url: str,
    writer: ServiceProcess,
) -> None:
    old = [parse_transaction(raw_tx(str(n)), "agent-a", "casino") for n in range(1, 4)]
    # As the previous release stored them: id uuid5("purpleflea:<tx id>"), metadata.source, no feed.
    await store.append_batch(
        [
            StreamEvent(
                "agent-a",
                "agent",
                NewEvent(
                    event_id=legacy_event_id("purpleflea", e.tx_id),
                    event_type=e.event_type,
                    data=bytes(e.data).decode(),
                    occurred_at=e.occurred_at,
                    metadata={"source": "purpleflea", "tx_seq": n},
                ),
            )
            for n, e in enumerate(old)
        ]
    )
    owner = await asyncpg.connect(database_url)
    try:
        await alias_legacy_event_ids(owner)  # what migration 005 runs on such a store
    finally:
        await owner.close()
    # The feed is read again from its start (a lost cursor), plus one new transaction.
    again = [*old, parse_transaction(raw_tx("4"), "agent-a", "casino")]
    await publish(js_streams, topology, again)
    await wait_until(lambda: _at_least(settings.database_url, 4), 60, "the new transaction")
    await wait_until(lambda: _writer_idle(js_streams, topology), 30, "the writer done")
    stored = await _events(settings.database_url)
    tx_ids = sorted(msgspec.json.decode(r["data"])["tx_id"] for r in stored)
    assert tx_ids == ["1", "2", "3", "4"]


async def _at_least(url: str, n: int) -> list[asyncpg.Record] | None:
    stored = await _events(url)
    return stored if len(stored) >= n else None


async def _writer_idle(nc: nats.NATS, topology: Topology) -> bool:
    info = await nc.jetstream().consumer_info(topology.tx_stream, topology.writer_durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


def test_new_event_keeps_the_feed_in_metadata() -> None:
    env = parse_transaction(raw_tx("5"), "agent-a", "wallet")
    event = new_event(env, 3)
    assert event.metadata == {"feed": "wallet", "tx_seq": 3}
    assert event.correlation_id == "wallet:5"
    assert isinstance(event.event_id, uuid.UUID)

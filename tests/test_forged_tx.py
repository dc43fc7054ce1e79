"""A compromised ingester's forgeries, published on PFLEA_TX as the ingester publishes and met
by the real writer: each is quarantined with its reason and raw bytes, the good transactions
around it are stored exactly once, and no other agent's stream is touched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import asyncpg
import msgspec
import nats
import nats.js.errors
import pytest

from devstack.processes import ServiceProcess, wait_until
from shared.envelope import TxEnvelope, ingested_event_id
from shared.jetstream import Topology
from shared.settings import Settings
from shared.transactions import parse_transaction
from shared.wire import HDR_MSG_ID, tx_encoder, tx_messages
from tests.support import service_env

AGENT, VICTIM = "agent-a", "agent-v"


def deposit(agent: str, tx_id: str, amount: str = "1.25") -> TxEnvelope:
    """A transaction as the ingester makes it of a well-formed feed item."""
    raw = b'{"id":"%s","type":"deposit","amount":"%s","created_at":"2026-01-01T00:00:00Z"}' % (
        tx_id.encode(),
        amount.encode(),
    )
    return parse_transaction(raw, agent, "casino")


def with_amount(envelope: TxEnvelope, amount: str) -> TxEnvelope:
    """``envelope`` with its event data's amount rewritten, under the id the ingester derived."""
    data = msgspec.json.decode(envelope.data)
    data["amount"] = amount
    return msgspec.structs.replace(envelope, data=msgspec.Raw(msgspec.json.encode(data)))


async def publish(
    nc: nats.NATS, topology: Topology, subject_agent: str, envelopes: list[TxEnvelope]
) -> bytes:
    """``envelopes`` as one PFLEA_TX batch on ``subject_agent``'s subject, with its Nats-Msg-Id,
    exactly as the ingester publishes; the payload."""
    [message] = tx_messages(envelopes)
    await nc.jetstream().publish(
        topology.tx_subject(subject_agent), message.payload, headers={HDR_MSG_ID: message.msg_id}
    )
    return message.payload


@pytest.fixture
def writer(settings: Settings, tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("services.writer", service_env(settings), tmp_path)
    yield proc
    proc.kill()


async def run_writer_until_drained(writer: ServiceProcess, nc: nats.NATS, topology: Topology) -> None:
    """Start the writer on what is published and wait until it has acked every message."""
    writer.start()

    async def drained() -> bool:
        try:
            info = await nc.jetstream().consumer_info(topology.tx_stream, topology.writer_durable)
        except nats.js.errors.NotFoundError:
            return False
        return info.num_pending == 0 and info.num_ack_pending == 0

    await wait_until(drained, 60, "the writer through PFLEA_TX")
    assert writer.terminate() == 0, writer.log_tail()


async def stored(url: str) -> dict[str, list[tuple[str, object]]]:
    """Each stream's (tx id, event id) in version order."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT stream_id, data->>'tx_id' AS tx_id, event_id FROM events ORDER BY stream_id, version"
        )
    finally:
        await conn.close()
    streams: dict[str, list[tuple[str, object]]] = {}
    for r in rows:
        streams.setdefault(r["stream_id"], []).append((r["tx_id"], r["event_id"]))
    return streams


async def quarantined(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(
            await conn.fetch("SELECT source, agent_id, subject, reason, raw FROM quarantine ORDER BY id")
        )
    finally:
        await conn.close()


def ids(envelopes: list[TxEnvelope]) -> list[tuple[str, object]]:
    return [(e.tx_id, e.event_id) for e in envelopes]


async def test_a_batch_published_on_another_agents_subject_is_quarantined_whole(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    victim = [deposit(VICTIM, f"v{n}") for n in range(1, 4)]
    before = [deposit(AGENT, f"a{n}") for n in range(1, 4)]
    after = [deposit(AGENT, f"a{n}") for n in range(4, 7)]
    # The victim's transactions, well formed and rightly identified, but on agent-a's subject.
    forged = [deposit(VICTIM, "v4", "1000000"), deposit(VICTIM, "v5", "1000000")]
    await publish(js_streams, topology, VICTIM, victim)
    await publish(js_streams, topology, AGENT, before)
    payload = await publish(js_streams, topology, AGENT, forged)
    await publish(js_streams, topology, AGENT, after)
    await run_writer_until_drained(writer, js_streams, topology)

    assert await stored(settings.database_url) == {VICTIM: ids(victim), AGENT: ids(before + after)}
    [row] = await quarantined(settings.database_url)
    assert row["source"] == "writer" and bytes(row["raw"]) == payload
    assert (row["agent_id"], row["subject"]) == (AGENT, topology.tx_subject(AGENT))
    assert row["reason"] == (
        f"agent_id: the batch says {VICTIM!r}, its subject {topology.tx_subject(AGENT)!r} says {AGENT!r}"
    )


async def test_a_transaction_with_a_bad_amount_is_quarantined_alone(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    victim = [deposit(VICTIM, f"v{n}") for n in range(1, 4)]
    batch = [deposit(AGENT, f"a{n}") for n in range(1, 8)]
    bad = {  # position in the batch: (forged amount, the reason the ingester would give)
        1: ("-5", "amount: must not be negative (got Decimal('-5'))"),
        3: ("1e400", "amount: has more than 20 integer digits (got Decimal('1E+400'))"),
        5: ("0.0000000000000000001", "amount: has more than 18 decimal places (got Decimal('1E-19'))"),
    }
    for i, (amount, _) in bad.items():
        batch[i] = with_amount(batch[i], amount)
    await publish(js_streams, topology, VICTIM, victim)
    payload = await publish(js_streams, topology, AGENT, batch)
    await run_writer_until_drained(writer, js_streams, topology)

    good = [e for i, e in enumerate(batch) if i not in bad]
    assert await stored(settings.database_url) == {VICTIM: ids(victim), AGENT: ids(good)}
    rows = await quarantined(settings.database_url)
    assert [(r["source"], r["agent_id"], r["subject"]) for r in rows] == [
        ("writer", AGENT, topology.tx_subject(AGENT))
    ] * len(bad)
    assert [r["reason"] for r in rows] == [reason for _, reason in bad.values()]
    assert [bytes(r["raw"]) for r in rows] == [tx_encoder.encode(batch[i]) for i in bad]
    assert all(bytes(r["raw"]) in payload for r in rows)  # the very bytes published


async def test_a_transaction_under_a_forged_event_id_is_quarantined_and_cannot_shadow_the_real_one(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    """Stored first under the id of a transaction still to come, a forgery would make the real
    one a "duplicate", skipped for ever."""
    victim = [deposit(VICTIM, f"v{n}") for n in range(1, 4)]
    first = [deposit(AGENT, "a1"), deposit(AGENT, "a9", "1000000"), deposit(AGENT, "a3")]
    later = [deposit(AGENT, f"a{n}") for n in range(4, 7)]
    shadowed = later[1]  # a5
    first[1] = msgspec.structs.replace(first[1], event_id=shadowed.event_id)
    await publish(js_streams, topology, VICTIM, victim)
    payload = await publish(js_streams, topology, AGENT, first)
    await publish(js_streams, topology, AGENT, later)
    await run_writer_until_drained(writer, js_streams, topology)

    good = [first[0], first[2], *later]
    assert await stored(settings.database_url) == {VICTIM: ids(victim), AGENT: ids(good)}
    [row] = await quarantined(settings.database_url)
    assert (row["source"], row["agent_id"], row["subject"]) == ("writer", AGENT, topology.tx_subject(AGENT))
    derived = ingested_event_id("casino", AGENT, "a9")
    assert row["reason"] == (
        f"event_id: {shadowed.event_id} is not {derived}, the id the identity rule gives "
        f"transaction 'casino:a9' of {AGENT!r}"
    )
    assert bytes(row["raw"]) == tx_encoder.encode(first[1]) and bytes(row["raw"]) in payload

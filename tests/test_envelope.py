"""PFLEA_TX messages: an agent's consecutive transactions in batches, decoded back in order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from shared.envelope import TxEnvelope
from shared.wire import BATCH_MAX_BYTES, BATCH_MAX_ITEMS, decode_tx_message, tx_encoder, tx_messages


def tx(agent: str, n: int, size: int = 10) -> TxEnvelope:
    return TxEnvelope(
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"{agent}/{n}"),
        agent_id=agent,
        event_type="FundsDeposited",
        schema_version=1,
        data=msgspec.Raw(b'{"memo":"%s"}' % (b"x" * size)),
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        feed="casino",
        tx_id=f"{agent}-{n}",
    )


def test_each_run_of_one_agent_is_cut_into_batches_that_decode_back_in_order() -> None:
    txs = [tx("a", n) for n in range(BATCH_MAX_ITEMS + 5)] + [tx("b", 0), tx("a", 999)]
    messages = tx_messages(txs)
    assert [(m.agent_id, len(decode_tx_message(m.payload))) for m in messages] == [
        ("a", BATCH_MAX_ITEMS),
        ("a", 5),
        ("b", 1),
        ("a", 1),
    ]
    assert [t for m in messages for t in decode_tx_message(m.payload)] == txs
    # The same transactions make the same messages: JetStream's duplicate window applies.
    assert [m.msg_id for m in tx_messages(txs)] == [m.msg_id for m in messages]
    assert len({m.msg_id for m in messages}) == len(messages)


def test_a_batch_stays_under_its_byte_limit() -> None:
    txs = [tx("a", n, size=40_000) for n in range(20)]
    messages = tx_messages(txs)
    assert len(messages) > 1 and all(len(m.payload) <= BATCH_MAX_BYTES for m in messages)
    assert [t for m in messages for t in decode_tx_message(m.payload)] == txs


def test_a_lone_envelope_and_a_mixed_batch_are_refused() -> None:
    # One format: a batch, even of one transaction.
    with pytest.raises(msgspec.ValidationError):
        decode_tx_message(tx_encoder.encode(tx("a", 1)))
    assert decode_tx_message(tx_messages([tx("a", 1)])[0].payload) == [tx("a", 1)]
    mixed = msgspec.json.encode({"agent_id": "a", "transactions": [tx("a", 1), tx("b", 2)]})
    with pytest.raises(msgspec.ValidationError, match="another agent"):
        decode_tx_message(mixed)
    with pytest.raises(msgspec.DecodeError):
        decode_tx_message(b"\xff not json")

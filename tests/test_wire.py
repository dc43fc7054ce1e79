"""Every NATS message format round-trips through its one encode/decode pair (shared.wire)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import nats
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.commands import (
    ClaimFaucet,
    Command,
    LockEscrow,
    PlaceBet,
    RegisterAgent,
    ReleaseEscrow,
    Reply,
    WithdrawFunds,
)
from shared.envelope import TxEnvelope
from shared.jetstream import Topology
from shared.store import RecordedEvent
from shared.wire import (
    HDR_POSITION,
    BadMessage,
    DeliveredEvent,
    decode_command,
    decode_reply,
    decode_tx_message,
    delivered_event,
    encode_command,
    encode_reply,
    event_message,
    tx_messages,
)
from tests.support import stream_messages

agents = st.sampled_from(["agent-a", "agent-b", "c_1"])
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(texts, json_values, max_size=5).map(lambda d: msgspec.json.encode(d).decode())
amounts = st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False, allow_infinity=False)


@st.composite
def envelopes(draw: st.DrawFn) -> TxEnvelope:
    return TxEnvelope(
        event_id=draw(st.uuids()),
        agent_id=draw(agents),
        event_type=draw(st.sampled_from(["FundsDeposited", "BetPlaced", "UnknownTransaction"])),
        schema_version=draw(st.integers(1, 3)),
        data=msgspec.Raw(draw(json_objects).encode()),
        occurred_at=draw(moments),
        feed=draw(st.sampled_from(["casino", "faucet", "wallet"])),
        tx_id=draw(texts.filter(bool)),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(envelopes(), max_size=40))
def test_pflea_tx_batches_decode_to_the_same_transactions_in_order(txs: list[TxEnvelope]) -> None:
    messages = tx_messages(txs)
    decoded = [t for m in messages for t in decode_tx_message(m.payload)]
    assert decoded == txs
    assert all(len({t.agent_id for t in decode_tx_message(m.payload)}) == 1 for m in messages)


@st.composite
def recorded_events(draw: st.DrawFn) -> RecordedEvent:
    occurred = draw(moments)
    return RecordedEvent(
        position=draw(st.integers(1, 2**62)),
        event_id=draw(st.uuids()),
        stream_id=draw(agents),
        stream_type="agent",
        event_type=draw(st.sampled_from(["FundsDeposited", "BetWon", "AgentRegistered"])),
        version=draw(st.integers(1, 2**40)),
        data=draw(json_objects),
        metadata="{}",
        schema_version=draw(st.integers(1, 3)),
        occurred_at=occurred,
        recorded_at=occurred + timedelta(microseconds=draw(st.integers(0, 10**9))),
        hash=draw(st.binary(min_size=32, max_size=32)),
    )


@settings(max_examples=100, deadline=None)
@given(recorded_events())
def test_a_relayed_event_decodes_to_exactly_what_was_stored(recorded: RecordedEvent) -> None:
    subject, payload, headers = event_message(Topology("pflea"), recorded)
    assert subject == f"pflea.events.{recorded.stream_id}.{recorded.event_type}"
    assert delivered_event(payload, headers) == DeliveredEvent.of(recorded)


@pytest.mark.parametrize("missing", [HDR_POSITION, "Pflea-Recorded-At", "Pflea-Schema-Version"])
def test_a_message_without_the_relays_headers_is_a_bad_message(missing: str) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    recorded = RecordedEvent(
        position=1, event_id=uuid.uuid4(), stream_id="a", stream_type="agent", event_type="AgentRegistered",
        version=1, data="{}", metadata="{}", schema_version=1, occurred_at=now, recorded_at=now,
    )  # fmt: skip
    _, payload, headers = event_message(Topology(), recorded)
    del headers[missing]
    with pytest.raises(BadMessage):
        delivered_event(payload, headers)
    with pytest.raises(BadMessage):
        delivered_event(b"{}", None)


async def test_headers_survive_a_real_nats_server(
    nats_url: str, js_streams: nats.NATS, topology: Topology
) -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    recorded = RecordedEvent(
        position=42, event_id=uuid.uuid4(), stream_id="agent-x", stream_type="agent", event_type="BetWon",
        version=7, data='{"amount":"1.50","asset":"PFLEA"}', metadata="{}", schema_version=1,
        occurred_at=now, recorded_at=now + timedelta(seconds=1),
    )  # fmt: skip
    subject, payload, headers = event_message(topology, recorded)
    await js_streams.jetstream().publish(subject, payload, headers=headers)
    [msg] = await stream_messages(js_streams.jetstream(), topology.events_stream, topology.events_filter)
    assert delivered_event(msg.data, msg.headers) == DeliveredEvent.of(recorded)


command_ids = st.uuids()
wire_amounts = amounts.map(lambda d: format(d, "f"))
commands = st.one_of(
    st.builds(RegisterAgent, command_id=command_ids, name=st.none() | texts),
    st.builds(PlaceBet, command_id=command_ids, game=texts, amount=wire_amounts, asset=st.just("PFLEA")),
    st.builds(WithdrawFunds, command_id=command_ids, amount=wire_amounts, asset=texts, address=texts),
    st.builds(ClaimFaucet, command_id=command_ids),
    st.builds(LockEscrow, command_id=command_ids, amount=wire_amounts, asset=texts, escrow_id=texts),
    st.builds(
        ReleaseEscrow,
        command_id=command_ids,
        escrow_id=st.none() | texts,
        amount=st.none() | wire_amounts,
        asset=st.none() | texts,
    ),
)


@settings(max_examples=100, deadline=None)
@given(commands)
def test_a_command_decodes_to_itself_whatever_its_kind(command: Command) -> None:
    assert decode_command(encode_command(command)) == command


@settings(max_examples=100, deadline=None)
@given(
    command_ids,
    st.sampled_from(["accepted", "rejected", "failed"]),
    st.none() | amounts,
    st.lists(st.uuids(), max_size=3),
    st.none() | texts,
)
def test_a_reply_decodes_to_itself_with_its_payout_exact(
    command_id: uuid.UUID, status: str, payout: Decimal | None, event_ids: list[uuid.UUID], bet_id: str | None
) -> None:
    reply = Reply(
        command_id=command_id,
        agent_id="agent-a",
        command="PlaceBet",
        status=status,  # type: ignore[arg-type]
        event_ids=tuple(event_ids),
        bet_id=bet_id,
        payout=payout,
        won=None if payout is None else payout > 0,
    )
    assert decode_reply(encode_reply(reply)) == reply

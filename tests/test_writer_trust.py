"""The writer believes nothing it is handed (services/writer/decode.py), in this process: a
PFLEA_TX batch only on its own agent's subject, and each transaction only if it is exactly what
the ingester's validation makes of the feed item it carries, under the id derived from it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from services.simulator.feed import AgentFeed
from services.writer.decode import decode_items, misaddressed, refusal
from services.writer.messages import Item
from shared.envelope import TxEnvelope, bet_event_id, ingested_event_id
from shared.jetstream import Topology
from shared.transactions import BUILDERS, SOURCE_TYPES, Rejected, parse_transaction
from shared.wire import tx_messages

TOPOLOGY = Topology("t")
DEEP = b"[" * 32 + b"]" * 32  # the deepest the ingester takes (MAX_DEPTH)

# Items the ingester accepts that a careless inverse would get wrong: unknown types with numbers,
# no created_at, offsets and naive times, integer ids, lower-case assets, exponents, trailing
# zeros, -0, unknown fields, deep nesting, bets known by bet_id (and one on a feed where they
# are not), a source that itself says "occurred_at_source".
ACCEPTED = [
    (
        "casino",
        b'{"id":"u1","type":"jackpot","amount":1.5,"n":[1,2.0,{"x":1e-7}],"agent_id":"agent-a",'
        b'"created_at":"2026-01-01T00:00:00+02:00"}',
    ),
    ("casino", b'{"id":"u2","type":"mystery"}'),
    (
        "casino",
        b'{"id":"u3","type":"odd","deep":'
        + DEEP
        + b',"text":"\\u00e9\\n\\"","created_at":"2026-01-01T00:00:00Z"}',
    ),
    ("casino", b'{"id":"n1","type":"deposit","amount":"1"}'),
    ("casino", b'{"id":7,"type":"deposit","amount":2,"asset":"usdc","created_at":"2026-01-01T00:00:00"}'),
    (
        "casino",
        b'{"id":"b1","type":"bet","amount":"2.50","game":5,"bet_id":"x9","created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "casino",
        b'{"id":"b2","type":"win","amount":"5.000","bet_id":"x9","created_at":"2026-01-01T00:00:00.123456Z"}',
    ),
    ("wallet", b'{"id":"b3","type":"bet","amount":"2.50","bet_id":"x9","created_at":"2026-01-01T00:00:00Z"}'),
    (
        "trading",
        b'{"id":"t1","type":"trade","side":"buy","instrument":"btc","quantity":"0.0000001",'
        b'"price":"1e4","amount":"1E+2","created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "wallet",
        b'{"id":"s1","type":"swap","amount":"1.0000000000000000000000","to_amount":"-0",'
        b'"to_asset":"eth","fee":0.1,"created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "casino",
        b'{"id":"r1","type":"register","amount":"9","name":"Ada","created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "domains",
        b'{"id":"d1","type":"domain_sale","amount":"3","domain":"x.com","occurred_at_source":"first_seen",'
        b'"created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "domains",
        b'{"id":"d2","type":"domain_purchase","amount":"3","domain":"x.com","occurred_at_source":"x"}',
    ),
    (
        "escrow",
        b'{"id":"e1","type":"escrow","amount":"3","escrow_id":"q","deep":'
        + DEEP
        + b',"created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "casino",
        b'{"id":"w1","type":"withdraw","amount":"0.000000000000000001","address":null,"memo":null,'
        b'"created_at":"2026-01-01T00:00:00Z"}',
    ),
    (
        "casino",
        b'{"id":"f1","type":"fee","amount":"1","reason":"x","big":100000000000000000000000000000000000,'
        b'"created_at":"2026-01-01T00:00:00Z"}',
    ),
    ("faucet", b'{"id":"f2","type":"faucet","amount":"10.00","created_at":"2026-01-01T00:00:00Z"}'),
    (
        "wallet",
        b'{"id":"f3","type":"transfer_out","amount":"10","chain":"eth","address":"0xabc",'
        b'"created_at":"2026-01-01T00:00:00Z"}',
    ),
]


def good(tx_id: str = "t1", feed: str = "casino", **fields: Any) -> TxEnvelope:
    item = {"id": tx_id, "type": "deposit", "amount": "1.25", "created_at": "2026-01-01T00:00:00Z", **fields}
    return parse_transaction(msgspec.json.encode(item), "agent-a", feed)


def with_data(envelope: TxEnvelope, **changes: Any) -> TxEnvelope:
    """``envelope`` with its event data changed (a key set to ``...`` is removed), id kept."""
    data = msgspec.json.decode(envelope.data)
    data.update(changes)
    data = {k: v for k, v in data.items() if v is not ...}
    return msgspec.structs.replace(envelope, data=msgspec.Raw(msgspec.json.encode(data)))


def raw_data(envelope: TxEnvelope, data: bytes) -> TxEnvelope:
    return msgspec.structs.replace(envelope, data=msgspec.Raw(data))


@pytest.mark.parametrize(("feed", "raw"), ACCEPTED, ids=[f"{i}" for i in range(len(ACCEPTED))])
def test_whatever_the_ingester_accepts_the_writer_accepts(feed: str, raw: bytes) -> None:
    assert refusal(parse_transaction(raw, "agent-a", feed)) is None


NEEDS = {
    "trade": {"side": "sell", "instrument": "BTC", "quantity": "0.5"},
    "swap": {"to_amount": "3", "to_asset": "USDC"},
    **{t: {"domain": "example.com"} for t in ("domain_purchase", "domain_renewal", "domain_sale")},
}


@pytest.mark.parametrize("source_type", sorted(BUILDERS))
def test_every_type_in_the_catalogue_comes_back_as_itself(source_type: str) -> None:
    envelope = good(type=source_type, **NEEDS.get(source_type, {}))
    assert SOURCE_TYPES[envelope.event_type] == source_type
    assert refusal(envelope) is None


def test_every_transaction_the_simulator_makes_that_the_ingester_accepts_passes_the_writer() -> None:
    accepted = 0
    for n in range(6):
        feed = AgentFeed(11, f"agent-{n}", n)
        for _ in range(400):
            tx = feed.generate(malformed_rate=0.2, numeric_amount_rate=0.3)
            try:
                envelope = parse_transaction(tx.raw, tx.agent_id, tx.feed)
            except Rejected:
                continue
            assert refusal(envelope) is None, tx.raw
            accepted += 1
    assert accepted > 1500


FORGED: list[tuple[str, Callable[[], TxEnvelope], str]] = [
    ("negative amount", lambda: with_data(good(), amount="-5"), "amount: must not be negative"),
    ("amount 1e400", lambda: with_data(good(), amount="1e400"), "amount: has more than 20 integer digits"),
    ("19 decimals", lambda: with_data(good(), amount="0.0000000000000000001"), "amount: has more than 18"),
    ("NaN token", lambda: raw_data(good(), b'{"tx_id":"t1","amount":NaN,"asset":"PFLEA"}'), "amount:"),
    (
        "amount as a JSON number",
        lambda: raw_data(good(), b'{"tx_id":"t1","amount":1.25,"asset":"PFLEA"}'),
        "data.amount:",
    ),
    ("amount missing", lambda: with_data(good(), amount=...), "amount: missing"),
    ("bad asset", lambda: with_data(good(), asset="not an asset!"), "asset:"),
    (
        "withdraw address too long",
        lambda: with_data(msgspec.structs.replace(good(), event_type="FundsWithdrawn"), address="a" * 300),
        "address: must be 1 to 200 characters",
    ),
    ("NUL in a field", lambda: with_data(good(), extra={"memo": "a\x00b"}), "NUL"),
    ("item over the size limit", lambda: with_data(good(), extra={"memo": "x" * 70_000}), "bytes is over"),
    ("not an object", lambda: raw_data(good(), b"[1]"), "data: expected a JSON object"),
    (
        "duplicate key",
        lambda: raw_data(good(), b'{"tx_id":"t1","amount":"1","amount":"9","asset":"PFLEA"}'),
        "amount: the key appears twice",
    ),
    ("tx_id in data is another", lambda: with_data(good(), tx_id="t2"), "data.tx_id:"),
    ("an unknown field", lambda: with_data(good(), owner="agent-b"), "data.extra:"),
    (
        "not in the catalogue",
        lambda: msgspec.structs.replace(good(), event_type="MoneyPrinted"),
        "event_type:",
    ),
    (
        "old schema version",
        lambda: msgspec.structs.replace(good(type="bet"), schema_version=1),
        "schema_version:",
    ),
    (
        "unknown type hiding a deposit",
        lambda: raw_data(
            msgspec.structs.replace(good(), event_type="UnknownTransaction"),
            b'{"tx_id":"t1","source_type":"deposit","raw":{"id":"t1","type":"deposit","amount":"1"}}',
        ),
        "event_type:",
    ),
    (
        "unknown type of another agent",
        lambda: parse_and_move(b'{"id":"u","type":"odd","agent_id":"agent-a"}', "agent-b"),
        "agent_id:",
    ),
    (
        "unknown type at another time",
        lambda: msgspec.structs.replace(
            parse_transaction(
                b'{"id":"u","type":"odd","created_at":"2026-01-01T00:00:00Z"}', "agent-a", "casino"
            ),
            occurred_at=good().occurred_at.replace(year=2020),
        ),
        "occurred_at:",
    ),
    ("feed name", lambda: msgspec.structs.replace(good(), feed="Casino!"), "feed:"),
    ("random event id", lambda: msgspec.structs.replace(good(), event_id=uuid.uuid4()), "event_id:"),
    (
        "another agent's event id",
        lambda: msgspec.structs.replace(good(), event_id=ingested_event_id("casino", "agent-b", "t1")),
        "event_id:",
    ),
    (
        "another feed's event id",
        lambda: msgspec.structs.replace(good(), event_id=ingested_event_id("wallet", "agent-a", "t1")),
        "event_id:",
    ),
    (
        "a later transaction's event id",
        lambda: msgspec.structs.replace(good(), event_id=ingested_event_id("casino", "agent-a", "t2")),
        "event_id:",
    ),
    (
        "a bet by tx id, not bet_id",
        lambda: msgspec.structs.replace(
            good(type="bet", bet_id="b7"), event_id=ingested_event_id("casino", "agent-a", "t1")
        ),
        "event_id:",
    ),
    (
        "a bet's win id on its placement",
        lambda: msgspec.structs.replace(
            good(type="bet", bet_id="b7"), event_id=bet_event_id("agent-a", "b7", won=True)
        ),
        "event_id:",
    ),
]


def parse_and_move(raw: bytes, agent: str) -> TxEnvelope:
    """A transaction of agent-a relabelled, id and all, as ``agent``'s."""
    envelope = parse_transaction(raw, "agent-a", "casino")
    return msgspec.structs.replace(envelope, agent_id=agent, event_id=ingested_event_id("casino", agent, "u"))


@pytest.mark.parametrize(("forged", "reason"), [(f, r) for _, f, r in FORGED], ids=[n for n, _, _ in FORGED])
def test_a_forged_transaction_is_refused_naming_the_field(
    forged: Callable[[], TxEnvelope], reason: str
) -> None:
    refused = refusal(forged())
    assert refused is not None and reason in refused, refused


def test_the_reason_for_a_forged_id_names_the_derivation() -> None:
    envelope = good("t1")
    forged = uuid.uuid4()
    reason = refusal(msgspec.structs.replace(envelope, event_id=forged))
    assert reason == (
        f"event_id: {forged} is not {envelope.event_id}, the id the identity rule gives transaction "
        "'casino:t1' of 'agent-a'"
    )


def test_a_batch_is_taken_only_from_its_own_agents_subject() -> None:
    assert misaddressed("t.tx.agent-a", "agent-a", TOPOLOGY) is None
    assert misaddressed("t.tx.agent-a", "agent-b", TOPOLOGY) == (
        "agent_id: the batch says 'agent-b', its subject 't.tx.agent-a' says 'agent-a'"
    )
    assert (misaddressed("other.tx.agent-a", "agent-a", TOPOLOGY) or "").startswith("subject:")
    assert (misaddressed("t.tx.agent.a", "agent.a", TOPOLOGY) or "").startswith("subject:")


def item(seq: int, subject: str, envelopes: list[TxEnvelope]) -> Item:
    [message] = tx_messages(envelopes)
    return Item(seq, subject, message.payload, None, 1, f"key-{seq}")


def test_a_refused_transaction_is_set_aside_alone_and_a_misaddressed_batch_whole() -> None:
    a = [good(f"a{n}") for n in range(5)]
    a[2] = with_data(a[2], amount="-1")
    victim = [
        parse_transaction(
            msgspec.json.encode({"id": "v1", "type": "deposit", "amount": "9"}), "agent-v", "casino"
        )
    ]
    decoded = decode_items(
        [item(1, "t.tx.agent-a", a), item(2, "t.tx.agent-a", victim), item(3, "t.tx.agent-a", [good("a9")])],
        TOPOLOGY,
    )
    assert [t.envelope.tx_id for t in decoded.txs] == ["a0", "a1", "a3", "a4", "a9"]
    assert [(i.seq, e.tx_id, r.split(":")[0]) for i, e, r in decoded.refused] == [(1, "a2", "amount")]
    assert [(i.seq, r.split(":")[0]) for i, r in decoded.poison] == [(2, "agent_id")]

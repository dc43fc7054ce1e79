"""msgspec's fast path and the stdlib path decide every transaction alike.

A page proven plain is decoded once by msgspec; any other item is parsed with the stdlib parser
and its checks. Whichever path an item takes, it must become the same envelope or be refused
with the same reason: these tests run each item both ways and compare.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from services.ingester.pages import split_page
from services.simulator import Simulator, SimulatorConfig, rawjson
from services.simulator.config import FaultKnobs
from shared import transactions
from shared.envelope import INGESTED_EVENT_NAMESPACE, TxEnvelope, bet_event_id, ingested_event_id
from shared.events import (
    AssetSwapped,
    BetPlaced,
    FundsDeposited,
    TradeExecuted,
    UnknownTransaction,
    encode_data,
    plain_json,
)
from shared.transactions import Rejected, parse_transaction, reparse
from tests.test_ingest_validation import POISON

AGENT, FEED = "agent-0001", "casino"
Outcome = TxEnvelope | str


def outcome(raw: bytes, plain: dict[str, Any] | None = None) -> Outcome:
    try:
        return parse_transaction(raw, AGENT, FEED, plain)
    except Rejected as exc:
        return f"rejected: {exc.reason} (tx {exc.tx_id})"


def stdlib_outcome(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> Outcome:
    with monkeypatch.context() as m:
        m.setattr(transactions, "_plain_item", lambda raw: None)
        return outcome(raw)


def compact(raw: bytes) -> bytes:
    """The item without the spaces between its members: what makes the fast path try it."""
    return raw.replace(b'", "', b'","').replace(b'": ', b'":').replace(b", ", b",")


def page_of(items: list[bytes]) -> bytes:
    return b'{"transactions":[' + b",".join(items) + b"]}"


def same(a: Outcome, b: Outcome) -> bool:
    """Equal, but for the clock's time an item without created_at gets."""
    if isinstance(a, TxEnvelope) and isinstance(b, TxEnvelope) and b"first_seen" in bytes(a.data):
        return msgspec.structs.replace(a, occurred_at=b.occurred_at) == b
    return a == b


@pytest.mark.parametrize(("raw", "field"), POISON, ids=[f"{i}-{f}" for i, (_, f) in enumerate(POISON)])
def test_each_poison_item_is_refused_alike_on_both_paths_even_written_compactly(
    raw: bytes, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for item in (raw, compact(raw)):
        fast = outcome(item)
        assert isinstance(fast, str), f"{item[:80]!r} was accepted"
        assert field.lower() in fast.lower()
        assert fast == stdlib_outcome(item, monkeypatch)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id":"p","type":"deposit","amount":"1","amount":"2","created_at":"2026-01-01T00:00:00Z"}',
        b'{"id":"p","type":"deposit","type":"deposit","amount":"1","created_at":"2026-01-01T00:00:00Z"}',
        b'{"id":"p","type":"deposit","amount":"1","memo":"a\\u0000b","created_at":"2026-01-01T00:00:00Z"}',
        b'{"id":"p","type":"deposit","amount":"1","a\\u0000":"b","created_at":"2026-01-01T00:00:00Z"}',
        b'{"id":"p","type":"deposit","amount":"1","memo":"\\ud800","created_at":"2026-01-01T00:00:00Z"}',
    ],
    ids=["duplicate amount", "duplicate type", "NUL in a value", "NUL in a key", "lone surrogate"],
)
def test_a_compact_poison_item_in_a_page_of_good_ones_is_refused_alone(raw: bytes) -> None:
    good = [
        b'{"id":"g%d","type":"deposit","amount":"1.50","created_at":"2026-01-01T00:00:00Z"}' % i
        for i in range(3)
    ]
    page = split_page(page_of([good[0], raw, good[1], good[2]]))
    assert len(page.items) == 4
    verdicts = [
        outcome(item, None if page.plain is None else page.plain[i]) for i, item in enumerate(page.items)
    ]
    assert [isinstance(v, TxEnvelope) for v in verdicts] == [True, False, True, True]


def test_a_plain_page_is_decoded_once_and_an_unplain_one_item_by_item() -> None:
    items = [b'{"id":"g1","type":"deposit","amount":1.50,"created_at":"2026-01-01T00:00:00Z"}']
    plain = split_page(page_of(items)).plain
    assert plain == [
        {"id": "g1", "type": "deposit", "amount": Decimal("1.50"), "created_at": "2026-01-01T00:00:00Z"}
    ]
    assert isinstance(plain[0]["amount"], Decimal)  # from its text, never via float
    for body in (
        b'{"transactions": [' + items[0] + b"]}",  # a space
        b'{"transactions":[' + items[0] + b'],"next":null}',  # another member
        page_of([b'{"id":"g1","type":"x","raw":{"a":1},"created_at":"2026-01-01T00:00:00Z"}']),  # nested
        page_of(
            [b'{"id":"g1","type":"deposit","amount":"1","memo":"\\u00e9"}']
        ),  # an escape msgspec would not write
        page_of([b'{"id":"g1","type":"deposit","amount":1E2}']),  # a number msgspec writes otherwise
    ):
        page = split_page(body)
        assert page.plain is None and len(page.items) == 1


@pytest.mark.parametrize("malformed_rate", [0.0, 0.3])
@pytest.mark.parametrize("numeric_amount_rate", [0.0, 0.5])
def test_simulator_pages_make_the_same_envelopes_on_both_paths(
    malformed_rate: float, numeric_amount_rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SimulatorConfig(
        seed=11,
        agents=4,
        backlog=300,
        rate=0,
        history=1000,
        numeric_amount_rate=numeric_amount_rate,
        faults=FaultKnobs(malformed_rate=malformed_rate),
    )
    sim = Simulator(config)
    compared = plain_pages = 0
    for agent_id in sim.feeds:
        for feed in ("casino", "trading", "wallet", "domains", "faucet", "escrow"):
            txs = sim.page(agent_id, None, 200, feed=feed)
            page = split_page(rawjson.envelope("transactions", (tx.parts for tx in txs)))
            plain_pages += page.plain is not None
            for i, raw in enumerate(page.items):
                fast = outcome_of(raw, agent_id, feed, None if page.plain is None else page.plain[i])
                with monkeypatch.context() as m:
                    m.setattr(transactions, "_plain_item", lambda raw: None)
                    slow = outcome_of(raw, agent_id, feed, None)
                assert same(fast, slow), raw[:200]
                compared += 1
    assert compared > 1000
    if malformed_rate == 0:
        assert plain_pages == 4 * 6  # every clean page takes the fast path


def outcome_of(raw: bytes, agent_id: str, feed: str, plain: dict[str, Any] | None) -> Outcome:
    try:
        return parse_transaction(raw, agent_id, feed, plain)
    except Rejected as exc:
        return f"rejected: {exc.reason} (tx {exc.tx_id})"


@pytest.mark.parametrize(
    "event",
    [
        FundsDeposited(amount=Decimal("12.50"), asset="USDC", tx_id="t", extra={"memo": "x", "n": 3}),
        FundsDeposited(amount=Decimal("0.0000001"), asset="USDC"),
        FundsDeposited(amount=Decimal("1E+3"), asset="USDC"),
        FundsDeposited(amount=Decimal("0E-7"), asset="USDC"),
        FundsDeposited(amount=Decimal("5"), asset="USDC", extra={"fee": Decimal("0.0000001")}),
        BetPlaced(amount=Decimal("1"), asset="PFLEA", extra={"nested": {"a": [Decimal("1E-9")]}}),
        TradeExecuted(
            amount=Decimal("3"), asset="USDC", side="buy", instrument="BTC", quantity=Decimal("1E-7")
        ),
        TradeExecuted(
            amount=Decimal("3.5"),
            asset="USDC",
            side="sell",
            instrument="BTC",
            quantity=Decimal("2"),
            price=Decimal("1.75"),
        ),
        AssetSwapped(amount=Decimal("1"), asset="USDC", to_amount=Decimal("1E+1"), to_asset="PFLEA"),
        UnknownTransaction(source_type="airdrop", raw={"id": "a", "amount": Decimal("2E+2")}),
        UnknownTransaction(source_type="airdrop", raw={"id": "a", "amount": "1", "ok": True, "n": None}),
    ],
)
def test_event_data_is_the_same_bytes_written_either_way(event: Any) -> None:
    detour = msgspec.json.encode(plain_json(msgspec.to_builtins(event, builtin_types=(Decimal,))))
    assert encode_data(event) == detour
    assert b"E" not in detour.replace(b"USDC", b"").replace(b"PFLEA", b"")  # never an exponent


@pytest.mark.parametrize("name", ["casino:agent-1:t1", "wallet:agent-ü:0", ""])
def test_event_ids_are_uuid5_in_the_ingested_namespace(name: str) -> None:
    feed, agent, tx_id = (name.split(":") + ["", "", ""])[:3]
    assert ingested_event_id(feed, agent, tx_id) == uuid.uuid5(
        INGESTED_EVENT_NAMESPACE, f"{feed}:{agent}:{tx_id}"
    )
    assert bet_event_id(agent, "b1", won=True) == uuid.uuid5(
        INGESTED_EVENT_NAMESPACE, f"casino:{agent}:bet:b1:won"
    )
    for n in range(2000):  # every bit the version and variant touch, on many digests
        made = ingested_event_id(feed, agent, f"{tx_id}{n}")
        assert made == uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"{feed}:{agent}:{tx_id}{n}")
        assert (made.version, made.variant, hash(made)) == (5, uuid.RFC_4122, hash(uuid.UUID(str(made))))


def reparse_outcome(envelope: TxEnvelope) -> Outcome:
    try:
        return reparse(envelope)
    except Rejected as exc:
        return f"rejected: {exc.reason} (tx {exc.tx_id})"


def test_the_writer_reparses_alike_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Simulator(
        SimulatorConfig(seed=5, agents=3, backlog=300, rate=0, history=1000, numeric_amount_rate=0.5)
    )
    envelopes = [parse_transaction(tx.raw, tx.agent_id, tx.feed) for tx in sim.truth()]
    forged = [
        msgspec.structs.replace(envelopes[1], data=msgspec.Raw(data))
        for data in (
            b'{"tx_id":"x","amount":"1","amount":"2","asset":"USDC"}',
            b'{"tx_id":"x","amount":"1","asset":"USDC","extra":{"memo":"a\\u0000b"}}',
            b'{"tx_id":"x","amount":"1","asset":"USDC","extra":{"memo":"\\u00e9"}}',
            b'{"tx_id":"x","amount":1.5,"asset":"USDC"}',
        )
    ]
    for envelope in envelopes + forged:
        fast = reparse_outcome(envelope)
        with monkeypatch.context() as m:
            m.setattr(transactions, "_exact_json", lambda raw: None)
            m.setattr(transactions, "_plain_text", lambda item: False)
            slow = reparse_outcome(envelope)
        assert same(fast, slow), bytes(envelope.data)[:200]
    assert all(isinstance(reparse_outcome(e), TxEnvelope) for e in envelopes)

"""The poison matrix at ingest: each bad transaction is rejected naming the field, alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest

from services.ingester.pages import BadPage, split_page
from shared.envelope import INGESTED_EVENT_NAMESPACE, bet_event_id, ingested_event_id
from shared.events import decode_data
from shared.transactions import Rejected, parse_transaction

GOOD = b'{"id": "t1", "type": "bet", "amount": "2.50", "game": "dice", "created_at": "2026-01-01T00:00:00Z"}'


def tx(**fields: object) -> bytes:
    base: dict[str, object] = {
        "id": "t9",
        "type": "deposit",
        "amount": "1",
        "created_at": "2026-01-01T00:00:00Z",
    }
    base.update(fields)
    return msgspec.json.encode({k: v for k, v in base.items() if v is not ...})


POISON = [
    (b'{"id": "p", "type": "deposit", "amount": NaN, "created_at": "2026-01-01T00:00:00Z"}', "amount"),
    (b'{"id": "p", "type": "deposit", "amount": Infinity, "created_at": "2026-01-01T00:00:00Z"}', "amount"),
    (b'{"id": "p", "type": "deposit", "amount": 1e309, "created_at": "2026-01-01T00:00:00Z"}', "amount"),
    (tx(amount="NaN"), "amount"),
    (tx(amount="-Infinity"), "amount"),
    (
        b'{"id": "p", "type": "deposit", "amount": 1'
        + b"0" * 400
        + b', "created_at": "2026-01-01T00:00:00Z"}',
        "amount",
    ),
    (tx(amount="-5"), "amount"),
    (tx(amount=True), "amount"),
    (tx(amount=None), "amount"),
    (tx(amount=[1]), "amount"),
    (tx(amount={"v": 1}), "amount"),
    (tx(amount="12abc"), "amount"),
    (tx(id=...), "id"),
    (tx(type=...), "type"),
    (tx(created_at="yesterday"), "created_at"),
    (
        b'{"id": "p", "type": "deposit", "amount": "1", "amount": "2", "created_at": "2026-01-01T00:00:00Z"}',
        "amount",
    ),
    (tx(memo="x" * (2 * 1024 * 1024)), "transaction"),
    (
        b'{"id": "p", "type": "deposit", "amount": "1", "memo": "\xff\xfe", '
        b'"created_at": "2026-01-01T00:00:00Z"}',
        "UTF-8",
    ),
    (
        b'{"id": "p", "type": "deposit", "amount": "1", "memo": "\\ud800", '
        b'"created_at": "2026-01-01T00:00:00Z"}',
        "surrogate",
    ),
    (
        b'{"id": "p", "type": "deposit", "amount": "1", "memo": "a\\u0000b", '
        b'"created_at": "2026-01-01T00:00:00Z"}',
        "NUL",
    ),
    (b'{"id": "p", "type": "deposit", "amount": "1", "deep": ' + b"[" * 10000 + b"]" * 10000 + b"}", "nest"),
    (tx(type="trade", side="hold", instrument="BTC", quantity="1"), "side"),
    (tx(type="swap", to_asset="USDC"), "to_amount"),
    (tx(asset="not an asset!"), "asset"),
    (b'["not", "an", "object"]', "object"),
]


@pytest.mark.parametrize(("raw", "field"), POISON, ids=[f"{i}-{f}" for i, (_, f) in enumerate(POISON)])
def test_each_poison_transaction_is_rejected_with_a_reason(raw: bytes, field: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_transaction(raw, "agent-1", "casino")
    assert field.lower() in info.value.reason.lower()


def test_a_poison_item_is_split_from_its_neighbours_even_when_the_page_is_not_strict_json() -> None:
    page = (
        b'{"transactions": ['
        + b", ".join([GOOD, POISON[0][0], POISON[18][0], GOOD.replace(b"t1", b"t2")])
        + b"]}"
    )
    items = split_page(page).items
    assert len(items) == 4
    assert parse_transaction(items[0], "a", "pf").tx_id == "t1"
    assert parse_transaction(items[3], "a", "pf").tx_id == "t2"
    for bad in items[1:3]:
        with pytest.raises(Rejected):
            parse_transaction(bad, "a", "pf")


def test_a_body_that_is_no_page_at_all_is_a_bad_page() -> None:
    with pytest.raises(BadPage):
        split_page(b"<html>502 Bad Gateway</html>")
    with pytest.raises(BadPage):
        split_page(b'{"transactions": [' + GOOD)  # truncated


def test_numbers_are_exact_and_unknown_fields_are_kept() -> None:
    env = parse_transaction(
        b'{"id": 7, "type": "win", "amount": 0.1, "game": "dice", "created_at": "2026-01-01T00:00:00+02:00",'
        b' "round": {"seed": "abc", "multiplier": 2.5}}',
        "agent-1",
        "purpleflea",
    )
    event = decode_data(env.event_type, bytes(env.data))
    assert env.event_type == "BetWon" and env.tx_id == "7"
    assert event.amount == Decimal("0.1")  # type: ignore[attr-defined]
    assert event.extra == {"round": {"seed": "abc", "multiplier": "2.5"}}


def test_an_unknown_type_is_kept_as_an_event_not_dropped() -> None:
    env = parse_transaction(tx(type="airdrop_v2", amount="3", foo="bar"), "agent-1", "casino")
    event = decode_data(env.event_type, bytes(env.data))
    assert env.event_type == "UnknownTransaction"
    assert event.source_type == "airdrop_v2" and event.raw["foo"] == "bar"  # type: ignore[attr-defined]


def test_the_event_id_is_derived_from_feed_agent_and_transaction_id() -> None:
    a = parse_transaction(GOOD, "agent-1", "casino")
    b = parse_transaction(GOOD, "agent-1", "casino")
    other_feed = parse_transaction(GOOD, "agent-1", "faucet")
    other_agent = parse_transaction(GOOD, "agent-2", "casino")
    assert a.event_id == b.event_id
    assert len({a.event_id, other_feed.event_id, other_agent.event_id}) == 3
    assert a.event_id == uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"casino:agent-1:{a.tx_id}")


def test_a_casino_bet_carrying_its_bet_id_is_known_by_it_on_the_casino_feed_only() -> None:
    bet = tx(type="bet", amount="2", game="dice", bet_id="b-1")
    win = tx(type="win", amount="4", game="dice", bet_id="b-1", id="t-2")
    assert parse_transaction(bet, "agent-1", "casino").event_id == bet_event_id("agent-1", "b-1", won=False)
    assert parse_transaction(win, "agent-1", "casino").event_id == bet_event_id("agent-1", "b-1", won=True)
    assert parse_transaction(bet, "agent-1", "trading").event_id == ingested_event_id(
        "trading", "agent-1", "t9"
    )
    plain = tx(type="bet", amount="2", game="dice")
    assert parse_transaction(plain, "agent-1", "casino").event_id == ingested_event_id(
        "casino", "agent-1", "t9"
    )


@pytest.mark.parametrize("created_at", [..., None], ids=["missing", "null"])
def test_a_transaction_without_created_at_is_kept_as_first_seen_and_marked(created_at: object) -> None:
    before = datetime.now(UTC)
    env = parse_transaction(tx(created_at=created_at, type="bet", game="dice"), "agent-1", "casino")
    after = datetime.now(UTC)
    event = decode_data(env.event_type, bytes(env.data))
    assert env.event_type == "BetPlaced" and event.amount == Decimal("1")  # type: ignore[attr-defined]
    assert before <= env.occurred_at <= after
    assert event.extra == {"occurred_at_source": "first_seen"}
    unknown = parse_transaction(tx(created_at=created_at, type="airdrop_v3"), "agent-1", "casino")
    assert decode_data(unknown.event_type, bytes(unknown.data)).extra == {"occurred_at_source": "first_seen"}


def test_a_transaction_with_created_at_is_not_marked() -> None:
    env = parse_transaction(tx(), "agent-1", "casino")
    assert env.occurred_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert decode_data(env.event_type, bytes(env.data)).extra == {}


@pytest.mark.parametrize("created_at", [123, "", "yesterday", ["2026-01-01"]])
def test_a_created_at_that_is_present_but_malformed_is_rejected_naming_it(created_at: object) -> None:
    with pytest.raises(Rejected) as info:
        parse_transaction(tx(created_at=created_at), "agent-1", "casino")
    assert info.value.reason.startswith("created_at:") and info.value.tx_id == "t9"


@pytest.mark.parametrize(
    "fields",
    [
        {"asset": None},
        {"asset": ...},
        {"type": "bet", "game": None},
        {"type": "withdraw", "address": None},
        {"type": "escrow_release", "escrow_id": ...},
        {"type": "transfer_in", "chain": None, "address": ...},
        {"type": "trade", "side": "buy", "instrument": "BTC", "quantity": "0.1", "price": None},
        {"type": "register", "name": None, "amount": ...},
        {"type": "airdrop_v3", "amount": None},
        {"agent_id": None},
    ],
)
def test_a_missing_or_null_optional_field_does_not_reject_the_transaction(fields: dict[str, object]) -> None:
    env = parse_transaction(tx(**fields), "agent-1", "casino")
    event = decode_data(env.event_type, bytes(env.data))
    if "amount" not in fields:
        assert event.asset == "PFLEA"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"type": "trade", "side": "buy", "quantity": "1"}, "instrument"),
        ({"type": "trade", "side": "buy", "instrument": "BTC"}, "quantity"),
        ({"type": "trade", "instrument": "BTC", "quantity": "1"}, "side"),
        ({"type": "swap", "to_amount": "1"}, "to_asset"),
        ({"type": "swap", "to_amount": "1", "to_asset": None}, "to_asset"),
        ({"type": "domain_purchase"}, "domain"),
        ({"amount": ...}, "amount"),
    ],
)
def test_a_field_the_money_effect_needs_is_required(fields: dict[str, object], field: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_transaction(tx(**fields), "agent-1", "casino")
    assert info.value.reason.startswith(f"{field}:")

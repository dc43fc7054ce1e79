"""Money is exact, and every amount a ledger must not store is rejected naming its field."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from shared.money import MoneyError, parse_amount, to_text


def test_decimal_sums_stay_exact() -> None:
    assert parse_amount("0.1") + parse_amount("0.2") == Decimal("0.3")


def test_eighteen_decimal_places_survive_parsing() -> None:
    assert to_text(parse_amount("12345678901234567890.123456789012345678")) == (
        "12345678901234567890.123456789012345678"
    )


def test_json_numbers_are_read_as_decimals_not_floats() -> None:
    decoded = msgspec.json.Decoder(float_hook=Decimal).decode(b'{"amount": 0.1}')
    assert parse_amount(decoded["amount"]) == Decimal("0.1")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("NaN", "decimal number"),
        ("nan", "decimal number"),
        ("Infinity", "decimal number"),
        ("-Infinity", "decimal number"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (Decimal("1e309"), "integer digits"),
        ("1e309", "integer digits"),
        (10**400, "integer digits"),
        ("12abc", "decimal number"),
        ("", "decimal number"),
        ("0x10", "decimal number"),
        (True, "boolean"),
        (False, "boolean"),
        (None, "NoneType"),
        ([1], "list"),
        ({"v": 1}, "dict"),
        (0.5, "binary floats"),
        ("-5", "negative"),
        ("1" * 21, "integer digits"),
        ("0.1234567890123456789", "decimal places"),
        ("1" * 100, "decimal number"),
    ],
)
def test_rejected_amounts_name_the_field(value: object, reason: str) -> None:
    with pytest.raises(MoneyError) as info:
        parse_amount(value, field="amount")
    assert str(info.value).startswith("amount: ")
    assert reason in str(info.value)
    assert info.value.field == "amount"


def test_trailing_zeros_beyond_scale_are_not_a_rounding() -> None:
    assert parse_amount("1.50000000000000000000") == Decimal("1.5")


def test_negative_allowed_only_when_asked() -> None:
    assert parse_amount("-2.5", allow_negative=True) == Decimal("-2.5")


def test_sums_of_large_amounts_with_full_scale_are_not_rounded() -> None:
    big = parse_amount("99999999999999999999.999999999999999999")
    tiny = parse_amount("0.000000000000000001")
    assert to_text(big + tiny) == "100000000000000000000.000000000000000000"
    assert to_text(big - big + tiny) == "0.000000000000000001"
    assert (big + tiny) - tiny == big

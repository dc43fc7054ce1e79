"""How figures read to a person: amounts in plain notation, ratios as percentages."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from shared.display import cell, percent


@pytest.mark.parametrize(
    ("ratio", "shown"),
    [
        (Decimal("0.523000000000000000"), "52.30 %"),
        (Decimal("0.333333333333333333"), "33.33 %"),
        (Decimal("0.000050000000000000"), "0.00 %"),  # half-even: 0.005 % rounds to the even 0.00
        (Decimal("0.000150000000000000"), "0.02 %"),
        (Decimal("-0.250000000000000000"), "-25.00 %"),
        (Decimal("12"), "1200.00 %"),
        (Decimal("1E-18"), "0.00 %"),
        (Decimal("-0.000001"), "0.00 %"),
    ],
)
def test_a_ratio_reads_as_a_percentage_to_a_hundredth(ratio: Decimal, shown: str) -> None:
    assert percent(ratio) == shown


def test_nothing_reads_as_the_missing_mark() -> None:
    assert percent(None) == cell(None) == "-"
    assert percent(None, missing="–") == "–"


def test_an_amount_never_reads_with_an_exponent() -> None:
    assert cell(Decimal("1E+3")) == "1000"
    assert cell(Decimal("1E-18")) == "0.000000000000000001"
    assert cell(datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)) == "2026-01-02T03:04:05+00:00"

"""How a value reads to a person, in the CLI's tables and the explorer's pages alike: amounts in
plain notation (never an exponent), times to the second, a mark for nothing."""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from shared.money import to_text


def cell(value: Any, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, Decimal):
        return to_text(value)
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


_HUNDREDTH = Decimal("0.01")


def percent(ratio: Decimal | None, missing: str = "-") -> str:
    """A ratio (win rate, ROI: stored to 18 places) as a person reads it: ``0.523`` -> ``52.30 %``,
    rounded half-even to a hundredth of a percent. The exact ratio stays in the read model."""
    if ratio is None:
        return missing
    shown = (ratio * 100).quantize(_HUNDREDTH, rounding=ROUND_HALF_EVEN)
    return f"{to_text(shown if shown else abs(shown))} %"  # never "-0.00 %"

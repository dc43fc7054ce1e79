"""How a value reads to a person, in the CLI's tables and the explorer's pages alike: amounts in
plain notation (never an exponent), times to the second, a mark for nothing."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
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

"""Exact money: ``Decimal`` in Python, ``NUMERIC(38, 18)`` in Postgres, strings in JSON.

A float never becomes an amount. Parsing rejects what a ledger must never store: NaN,
infinities, overflowed exponents such as ``1e309``, booleans, non-numeric strings, and values
that do not fit the column (more than 20 integer digits or 18 decimal places).
"""

from __future__ import annotations

import decimal
import re
from decimal import Context, Decimal, InvalidOperation

MAX_INTEGER_DIGITS = 20
MAX_SCALE = 18
MAX_TEXT_LENGTH = 64

# Wide enough that no accepted amount is ever rounded by an operation on two amounts.
MONEY_CONTEXT = Context(prec=60, Emax=999, Emin=-999)


def use_exact_arithmetic() -> None:
    """Make ``+``/``-`` on amounts exact in this thread and every thread started after.

    Python's default context keeps 28 significant digits, and an amount may have 20 integer
    digits and 18 decimals (38): a sum would silently round. 80 digits keep sums of amounts
    exact far beyond any balance a ledger will hold.
    """
    for context in (decimal.DefaultContext, decimal.getcontext()):
        context.prec = 80
        context.Emax = 999_999
        context.Emin = -999_999
        context.traps[decimal.Inexact] = False


use_exact_arithmetic()

_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,4})?")


class MoneyError(ValueError):
    """An amount was rejected; ``field`` names the offending input field."""

    def __init__(self, field: str, reason: str, value: object = None) -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{field}: {reason} (got {shown})")
        self.field = field
        self.reason = reason


def parse_amount(value: object, field: str = "amount", *, allow_negative: bool = False) -> Decimal:
    """Turn a JSON-decoded amount (decimal string, int or Decimal) into an exact ``Decimal``."""
    if isinstance(value, bool):
        raise MoneyError(field, "must be a number or decimal string, not a boolean", value)
    if isinstance(value, float):
        raise MoneyError(field, "binary floats are not accepted; send a decimal string", value)
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, Decimal):
        amount = value
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_TEXT_LENGTH or not _DECIMAL_TEXT.fullmatch(text):
            raise MoneyError(field, "is not a decimal number", value)
        try:
            amount = Decimal(text)
        except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid text
            raise MoneyError(field, "is not a decimal number", value) from exc
    else:
        raise MoneyError(field, f"must be a number or decimal string, not {type(value).__name__}", value)
    return check_amount(amount, field, allow_negative=allow_negative)


def check_amount(amount: Decimal, field: str = "amount", *, allow_negative: bool = False) -> Decimal:
    """Validate an already-``Decimal`` amount against the ledger's range and scale."""
    if not amount.is_finite():
        raise MoneyError(field, "must be finite (NaN and Infinity are rejected)", amount)
    if amount.is_signed() and not amount.is_zero() and not allow_negative:
        raise MoneyError(field, "must not be negative", amount)
    sign, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)
    if amount.adjusted() >= MAX_INTEGER_DIGITS:
        raise MoneyError(field, f"has more than {MAX_INTEGER_DIGITS} integer digits", amount)
    if exponent < -MAX_SCALE:
        # Trailing zeros beyond the scale are harmless; anything else would be rounded by NUMERIC.
        normal = amount.normalize(MONEY_CONTEXT)
        normal_exp = normal.as_tuple().exponent
        assert isinstance(normal_exp, int)
        if normal_exp < -MAX_SCALE:
            raise MoneyError(field, f"has more than {MAX_SCALE} decimal places", amount)
        amount = amount.quantize(Decimal(1).scaleb(-MAX_SCALE), context=MONEY_CONTEXT)
    # A canonical, exponent-free form, so equal amounts have equal text.
    return amount + 0 if amount.is_zero() else amount


def to_text(amount: Decimal) -> str:
    """The canonical JSON form of an amount: plain notation, never an exponent."""
    return format(amount, "f")

"""Transactions the ledger must refuse (quarantine), each still inside valid JSON text.

A malformed item is a deposit spoiled in one way, cycling through :data:`KINDS` per agent. It
never changes the simulated wallet, so the ground truth's balances are the fold of the
well-formed items only; whatever the ledger does with these must leave its balances equal.
"""

from __future__ import annotations

import random
from decimal import Decimal
from functools import cache

from . import rawjson
from .content import Draft, draw_amount
from .rawjson import Pairs, Value

HUGE_STRING_BYTES = 2 * 1024 * 1024

# The amount fragment each amount kind writes, verbatim.
_AMOUNTS: dict[str, bytes] = {
    "amount_nan": b'"NaN"',
    "amount_infinity": b'"Infinity"',
    "amount_negative_infinity": b'"-Infinity"',
    "amount_overflow_1e309": b"1e309",
    "amount_400_digits": b"9" + b"0" * 399,
    "amount_true": b"true",
    "amount_null": b"null",
    "amount_list": b"[1]",
    "amount_object": b'{"v":1}',
    "amount_text": b'"12abc"',
}

# Bad text in a field the ledger keeps (extra fields are stored with the event).
_MEMOS: dict[str, Value] = {
    "nul_in_string": b'"before\\u0000after"',
    # A lone high surrogate: legal JSON grammar, but no Unicode string can hold it.
    "lone_surrogate": b'"broken \\ud800 text"',
}

KINDS: tuple[str, ...] = (
    *_AMOUNTS,
    "amount_negative",
    "missing_id",
    "missing_type",
    "huge_string",
    *_MEMOS,
    "duplicate_amount_key",
)


@cache
def _huge_string() -> bytes:
    # One shared object however many items carry it; see rawjson.render.
    return b'"' + b"x" * HUGE_STRING_BYTES + b'"'


class MalformedItem:
    """The rendered parts of a malformed transaction and what it claims to be."""

    __slots__ = ("parts", "id", "type")

    def __init__(self, parts: tuple[bytes, ...], tx_id: str | None, tx_type: str | None) -> None:
        self.parts = parts
        self.id = tx_id
        self.type = tx_type


def _replace(pairs: Pairs, key: str, value: Value) -> Pairs:
    return [(k, value if k == key else v) for k, v in pairs]


def _without(pairs: Pairs, key: str) -> Pairs:
    return [(k, v) for k, v in pairs if k != key]


def _spoil(kind: str, pairs: Pairs, amount: Decimal, other: Decimal) -> Pairs:
    if kind in _AMOUNTS:
        return _replace(pairs, "amount", _AMOUNTS[kind])
    if kind in _MEMOS:
        return [*pairs, ("memo", _MEMOS[kind])]
    match kind:
        case "amount_negative":
            return _replace(pairs, "amount", rawjson.string(f"-{amount}"))
        case "missing_id":
            return _without(pairs, "id")
        case "missing_type":
            return _without(pairs, "type")
        case "huge_string":
            return [*pairs, ("memo", (_huge_string(),))]
        case "duplicate_amount_key":
            # Parsers disagree on which of two equal keys wins; the ledger must not guess.
            at = next(i for i, (k, _) in enumerate(pairs) if k == "amount") + 1
            return [*pairs[:at], ("amount", rawjson.string(str(other))), *pairs[at:]]
    raise ValueError(f"unknown malformed kind {kind!r}")


def malformed_item(kind: str, rng: random.Random, tx_id: str, created_at: str) -> MalformedItem:
    """A deposit spoiled by ``kind``; amounts come from ``rng`` (the agent's wire stream)."""
    amount = draw_amount(rng, "PFLEA", Decimal(1), Decimal(500))
    other = draw_amount(rng, "PFLEA", Decimal(501), Decimal(100_000))
    assert amount is not None and other is not None
    pairs = rawjson.tx_pairs(tx_id, Draft("deposit", amount), created_at, numeric_amount=False)
    pairs = _spoil(kind, pairs, amount, other)
    return MalformedItem(
        rawjson.render(pairs),
        None if kind == "missing_id" else tx_id,
        None if kind == "missing_type" else "deposit",
    )

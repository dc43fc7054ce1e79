"""JSON text built by hand, fragment by fragment, so every item is exactly what we meant.

A normal encoder cannot write what the fault cases need (``1e309``, duplicate keys, a lone
``\\ud800`` escape, a 400-digit integer) and would turn ``Decimal`` amounts into whatever it
prefers. Each item is kept as a tuple of byte parts; a page is the parts joined. Large parts
(the 2 MB string) stay their own shared ``bytes`` object instead of being copied into every item
that holds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

import msgspec

from shared.money import to_text

from .content import Draft

# A value is one JSON fragment, or several parts to be written back to back.
Value = bytes | tuple[bytes, ...]
Pairs = list[tuple[str, Value]]

_SHARED_PART = 64 * 1024
_encode = msgspec.json.encode


def string(text: str) -> bytes:
    return _encode(text)


def number(amount: Decimal) -> bytes:
    """A JSON number written in plain decimal notation, exactly as many digits as ``amount``."""
    return to_text(amount).encode()


def render(pairs: Iterable[tuple[str, Value]]) -> tuple[bytes, ...]:
    """The parts of a JSON object with the given members, in order, duplicates kept."""
    parts: list[bytes] = []
    pending = bytearray(b"{")
    for i, (key, value) in enumerate(pairs):
        if i:
            pending += b","
        pending += string(key) + b":"
        for part in value if isinstance(value, tuple) else (value,):
            if len(part) >= _SHARED_PART:
                parts.append(bytes(pending))
                parts.append(part)
                pending = bytearray()
            else:
                pending += part
    pending += b"}"
    parts.append(bytes(pending))
    return tuple(parts)


def tx_pairs(tx_id: str, draft: Draft, created_at: str, *, numeric_amount: bool) -> Pairs:
    """The members of a well-formed transaction in the Purple Flea feed's field order."""
    amount = number(draft.amount) if numeric_amount else string(to_text(draft.amount))
    pairs: Pairs = [
        ("id", string(tx_id)),
        ("type", string(draft.type)),
        ("amount", amount),
        ("asset", string(draft.asset)),
    ]
    for key, value in draft.fields:
        pairs.append((key, string(to_text(value) if isinstance(value, Decimal) else value)))
    pairs.append(("created_at", string(created_at)))
    return pairs


def envelope(key: str, items: Iterable[tuple[bytes, ...]]) -> bytes:
    """``{"<key>": [item, item, ...]}`` with each item's parts copied verbatim."""
    chunks: list[bytes] = [b"{", string(key), b":["]
    for i, parts in enumerate(items):
        if i:
            chunks.append(b",")
        chunks.extend(parts)
    chunks.append(b"]}")
    return b"".join(chunks)

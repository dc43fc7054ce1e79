"""Split a page of transactions into each item's raw bytes, even when items are not valid JSON.

The fast path is msgspec: a clean page is decoded at once, to each item's raw bytes and to its
values, and proven plain (:func:`shared.transactions.written_plainly`), so no item of it is
parsed again. A page that is valid JSON but not plain (spaces, escapes, a duplicate key, nested
values) is split by msgspec and each item judged on its own. When any item is malformed (NaN
tokens, lone surrogates, invalid UTF-8, absurd nesting) msgspec rejects the whole page, so a
byte scanner finds the item boundaries instead: one bad item is quarantined on its own and its
neighbours still flow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.transactions import PLAIN_ENCODER, PLAIN_FLOAT_HOOK, flat, written_plainly


class BadPage(Exception):
    """A body that is not ``{"transactions": [...]}`` at all; ``body`` is kept for quarantine."""

    def __init__(self, reason: str, body: bytes) -> None:
        super().__init__(reason)
        self.body = body


@dataclass(frozen=True, slots=True)
class Page:
    items: list[bytes]  # each transaction's raw JSON, exactly as received
    # The items decoded, when the whole page is plain; None: each item is decoded on its own.
    plain: list[dict[str, Any]] | None = None


class _Page(msgspec.Struct):
    transactions: list[msgspec.Raw]


class _PlainPage(msgspec.Struct):
    transactions: list[dict[str, Any]]


_decoder = msgspec.json.Decoder(_Page)
_plain_decoder = msgspec.json.Decoder(_PlainPage, float_hook=PLAIN_FLOAT_HOOK)
_ARRAY_START = re.compile(rb'"transactions"\s*:\s*\[')
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")
_WS = frozenset(b" \t\r\n")


def split_page(body: bytes) -> Page:
    try:
        page = _decoder.decode(body)
        return Page([bytes(raw) for raw in page.transactions], _plain(body))
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        # msgspec raises RecursionError (not DecodeError) past its nesting limit: one item
        # nested 10 000 deep must not take the whole page, and the agent's poller, with it.
        items = scan_items(body)
        if items is None:
            raise BadPage(f"page: not a transactions list ({exc})", body) from None
        return Page(items)


def _plain(body: bytes) -> list[dict[str, Any]] | None:
    """The page's items decoded, if the whole body is exactly the plain writing of them."""
    try:
        page = _plain_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    items = page.transactions
    # Every item is an object, so the page holds no nested object or array if it has no other
    # brace or bracket (counted at C speed); if some string holds one, each item is looked at.
    bare = body.count(b"{") == len(items) + 1 and body.count(b"[") == 1
    if not bare and not all(map(flat, items)):
        return None
    if not written_plainly(PLAIN_ENCODER.encode(page), body):
        return None
    return items


def scan_items(body: bytes) -> list[bytes] | None:
    """The top-level elements of the ``transactions`` array, by bracket and string tracking."""
    match = _ARRAY_START.search(body)
    if match is None:
        return None
    items: list[bytes] = []
    depth, in_string, escaped, start = 0, False, False, -1
    for i in range(match.end(), len(body)):
        c = body[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
            continue
        if c == 0x22:
            in_string = True
            if start < 0:
                start = i
        elif c in _OPEN:
            if start < 0:
                start = i
            depth += 1
        elif c in _CLOSE:
            if depth == 0:  # the array's own closing bracket
                if start >= 0:
                    items.append(body[start:i].rstrip())
                return items
            depth -= 1
        elif c == 0x2C and depth == 0:  # a comma between items
            if start >= 0:
                items.append(body[start:i].rstrip())
            start = -1
        elif start < 0 and c not in _WS:
            start = i
    return None  # the array never closed: a truncated body

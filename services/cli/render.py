"""How the CLI shows answers: aligned tables for people, JSON (amounts as strings) for machines."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from shared.display import cell
from shared.money import to_text


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return to_text(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, msgspec.Struct):
        return _plain(msgspec.to_builtins(value, builtin_types=(Decimal, datetime, uuid.UUID)))
    return value


def to_json(value: Any) -> str:
    """JSON with every amount as plain decimal text: a float never carries money."""
    return msgspec.json.encode(_plain(value)).decode()


def print_json(value: Any) -> None:
    print(to_json(value), flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str = "(none)") -> None:
    if not rows:
        print(empty)
        return
    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in text:
        # Numbers right-aligned so that the decimal points of equal scales line up.
        print("  ".join(_align(v, w) for v, w in zip(row, widths, strict=True)).rstrip())


def _align(value: str, width: int) -> str:
    numeric = value.lstrip("-").replace(".", "", 1).isdigit()
    return value.rjust(width) if numeric else value.ljust(width)


def fail(message: str, code: int = 1) -> int:
    print(f"pflea: {message}", file=sys.stderr)
    return code

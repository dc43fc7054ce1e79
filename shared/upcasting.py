"""Upcasters, and the one policy for turning a stored event into a catalogue event.

Stored events are never rewritten; every reader gets the current shape because the
``EventStore`` runs the chain ``v -> v+1 -> ... -> current`` on read.

**Decode policy** (:func:`decode_event`, used by every reader: the store, the relay, projectors
and their gap fill, rebuilds, time travel): an event no upcaster can lift, or whose data does not
fit its type, is *unreadable*. It stays in the log as stored and is relayed as stored (with its
stored schema version); a fold skips it, and projectors and rebuilds also quarantine it with the
reason. No reader stops on it.

Stored data is read with numbers as ``Decimal`` from their text (the article's amounts are JSON
numbers), so no amount ever passes through a binary float on its way to the current shape.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import msgspec

from shared.events import (
    ARTICLE_SCHEMA_VERSION,
    CURRENT_SCHEMA_VERSION,
    EVENT_TYPES,
    Event,
    MoneyEvent,
    UnknownEventType,
    decode_data,
    plain_json,
)

Data = dict[str, Any]
Upcaster = Callable[[Data], Data]

# (event type, from version) -> (upcaster, the version it lifts to)
_UPCASTERS: dict[tuple[str, int], tuple[Upcaster, int]] = {}
# Numbers with a fraction or exponent become Decimal from their own text, never a float.
_decoder = msgspec.json.Decoder(float_hook=Decimal)
_encoder = msgspec.json.Encoder()


class UpcastError(ValueError):
    pass


def upcaster(
    event_type: str, from_version: int, to_version: int | None = None
) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as lifting ``event_type`` from ``from_version`` to ``to_version``
    (default: the next version)."""
    target = from_version + 1 if to_version is None else to_version

    def register(fn: Upcaster) -> Upcaster:
        if not from_version < target <= CURRENT_SCHEMA_VERSION.get(event_type, 1):
            raise UpcastError(
                f"{event_type}: bump CURRENT_SCHEMA_VERSION before adding an upcaster from v{from_version}"
            )
        _UPCASTERS[(event_type, from_version)] = (fn, target)
        return fn

    return register


def missing_upcasters() -> list[tuple[str, int]]:
    """Steps below a current schema version that no upcaster covers (should be empty)."""
    return [
        (event_type, v)
        for event_type, current in CURRENT_SCHEMA_VERSION.items()
        for v in range(1, current)
        if (event_type, v) not in _UPCASTERS
    ] + [(event_type, ARTICLE_SCHEMA_VERSION) for event_type in EVENT_TYPES if not _from_article(event_type)]


def _from_article(event_type: str) -> bool:
    return (event_type, ARTICLE_SCHEMA_VERSION) in _UPCASTERS


class UnreadableEvent(ValueError):
    """A stored event no fold can read; see the decode policy above."""


def decode_event(event_type: str, schema_version: int, data: str | bytes) -> Event:
    """The catalogue event of stored (or delivered) data; ``UnreadableEvent`` naming why not."""
    try:
        current, _ = upcast(event_type, schema_version, data)
        return decode_data(event_type, current)
    except (UpcastError, UnknownEventType, msgspec.MsgspecError, KeyError, TypeError, ValueError) as exc:
        raise UnreadableEvent(f"{event_type} (schema v{schema_version}): {exc}") from None


def upcast(event_type: str, schema_version: int, data: str | bytes) -> tuple[str, int]:
    """Return ``(data, schema_version)`` in the current shape; unchanged if already current."""
    current = CURRENT_SCHEMA_VERSION.get(event_type, 1)
    if schema_version >= current:
        return (data if isinstance(data, str) else data.decode()), schema_version
    obj = _decoder.decode(data)
    if not isinstance(obj, dict):
        raise UpcastError(f"data: expected a JSON object, got {type(obj).__name__}")
    version = schema_version
    while version < current:
        step = _UPCASTERS.get((event_type, version))
        if step is None:
            raise UpcastError(f"no upcaster for {event_type} from schema_version {version}")
        fn, version = step
        obj = fn(obj)
    return _encoder.encode(plain_json(obj)).decode(), version


# --- the catalogue's history -------------------------------------------------------------------


@upcaster("BetPlaced", 1)
def _bet_placed_v1_stake_to_amount(data: Data) -> Data:
    """v1 (this ledger's first shape, not the article's) called the amount ``stake`` and had no
    asset: it was always PFLEA."""
    lifted = {k: v for k, v in data.items() if k != "stake"}
    lifted["amount"] = data["stake"]
    lifted.setdefault("asset", "PFLEA")
    return lifted


# --- the article's shapes (schema v0, brought in by ``pflea import sqlite``) ---------------------
# README, "Importing the article's event store": the mapping table these implement.

ARTICLE_ASSET = "PFLEA"  # the article knows one currency and writes no asset
ARTICLE_UNKNOWN_GAME = "unknown"  # what the article's own BetPlaced upcaster fills in


def _article_lift(event_type: str) -> Upcaster:
    cls = EVENT_TYPES[event_type]
    fields = set(cls.__struct_fields__)
    money = issubclass(cls, MoneyEvent)

    def lift(data: Data) -> Data:
        obj = dict(data)
        if event_type == "FeeCharged" and "amount" not in obj and "fee" in obj:
            obj["amount"] = obj.pop("fee")  # its projections read ``fee``, its ingester writes ``amount``
        if event_type == "BetPlaced" and obj.get("game") is None:
            obj["game"] = ARTICLE_UNKNOWN_GAME
        if money:
            asset = obj.get("asset")
            obj["asset"] = asset.upper() if isinstance(asset, str) else ARTICLE_ASSET
        if isinstance(obj.get("tx_id"), int) and not isinstance(obj["tx_id"], bool):
            obj["tx_id"] = str(obj["tx_id"])  # ids the article kept as JSON numbers
        extra = obj.pop("extra", None)
        extra = dict(extra) if isinstance(extra, dict) else ({} if extra is None else {"extra": extra})
        extra.update({k: obj.pop(k) for k in list(obj) if k not in fields})
        if extra:
            obj["extra"] = extra
        return obj

    return lift


for _event_type in EVENT_TYPES:
    upcaster(_event_type, ARTICLE_SCHEMA_VERSION, CURRENT_SCHEMA_VERSION.get(_event_type, 1))(
        _article_lift(_event_type)
    )

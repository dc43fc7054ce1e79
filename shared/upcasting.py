"""Upcasters, and the one policy for turning a stored event into a catalogue event.

Stored events are never rewritten; every reader gets the current shape because the
``EventStore`` runs the chain ``v -> v+1 -> ... -> current`` on read.

**Decode policy** (:func:`decode_event`, used by every reader: the store, the relay, projectors
and their gap fill, rebuilds, time travel): an event no upcaster can lift, or whose data does not
fit its type, is *unreadable*. It stays in the log as stored and is relayed as stored (with its
stored schema version); a fold skips it, and projectors and rebuilds also quarantine it with the
reason. No reader stops on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from shared.events import CURRENT_SCHEMA_VERSION, Event, UnknownEventType, decode_data

Data = dict[str, Any]
Upcaster = Callable[[Data], Data]

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class UpcastError(ValueError):
    pass


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register ``fn`` as lifting ``event_type`` from ``from_version`` to ``from_version + 1``."""

    def register(fn: Upcaster) -> Upcaster:
        if from_version >= CURRENT_SCHEMA_VERSION.get(event_type, 1):
            raise UpcastError(
                f"{event_type}: bump CURRENT_SCHEMA_VERSION before adding an upcaster from v{from_version}"
            )
        _UPCASTERS[(event_type, from_version)] = fn
        return fn

    return register


def missing_upcasters() -> list[tuple[str, int]]:
    """Steps below a current schema version that no upcaster covers (should be empty)."""
    return [
        (event_type, v)
        for event_type, current in CURRENT_SCHEMA_VERSION.items()
        for v in range(1, current)
        if (event_type, v) not in _UPCASTERS
    ]


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
    obj: Data = msgspec.json.decode(data)
    version = schema_version
    while version < current:
        fn = _UPCASTERS.get((event_type, version))
        if fn is None:
            raise UpcastError(f"no upcaster for {event_type} from schema_version {version}")
        obj = fn(obj)
        version += 1
    return msgspec.json.encode(obj).decode(), version


# --- the catalogue's history -------------------------------------------------------------------


@upcaster("BetPlaced", 1)
def _bet_placed_v1_stake_to_amount(data: Data) -> Data:
    """v1 (the seed's format) called the amount ``stake`` and had no asset: it was always PFLEA."""
    lifted = {k: v for k, v in data.items() if k != "stake"}
    lifted["amount"] = data["stake"]
    lifted.setdefault("asset", "PFLEA")
    return lifted

"""A validated transaction ready to be an event (:class:`TxEnvelope`), and its identity.

PFLEA_TX carries envelopes in batches; that wire format is ``shared.wire``'s.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

import msgspec

from shared.settings import CASINO_FEED
from shared.store import NewEvent

# Fixed forever: the namespace of every event id derived from a Purple Flea fact.
INGESTED_EVENT_NAMESPACE = uuid.UUID("5b0f1c1e-7a52-4b8e-9d2f-70666c656130")
_NAMESPACE_BYTES = INGESTED_EVENT_NAMESPACE.bytes
# RFC 4122 version 5 and variant bits, set in the SHA-1 digest's first 16 bytes.
_VERSION_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_VERSION_SET = (5 << 76) | (0x8000 << 48)
# The feed faucet claims (POST /claim) are matched against by their tx_id.
FAUCET_FEED = "faucet"


def ingested_event_id(feed: str, agent_id: str, tx_id: str) -> uuid.UUID:
    """The event id of transaction ``tx_id`` of ``agent_id`` on ``feed``: the database's
    idempotency key. A tx id is unique only within one feed of one agent, so all three count:
    ``uuid5(INGESTED_EVENT_NAMESPACE, "<feed>:<agent>:<tx id>")``."""
    return _uuid5(f"{feed}:{agent_id}:{tx_id}")


def bet_event_id(agent_id: str, bet_id: str, won: bool) -> uuid.UUID:
    """The event id of a casino bet's BetPlaced (``won=False``) or BetWon, from its ``bet_id``.

    ``POST /bet`` answers a bet_id but no transaction id, so a bet is known by its bet_id
    whichever way it arrives, the command's answer or a feed item that carries ``bet_id``:
    ``uuid5(INGESTED_EVENT_NAMESPACE, "casino:<agent>:bet:<bet_id>:placed|won")``."""
    role = "won" if won else "placed"
    return _uuid5(f"{CASINO_FEED}:{agent_id}:bet:{bet_id}:{role}")


def _uuid5(name: str) -> uuid.UUID:
    """``uuid.uuid5(INGESTED_EVENT_NAMESPACE, name)`` (a test holds them equal) at half the CPU:
    one per transaction, and ``UUID.__init__``'s argument checks cost more than the SHA-1. The
    UUID is filled in as ``__init__`` itself does (its two slots, through object.__setattr__)."""
    digest = hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()
    value = uuid.UUID.__new__(uuid.UUID)
    object.__setattr__(value, "int", int.from_bytes(digest[:16]) & _VERSION_CLEAR | _VERSION_SET)
    object.__setattr__(value, "is_safe", uuid.SafeUUID.unknown)
    return value


def legacy_event_id(source: str, tx_id: str) -> uuid.UUID:
    """The id events ingested before feeds existed were stored under: ``"<source>:<tx id>"``,
    unique across agents only by luck. Kept to alias those events (see migrate.py)."""
    return uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"{source}:{tx_id}")


class TxEnvelope(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    event_id: uuid.UUID
    agent_id: str
    event_type: str
    schema_version: int
    data: msgspec.Raw
    occurred_at: datetime
    feed: str
    tx_id: str

    @property
    def origin(self) -> str:
        """``<feed>:<tx id>``: where the transaction came from (its causation/correlation id)."""
        return f"{self.feed}:{self.tx_id}"


def new_event(env: TxEnvelope, tx_seq: int) -> NewEvent:
    """The event a PFLEA_TX message becomes; ``tx_seq`` is its sequence in the stream."""
    return NewEvent(
        event_id=env.event_id,
        event_type=env.event_type,
        data=str(env.data, "utf-8"),
        occurred_at=env.occurred_at,
        schema_version=env.schema_version,
        causation_id=env.origin,
        correlation_id=env.origin,
        metadata={"feed": env.feed, "tx_seq": tx_seq},
    )

"""The message the ingester puts on PFLEA_TX: a validated transaction, ready to be an event."""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from shared.store import NewEvent

# Fixed forever: event ids of ingested transactions are uuid5(this, "<source>:<tx id>").
INGESTED_EVENT_NAMESPACE = uuid.UUID("5b0f1c1e-7a52-4b8e-9d2f-70666c656130")


def ingested_event_id(source: str, tx_id: str) -> uuid.UUID:
    """The deterministic event id of a source transaction: the database's idempotency key."""
    return uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"{source}:{tx_id}")


class TxEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    event_id: uuid.UUID
    agent_id: str
    event_type: str
    schema_version: int
    data: msgspec.Raw
    occurred_at: datetime
    source: str
    tx_id: str


def new_event(env: TxEnvelope, tx_seq: int) -> NewEvent:
    """The event a PFLEA_TX message becomes; ``tx_seq`` is its sequence in the stream."""
    return NewEvent(
        event_id=env.event_id,
        event_type=env.event_type,
        data=bytes(env.data).decode(),
        occurred_at=env.occurred_at,
        schema_version=env.schema_version,
        causation_id=f"{env.source}:{env.tx_id}",
        correlation_id=f"{env.source}:{env.tx_id}",
        metadata={"source": env.source, "tx_seq": tx_seq},
    )


tx_encoder = msgspec.json.Encoder()
tx_decoder = msgspec.json.Decoder(TxEnvelope)

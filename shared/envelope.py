"""The messages the ingester puts on PFLEA_TX: validated transactions, ready to be events.

A PFLEA_TX message is a :class:`TxBatch`: consecutive transactions of one agent in feed order
(a page, cut into pieces of at most ``BATCH_MAX_ITEMS`` transactions and ``BATCH_MAX_BYTES``).
Per-message costs (a JetStream publish and its fsync, a delivery, an ack) are paid once per
batch instead of once per transaction. A lone :class:`TxEnvelope` is accepted as well.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from shared.settings import CASINO_FEED
from shared.store import NewEvent

# Fixed forever: the namespace of every event id derived from a Purple Flea fact.
INGESTED_EVENT_NAMESPACE = uuid.UUID("5b0f1c1e-7a52-4b8e-9d2f-70666c656130")
# The feed faucet claims (POST /claim) are matched against by their tx_id.
FAUCET_FEED = "faucet"


def ingested_event_id(feed: str, agent_id: str, tx_id: str) -> uuid.UUID:
    """The event id of transaction ``tx_id`` of ``agent_id`` on ``feed``: the database's
    idempotency key. A tx id is unique only within one feed of one agent, so all three count:
    ``uuid5(INGESTED_EVENT_NAMESPACE, "<feed>:<agent>:<tx id>")``."""
    return uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"{feed}:{agent_id}:{tx_id}")


def bet_event_id(agent_id: str, bet_id: str, won: bool) -> uuid.UUID:
    """The event id of a casino bet's BetPlaced (``won=False``) or BetWon, from its ``bet_id``.

    ``POST /bet`` answers a bet_id but no transaction id, so a bet is known by its bet_id
    whichever way it arrives, the command's answer or a feed item that carries ``bet_id``:
    ``uuid5(INGESTED_EVENT_NAMESPACE, "casino:<agent>:bet:<bet_id>:placed|won")``."""
    role = "won" if won else "placed"
    return uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"{CASINO_FEED}:{agent_id}:bet:{bet_id}:{role}")


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


class TxBatch(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One PFLEA_TX message: consecutive transactions of ``agent_id``, oldest first."""

    agent_id: str
    transactions: list[TxEnvelope]


BATCH_MAX_ITEMS = 200
BATCH_MAX_BYTES = 192 * 1024  # under PFLEA_TX's max message size (shared.jetstream.MAX_TX_BYTES)
# Fixed forever: a batch's Nats-Msg-Id is uuid5(this, "<first event id>:<last event id>:<n>").
BATCH_NAMESPACE = uuid.UUID("5b0f1c1e-7a52-4b8e-9d2f-706261746368")

tx_encoder = msgspec.json.Encoder()
tx_decoder = msgspec.json.Decoder(TxEnvelope)
_batch_decoder = msgspec.json.Decoder(TxBatch)


class TxMessage(msgspec.Struct, frozen=True):
    """A PFLEA_TX message ready to publish: its agent (subject), payload and Nats-Msg-Id."""

    agent_id: str
    payload: bytes
    msg_id: str


def tx_messages(envelopes: list[TxEnvelope]) -> list[TxMessage]:
    """``envelopes`` (in feed order) as PFLEA_TX messages: each run of one agent's consecutive
    transactions cut into batches. The same transactions always make the same messages, so
    JetStream's duplicate window also catches a page published twice."""
    messages: list[TxMessage] = []
    run: list[tuple[TxEnvelope, bytes]] = []
    size = 0
    for envelope in envelopes:
        encoded = tx_encoder.encode(envelope)
        if run and (
            envelope.agent_id != run[0][0].agent_id
            or len(run) >= BATCH_MAX_ITEMS
            or size + len(encoded) > BATCH_MAX_BYTES
        ):
            messages.append(_batch_message(run))
            run, size = [], 0
        run.append((envelope, encoded))
        size += len(encoded) + 1
    if run:
        messages.append(_batch_message(run))
    return messages


def _batch_message(run: list[tuple[TxEnvelope, bytes]]) -> TxMessage:
    first, last = run[0][0], run[-1][0]
    agent = tx_encoder.encode(first.agent_id)
    payload = b'{"agent_id":%s,"transactions":[%s]}' % (agent, b",".join(e for _, e in run))
    msg_id = uuid.uuid5(BATCH_NAMESPACE, f"{first.event_id}:{last.event_id}:{len(run)}")
    return TxMessage(first.agent_id, payload, str(msg_id))


def decode_tx_message(data: bytes) -> list[TxEnvelope]:
    """The transactions of a PFLEA_TX message (a batch, or a lone envelope), in feed order.

    Raises ``msgspec.DecodeError``/``ValidationError`` for anything else, including a batch
    that mixes agents."""
    try:
        batch = _batch_decoder.decode(data)
    except msgspec.ValidationError:
        return [tx_decoder.decode(data)]
    if any(tx.agent_id != batch.agent_id for tx in batch.transactions):
        raise msgspec.ValidationError(f"a batch for {batch.agent_id!r} holds another agent's transaction")
    return batch.transactions

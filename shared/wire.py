"""Every message this system puts on NATS, each format with its one encode/decode pair.

| format | subject | encode / decode |
|---|---|---|
| PFLEA_TX batch | ``<ns>.tx.<agent>`` | :func:`tx_messages` / :func:`decode_tx_batch` |
| PFLEA_EVENTS event | ``<ns>.events.<agent>.<EventType>`` | :func:`event_message` / :func:`delivered_event` |
| command | ``<ns>.cmd.<agent>.<Command>`` | :func:`encode_command` / :func:`decode_command` |
| its reply | the request's inbox | :func:`encode_reply` / :func:`decode_reply` |
| a command's sender | header ``Nats-Request-Info``, set by nats-server | :func:`request_sender` |

A PFLEA_TX message is a :class:`TxBatch`: consecutive transactions of one agent in feed order (a
page, cut into pieces of at most ``BATCH_MAX_ITEMS`` transactions and ``BATCH_MAX_BYTES``), so the
per-message costs (a publish and its fsync, a delivery, an ack) are paid once per batch.

A PFLEA_EVENTS message carries one committed event: its data (the stored JSON, in the current
schema shape when it can be read) as the payload, everything else in headers. Subscribers get one
message per event.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime

import msgspec

from shared.commands import AnyCommand, Command, Reply
from shared.envelope import TxEnvelope
from shared.events import Event
from shared.jetstream import Topology
from shared.nats_auth import REQUEST_INFO_HEADER
from shared.store import RecordedEvent
from shared.upcasting import decode_event

# --- headers ---------------------------------------------------------------------------------

HDR_MSG_ID = "Nats-Msg-Id"  # JetStream's own duplicate window
HDR_EVENT_ID = "Pflea-Event-Id"
HDR_STREAM_ID = "Pflea-Stream-Id"
HDR_VERSION = "Pflea-Stream-Version"
HDR_POSITION = "Pflea-Position"
HDR_EVENT_TYPE = "Pflea-Event-Type"
HDR_SCHEMA_VERSION = "Pflea-Schema-Version"
HDR_OCCURRED_AT = "Pflea-Occurred-At"
HDR_RECORDED_AT = "Pflea-Recorded-At"
# The event's link in its stream's hash chain (hex SHA-256; README, "Verifiable history"): what
# subscribers received, so a later rewrite of Postgres shows (`pflea verify --against-stream`).
HDR_HASH = "Pflea-Event-Hash"


class BadMessage(ValueError):
    """A message that is not in the format its subject promises (kept, with this reason)."""


# --- PFLEA_TX ----------------------------------------------------------------------------------

BATCH_MAX_ITEMS = 200
BATCH_MAX_BYTES = 192 * 1024  # under PFLEA_TX's max message size (shared.jetstream.MAX_TX_BYTES)
# Fixed forever: a batch's Nats-Msg-Id is uuid5(this, "<first event id>:<last event id>:<n>").
BATCH_NAMESPACE = uuid.UUID("5b0f1c1e-7a52-4b8e-9d2f-706261746368")


class TxBatch(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One PFLEA_TX message: consecutive transactions of ``agent_id``, oldest first."""

    agent_id: str
    transactions: list[TxEnvelope]


class TxMessage(msgspec.Struct, frozen=True):
    """A PFLEA_TX message ready to publish: its agent (subject), payload and Nats-Msg-Id."""

    agent_id: str
    payload: bytes
    msg_id: str


tx_encoder = msgspec.json.Encoder()
_batch_decoder = msgspec.json.Decoder(TxBatch)


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


def decode_tx_batch(data: bytes) -> TxBatch:
    """A PFLEA_TX batch: its agent and its transactions, in feed order.

    Raises ``msgspec.DecodeError``/``ValidationError`` for anything else, including a batch
    that mixes agents."""
    batch = _batch_decoder.decode(data)
    if any(tx.agent_id != batch.agent_id for tx in batch.transactions):
        raise msgspec.ValidationError(f"a batch for {batch.agent_id!r} holds another agent's transaction")
    return batch


def decode_tx_message(data: bytes) -> list[TxEnvelope]:
    """The transactions of a PFLEA_TX batch, in feed order (see :func:`decode_tx_batch`)."""
    return decode_tx_batch(data).transactions


# --- PFLEA_EVENTS ------------------------------------------------------------------------------


class DeliveredEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A committed event as PFLEA_EVENTS delivers it, and as a projector folds it: exactly the
    fields on the wire, nothing invented."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    event_type: str
    version: int
    schema_version: int
    data: str
    occurred_at: datetime
    recorded_at: datetime
    hash: str = ""  # hex; "" for a message relayed before events were chained

    @classmethod
    def of(cls, recorded: RecordedEvent) -> DeliveredEvent:
        """The message the relay makes of ``recorded``, without the round trip through NATS."""
        return cls(
            position=recorded.position,
            event_id=recorded.event_id,
            stream_id=recorded.stream_id,
            event_type=recorded.event_type,
            version=recorded.version,
            schema_version=recorded.schema_version,
            data=recorded.data,
            occurred_at=recorded.occurred_at,
            recorded_at=recorded.recorded_at,
            hash=recorded.hash.hex(),
        )

    def decode(self) -> Event:
        """The event, under the one decode policy (raises ``UnreadableEvent``)."""
        return decode_event(self.event_type, self.schema_version, self.data)


def event_headers(e: RecordedEvent | DeliveredEvent) -> dict[str, str]:
    """No ``Nats-Msg-Id``: the relay's atomic batches need none per event (services/relay)."""
    return {
        HDR_EVENT_ID: str(e.event_id),
        HDR_STREAM_ID: e.stream_id,
        HDR_VERSION: str(e.version),
        HDR_POSITION: str(e.position),
        HDR_EVENT_TYPE: e.event_type,
        HDR_OCCURRED_AT: e.occurred_at.isoformat(),
        HDR_RECORDED_AT: e.recorded_at.isoformat(),
        HDR_SCHEMA_VERSION: str(e.schema_version),
        HDR_HASH: e.hash if isinstance(e.hash, str) else e.hash.hex(),
    }


def event_message(topology: Topology, e: RecordedEvent | DeliveredEvent) -> tuple[str, bytes, dict[str, str]]:
    """(subject, payload, headers) of the PFLEA_EVENTS message for ``e``."""
    return topology.event_subject(e.stream_id, e.event_type), e.data.encode(), event_headers(e)


def delivered_event(data: bytes, headers: Mapping[str, str] | None) -> DeliveredEvent:
    """The event a PFLEA_EVENTS message carries; ``BadMessage`` for anything else."""
    h = headers or {}
    try:
        return DeliveredEvent(
            position=int(h[HDR_POSITION]),
            event_id=uuid.UUID(h[HDR_EVENT_ID]),
            stream_id=h[HDR_STREAM_ID],
            event_type=h[HDR_EVENT_TYPE],
            version=int(h[HDR_VERSION]),
            schema_version=int(h[HDR_SCHEMA_VERSION]),
            data=data.decode(),
            occurred_at=datetime.fromisoformat(h[HDR_OCCURRED_AT]),
            recorded_at=datetime.fromisoformat(h[HDR_RECORDED_AT]),
            hash=h.get(HDR_HASH, ""),
        )
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"not a relayed event: {exc!r}") from None


# --- commands ------------------------------------------------------------------------------------

# Decimals as strings: a reply's payout must survive any JSON reader exactly.
_command_encoder = msgspec.json.Encoder(decimal_format="string")
_command_decoder = msgspec.json.Decoder(AnyCommand)
_reply_decoder = msgspec.json.Decoder(Reply)


def encode_command(command: Command) -> bytes:
    return _command_encoder.encode(command)


def decode_command(data: bytes) -> Command:
    """A command of any kind (its ``command`` tag says which); ``msgspec.DecodeError`` if not."""
    command: Command = _command_decoder.decode(data)
    return command


def encode_reply(reply: Reply) -> bytes:
    return _command_encoder.encode(reply)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)


class RequestSender(msgspec.Struct, frozen=True):
    """Who sent a request that crossed a service import with ``share: true``: nats-server's
    ``Nats-Request-Info`` header (its ClientInfo; we read the account and the user)."""

    acc: str = ""
    user: str = ""


_sender_decoder = msgspec.json.Decoder(RequestSender)


def request_sender(headers: Mapping[str, str] | None) -> RequestSender | None:
    """The sender the server stamped on a command, or None without the header. An unreadable
    header is a sender with no identity: it matches no agent."""
    raw = (headers or {}).get(REQUEST_INFO_HEADER)
    if raw is None:
        return None
    try:
        return _sender_decoder.decode(raw)
    except msgspec.DecodeError:
        return RequestSender()

"""A PFLEA_TX message as the writer holds it, and the transactions it carries."""

from __future__ import annotations

import msgspec
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg

from shared.envelope import TxEnvelope
from shared.jetstream import delivery_numbers
from shared.store import StreamEvent
from shared.wire import HDR_MSG_ID


class Item(msgspec.Struct):
    """One PFLEA_TX message on its way to the log: fetched (``msg``) or read from the stream."""

    seq: int
    subject: str
    data: bytes
    msg: Msg | None
    delivered: int  # times delivered to a writer (0 when read from the stream), or tried
    key: str  # the message's identity for counting attempts: its Nats-Msg-Id
    consumer_seq: int = 0  # the consumer's number for this delivery (0 when read from the stream)

    @property
    def agent_id(self) -> str:
        return self.subject.rsplit(".", 1)[-1]


class Tx(msgspec.Struct):
    """One transaction of a message, as the event it becomes."""

    envelope: TxEnvelope
    event: StreamEvent


def _key(seq: int, headers: dict[str, str] | None) -> str:
    return (headers or {}).get(HDR_MSG_ID) or f"seq:{seq}"


def fetched(msg: Msg) -> Item:
    seq, delivered, consumer_seq = delivery_numbers(msg)
    return Item(seq, msg.subject, msg.data, msg, delivered, _key(seq, msg.headers), consumer_seq)


def read_back(raw: RawStreamMsg) -> Item:
    """A message read from the stream itself (held by a dead writer, see order.py)."""
    seq = raw.seq or 0
    return Item(seq, raw.subject or "", raw.data or b"", None, 0, _key(seq, raw.headers))

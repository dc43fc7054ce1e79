"""JetStream atomic batch publish (ADR-50): up to 1,000 messages stored all together or not at
all, acknowledged once.

nats-server >= 2.12.1 speaks it on a stream with ``allow_atomic`` (2.12.0 refused a batch with a
``Nats-Msg-Id``); nats-py 2.16 has no client API for it, but it is headers on plain publishes.
Every message of a batch carries ``Nats-Batch-Id`` and ``Nats-Batch-Sequence`` (1, 2, ...). The
first is a request, answered with an empty message (or an error, say the stream does not allow
batches); the middle ones are plain publishes; the last also carries ``Nats-Batch-Commit: 1``
and is a request, answered with the pub ack of the whole batch. The server stages the batch
and, on the commit, stores every message and syncs once before it answers: with
``sync_interval: always`` that is one fsync per batch, not one per message. A batch with a gap
is refused at its commit; one whose commit never comes (its publisher died) is dropped after
10 s of silence, its messages never stored.

A ``Nats-Msg-Id`` on any message makes the whole batch a duplicate once that id is in the
stream's duplicate window: the batch is then refused (``DUPLICATE``) and nothing of it stored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import msgspec
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.faults import crash_point
from shared.jetstream import AcksLost
from shared.js_adapter import connection

MAX_BATCH = 1000  # nats-server's limit on the messages of one atomic batch

HDR_BATCH_ID = "Nats-Batch-Id"
HDR_BATCH_SEQUENCE = "Nats-Batch-Sequence"
HDR_BATCH_COMMIT = "Nats-Batch-Commit"
BATCH_HEADERS = (HDR_BATCH_ID, HDR_BATCH_SEQUENCE, HDR_BATCH_COMMIT)


def without_batch_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """A stored message's headers fit to publish it again: the batch headers stay on every
    message of a batch, and a publish carrying them is taken for part of an open batch."""
    return {k: v for k, v in (headers or {}).items() if k not in BATCH_HEADERS}


# nats-server's error codes (ADR-50, "Server Errors") a publisher acts on.
NOT_ENABLED = 10174  # the stream does not allow atomic batches
INCOMPLETE = 10176  # a message went missing, or the batch was abandoned: publish it again
DUPLICATE = 10201  # a Nats-Msg-Id of the batch is already in the stream


class BatchRefused(nats.js.errors.Error):
    """nats-server refused a batch (nothing of it was stored): ``err_code`` says why."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"atomic batch refused ({err_code}): {description}")
        self.err_code = err_code
        self.description = description


class BatchAck(msgspec.Struct, frozen=True):
    """The pub ack of a committed batch: its last message's stream sequence, and its size."""

    stream: str
    seq: int
    batch: str = ""
    count: int = 0


class _Error(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Answer(msgspec.Struct, frozen=True):
    error: _Error | None = None
    stream: str = ""
    seq: int = 0
    batch: str = ""
    count: int = 0


_answer = msgspec.json.Decoder(_Answer)


def _refusal(data: bytes) -> BatchRefused | None:
    """The server's refusal in an answer, if it is one."""
    if not data:
        return None
    answer = _answer.decode(data)
    if answer.error is None:
        return None
    return BatchRefused(answer.error.err_code, answer.error.description)


async def publish_atomic(
    js: JetStreamContext, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout: float
) -> BatchAck:
    """Publish ``(subject, payload, headers)`` as one atomic batch: all stored, in this order and
    contiguous, when this returns; nothing stored when it raises (:class:`BatchRefused`, or a
    NATS error or ``TimeoutError`` when the answer never came: then the batch may or may not
    have been committed, and the caller asks the stream). Raises :class:`AcksLost` as soon as the
    client reconnects while waiting for an answer, as :func:`shared.jetstream.publish_in_order`."""
    if not 1 <= len(messages) <= MAX_BATCH:
        raise ValueError(f"an atomic batch holds 1 to {MAX_BATCH} messages, not {len(messages)}")
    nc = connection(js)
    batch_id = uuid.uuid4().hex  # fresh for every attempt: an abandoned attempt cannot mix in
    last = len(messages)
    for sequence, (subject, payload, headers) in enumerate(messages, 1):
        batch_headers = {**headers, HDR_BATCH_ID: batch_id, HDR_BATCH_SEQUENCE: str(sequence)}
        if sequence == last:
            batch_headers[HDR_BATCH_COMMIT] = "1"
            answer = await _request(nc, subject, payload, batch_headers, timeout)
            if refused := _refusal(answer.data):
                raise refused
            ack = msgspec.json.decode(answer.data, type=BatchAck)
            if ack.count != last:
                raise BatchRefused(INCOMPLETE, f"the server stored {ack.count} of {last} messages")
            return ack
        if sequence == 1:
            # Started: the server says now if it cannot take batches on this stream.
            answer = await _request(nc, subject, payload, batch_headers, timeout)
            if refused := _refusal(answer.data):
                raise refused
            if answer.data:  # a pub ack: the server stored it as a plain message (< 2.12)
                raise BatchRefused(NOT_ENABLED, "this nats-server does not know atomic batches")
        else:
            await nc.publish(subject, payload, headers=batch_headers)
        if sequence == last - 1:
            crash_point("atomic_batch.before_commit")  # staged, never committed
    raise AssertionError("unreachable: the last message commits")


async def _request(nc: Client, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> Msg:
    """A request's answer; :class:`AcksLost` as soon as the client reconnects while waiting (the
    answer to a request sent on the old connection never comes)."""
    reconnects = nc.stats["reconnects"]
    answer = asyncio.ensure_future(nc.request(subject, payload, timeout=timeout, headers=headers))
    try:
        while not (await asyncio.wait({answer}, timeout=0.25))[0]:
            if nc.stats["reconnects"] != reconnects:
                raise AcksLost("reconnected while an atomic batch waited for its answer")
        return answer.result()
    finally:
        answer.cancel()

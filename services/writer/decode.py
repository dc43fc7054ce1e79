"""Turn PFLEA_TX messages into the events they carry, setting aside what cannot be read and
what the writer refuses to believe.

The writer trusts nothing the ingester hands it (a compromised ingester holds the right to
publish on every agent's subject): a message must be on its own agent's subject, and each
transaction must be exactly what the ingester's own validation makes of the feed item it
carries (:func:`shared.transactions.reparse`), under the event id derived from it. What fails
is quarantined with the reason; its neighbours go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg

from services.writer.messages import Item, Tx
from shared import faults
from shared.envelope import TxEnvelope, new_event
from shared.faults import crash_point
from shared.jetstream import Topology
from shared.settings import FEED_NAME_PATTERN
from shared.store import StreamEvent
from shared.transactions import Rejected, reparse
from shared.wire import decode_tx_batch, decode_tx_message


@dataclass
class Decoded:
    txs: list[Tx] = field(default_factory=list)  # in message order, then feed order
    kept: list[Msg] = field(default_factory=list)  # fetched messages to ack once committed
    poison: list[tuple[Item, str]] = field(default_factory=list)  # whole messages, with the reason
    refused: list[tuple[Item, TxEnvelope, str]] = field(default_factory=list)  # single transactions


def decode_items(items: Sequence[Item], topology: Topology) -> Decoded:
    """The transactions of ``items`` (sorted by sequence) the writer accepts; the messages that
    are no batch or on another agent's subject; the transactions it refuses."""
    out = Decoded()
    for item in items:
        try:
            batch = decode_tx_batch(item.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            out.poison.append((item, f"envelope: {exc}"))
            continue
        if (reason := misaddressed(item.subject, batch.agent_id, topology)) is not None:
            out.poison.append((item, reason))
            continue
        for e in batch.transactions:
            if faults.ARMED:
                crash_point(f"writer.tx.{e.tx_id}")  # a transaction that kills the writer
            if (reason := refusal(e)) is not None:
                out.refused.append((item, e, reason))
            else:
                out.txs.append(Tx(e, StreamEvent(e.agent_id, "agent", new_event(e, item.seq))))
        if item.msg is not None:
            out.kept.append(item.msg)
    return out


def misaddressed(subject: str, agent_id: str, topology: Topology) -> str | None:
    """Why a batch of ``agent_id`` may not be taken from ``subject``, or None: NATS lets the
    ingester publish on any agent's subject, so the subject proves nothing by itself, and a
    batch on another agent's subject is a forgery or a bug either way."""
    subject_agent = topology.tx_agent(subject)
    if subject_agent is None:
        return f"subject: {subject[:200]!r} is not {topology.tx_subject('<agent id>')}"
    if subject_agent != agent_id:
        return f"agent_id: the batch says {agent_id[:64]!r}, its subject {subject!r} says {subject_agent!r}"
    return None


def refusal(envelope: TxEnvelope) -> str | None:
    """Why the writer refuses ``envelope``, or None: it stores only what the ingester makes of
    the transaction the envelope carries (the same validation: catalogue, money, field sizes),
    under the id derived from (feed, agent, tx id), or from a casino bet's ``bet_id``."""
    if not FEED_NAME_PATTERN.fullmatch(envelope.feed):
        return f"feed: {envelope.feed[:40]!r} is not a feed name ({FEED_NAME_PATTERN.pattern})"
    try:
        expected = reparse(envelope)
    except Rejected as exc:
        return exc.reason
    for name in ("event_type", "schema_version", "tx_id"):
        got, want = getattr(envelope, name), getattr(expected, name)
        if got != want:
            return f"{name}: {repr(got)[:64]}, but the transaction it carries makes {want!r}"
    if bytes(envelope.data) != bytes(expected.data):
        where = _first_difference(envelope.data, expected.data)
        return f"{where}: not what the ingester makes of the transaction ({bytes(expected.data)[:300]!r})"
    if envelope.occurred_at != expected.occurred_at:
        return (
            f"occurred_at: {envelope.occurred_at.isoformat()}, but the transaction's created_at "
            f"is {expected.occurred_at.isoformat()}"
        )
    if envelope.event_id != expected.event_id:
        return (
            f"event_id: {envelope.event_id} is not {expected.event_id}, the id the identity rule "
            f"gives transaction {envelope.origin!r} of {envelope.agent_id!r}"
        )
    return None


def _first_difference(got: msgspec.Raw, want: msgspec.Raw) -> str:
    """``data.<key>`` of the first field that differs, or ``data`` if only the encoding does."""
    try:
        a: Any = msgspec.json.decode(got)
        b: Any = msgspec.json.decode(want)
    except msgspec.DecodeError:  # e.g. a number no float holds: reparse read it as a Decimal
        return "data"
    for key in [*b, *(k for k in a if k not in b)]:
        if a.get(key, ...) != b.get(key, ...):
            return f"data.{key}"[:80]
    return "data"


def stored_ids(item: Item) -> list:
    """The event ids ``item`` would store ([] if it cannot be read)."""
    try:
        return [e.event_id for e in decode_tx_message(item.data)]
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []

"""Turn PFLEA_TX messages into the events they carry, setting aside what cannot be read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from nats.aio.msg import Msg

from services.writer.messages import Item, Tx
from shared import faults
from shared.envelope import new_event
from shared.faults import crash_point
from shared.store import StreamEvent
from shared.wire import decode_tx_message


@dataclass
class Decoded:
    txs: list[Tx] = field(default_factory=list)  # in message order, then feed order
    kept: list[Msg] = field(default_factory=list)  # fetched messages to ack once committed
    poison: list[tuple[Item, str]] = field(default_factory=list)  # with the reason


def decode_items(items: Sequence[Item]) -> Decoded:
    """The transactions of ``items`` (sorted by sequence), and the messages that are no batch."""
    out = Decoded()
    for item in items:
        try:
            envelopes = decode_tx_message(item.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            out.poison.append((item, f"envelope: {exc}"))
            continue
        for e in envelopes:
            if faults.ARMED:
                crash_point(f"writer.tx.{e.tx_id}")  # a transaction that kills the writer
            out.txs.append(Tx(e, StreamEvent(e.agent_id, "agent", new_event(e, item.seq))))
        if item.msg is not None:
            out.kept.append(item.msg)
    return out


def stored_ids(item: Item) -> list:
    """The event ids ``item`` would store ([] if it cannot be read)."""
    try:
        return [e.event_id for e in decode_tx_message(item.data)]
    except (msgspec.DecodeError, msgspec.ValidationError):
        return []

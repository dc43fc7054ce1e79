"""Apply a batch of delivered events to one projection, exactly once in effect.

In one transaction: lock the batch's streams' checkpoints, skip what is applied, fill any gap
(version > checkpoint + 1) from the events table, fold, upsert the rows, move the checkpoints.
Two replicas given the same stream serialise on its checkpoint row, and the second one finds
the work done; so N replicas sharing one durable consumer give the tables one replica would.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from services.projectors.tables import (
    advance_position,
    load_states,
    lock_checkpoints,
    save_checkpoints,
    save_states,
)
from shared import locks
from shared.events import Event
from shared.projections.model import ReadModel
from shared.quarantine import Quarantine
from shared.store import fetch_stream
from shared.upcasting import UnreadableEvent
from shared.wire import DeliveredEvent

log = logging.getLogger(__name__)


def _contiguous(events: list[DeliveredEvent], after: int) -> bool:
    return all(e.version == after + i for i, e in enumerate(events, 1))


async def apply_batch(
    conn: asyncpg.Connection,
    model: ReadModel[Any],
    delivered: list[DeliveredEvent],
    quarantine: Quarantine,
) -> int:
    """Apply ``delivered`` (any order, repeats allowed) inside the caller's transaction.

    Returns how many events changed the read model's checkpoints (applied or gap-filled).
    """
    by_stream: dict[str, dict[int, DeliveredEvent]] = {}
    for event in delivered:
        by_stream.setdefault(event.stream_id, {})[event.version] = event
    streams = sorted(by_stream)
    await conn.execute("SELECT pflea_projection_lock_shared($1)", locks.projection(model.name))
    checkpoints = await lock_checkpoints(conn, model.name, streams)
    pending: dict[str, list[DeliveredEvent]] = {}
    for stream in streams:
        done = checkpoints[stream]
        fresh = [by_stream[stream][v] for v in sorted(by_stream[stream]) if v > done]
        if not fresh:
            continue
        if not _contiguous(fresh, done):
            # A gap: the missing versions are committed (the relay publishes only what is),
            # so read them instead of waiting for a redelivery that may never come.
            stored = await fetch_stream(conn, stream, done + 1, fresh[-1].version)
            fresh = [DeliveredEvent.of(e) for e in stored]
        pending[stream] = fresh
    if not pending:
        return 0
    states = await load_states(conn, model, list(pending))
    applied: dict[str, tuple[int, int]] = {}
    for stream, events in pending.items():
        state = states[stream]
        for recorded in events:
            decoded = await _decode(recorded, model, quarantine, conn)
            if decoded is not None:
                model.apply(state, decoded)
        applied[stream] = (events[-1].version, events[-1].position)
    await save_states(conn, model, states, {s: applied[s][1] for s in pending})
    await save_checkpoints(conn, model.name, applied)
    newest = max((e for events in pending.values() for e in events), key=lambda e: e.position)
    await advance_position(conn, model.name, newest.position, newest.recorded_at)
    return sum(len(events) for events in pending.values())


async def _decode(
    recorded: DeliveredEvent, model: ReadModel[Any], quarantine: Quarantine, conn: asyncpg.Connection
) -> Event | None:
    """The event, or None after quarantining it: one unreadable event must not stop the stream."""
    try:
        return recorded.decode()
    except UnreadableEvent as exc:
        await quarantine.put(
            recorded.data.encode(),
            f"projector {model.name}: cannot apply {recorded.event_type} v{recorded.version} "
            f"of {recorded.stream_id} (position {recorded.position}): {exc}",
            agent_id=recorded.stream_id,
            key=str(recorded.event_id),
            conn=conn,
        )
        return None

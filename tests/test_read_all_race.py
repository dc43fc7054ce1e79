"""Tailing the log never skips an event, even when transactions commit out of position order."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

from shared.store import EventStore, NewEvent, StreamEvent


async def test_tailing_reader_sees_every_event_exactly_once(store: EventStore) -> None:
    rng = random.Random(20261126)
    writers, per_writer = 32, 5
    expected: set[uuid.UUID] = set()
    done = asyncio.Event()

    async def append_slowly(n: int) -> None:
        for _ in range(per_writer):
            event = NewEvent(
                event_id=uuid.uuid4(),
                event_type="FundsDeposited",
                data='{"amount": "1", "asset": "PFLEA"}',
                occurred_at=datetime.now(UTC),
            )
            expected.add(event.event_id)
            async with store.pool.acquire() as conn, conn.transaction():
                await store.append_batch([StreamEvent(f"w{n}", "agent", event)], conn=conn)
                # Hold the transaction open after drawing a position, so commits interleave.
                await asyncio.sleep(rng.uniform(0, 0.02))

    seen: list[uuid.UUID] = []

    async def tail() -> None:
        position = 0
        while True:
            finished = done.is_set()
            batch = await store.read_all(position, limit=7)
            for event in batch:
                assert event.position > position
                position = event.position
                seen.append(event.event_id)
            if finished and not batch:
                return
            if not batch:
                await asyncio.sleep(0.001)

    reader = asyncio.create_task(tail())
    await asyncio.gather(*(append_slowly(n) for n in range(writers)))
    done.set()
    await asyncio.wait_for(reader, 30)
    assert len(seen) == len(set(seen)), "an event was seen twice"
    assert set(seen) == expected, f"{len(expected - set(seen))} events were skipped"

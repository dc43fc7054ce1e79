"""A large, seeded backlog of events appended straight to the store (the outbox relays them).

Events are built through the catalogue (``NewEvent.of``), so their data is exactly what the
writer would store: amounts as plain decimal text, within range. No source transaction stands
behind them; the checker is told their ids instead.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from shared.db import WRITER_ROLE, create_pool, role_dsn
from shared.events import BetPlaced, BetWon, Event, FeeCharged, FundsDeposited, FundsWithdrawn
from shared.store import EventStore, NewEvent, StreamEvent
from tests.conftest import SERVICE_PASSWORD

START = datetime(2026, 1, 1, tzinfo=UTC)


def _event(rng: random.Random) -> Event:
    amount = Decimal(rng.randint(1, 500_000)).scaleb(-rng.choice([0, 2, 8]))
    asset = rng.choice(["PFLEA", "USDC", "BTC"])
    kind = rng.choices([FundsDeposited, BetPlaced, BetWon, FeeCharged, FundsWithdrawn], [4, 6, 3, 2, 1])[0]
    if kind in (BetPlaced, BetWon):
        return kind(amount=amount, asset=asset, game=rng.choice(["dice", "crash"]))
    return kind(amount=amount, asset=asset)


def backlog(seed: int, agents: int, events: int) -> list[StreamEvent]:
    rng = random.Random(f"chaos-backlog:{seed}")
    return [
        StreamEvent(
            f"bulk-{rng.randrange(agents):03d}",
            "agent",
            NewEvent.of(
                _event(rng),
                event_id=uuid.UUID(int=rng.getrandbits(128)),
                occurred_at=START + timedelta(seconds=n),
            ),
        )
        for n in range(events)
    ]


async def append_backlog(database_url: str, items: list[StreamEvent], chunk: int = 10_000) -> set[uuid.UUID]:
    """Append ``items`` as the writer role would (COPY, in chunks); returns their event ids."""
    pool: asyncpg.Pool = await create_pool(role_dsn(database_url, WRITER_ROLE, SERVICE_PASSWORD), max_size=2)
    try:
        store = EventStore(pool)
        for start in range(0, len(items), chunk):
            await store.append_batch(items[start : start + chunk])
    finally:
        await pool.close()
    return {item.event.event_id for item in items}

"""Read models equal an independent fold over the log, whatever the delivery order."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from services.projectors.apply import apply_batch
from services.projectors.rebuild import rebuild
from shared.db import PROJECTOR_ROLE, READER_ROLE, create_pool, role_dsn
from shared.projections.registry import PROJECTIONS
from shared.quarantine import Quarantine
from shared.store import EventStore, RecordedEvent
from shared.wire import DeliveredEvent
from tests.conftest import SERVICE_PASSWORD
from tests.reference import TABLE_COLUMNS, assert_read_models_match_fold, generate


async def all_events(store: EventStore) -> list[DeliveredEvent]:
    """The whole log as the relay delivers it."""
    events: list[RecordedEvent] = []
    while batch := await store.read_all(events[-1].position if events else 0, 5000):
        events += batch
    return [DeliveredEvent.of(e) for e in events]


async def deliver_shuffled(pool: asyncpg.Pool, events: list[DeliveredEvent], seed: int) -> None:
    """Every projection gets every event at least once: shuffled, duplicated, in odd batches."""
    rng = random.Random(seed)
    deliveries = events + rng.sample(events, len(events) // 3)
    rng.shuffle(deliveries)
    for name, model in PROJECTIONS.items():
        quarantine = Quarantine(pool, f"projector:{name}")
        i = 0
        while i < len(deliveries):
            size = rng.choice([1, 3, 17, 64, 250])
            async with pool.acquire() as conn, conn.transaction():
                await apply_batch(conn, model, deliveries[i : i + size], quarantine)
            i += size


@pytest.fixture
async def projector_pool(database_url: str) -> asyncpg.Pool:
    pool = await create_pool(role_dsn(database_url, PROJECTOR_ROLE, SERVICE_PASSWORD))
    yield pool
    await pool.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_read_models_equal_an_independent_fold_for_any_delivery_order(
    store: EventStore, projector_pool: asyncpg.Pool, database_url: str, seed: int
) -> None:
    await store.append_batch(generate(seed, agents=25, events=1500))
    await deliver_shuffled(projector_pool, await all_events(store), seed)
    conn = await asyncpg.connect(database_url)
    try:
        await assert_read_models_match_fold(conn)
        status = await conn.fetch("SELECT projection, lag_events FROM projection_status")
        assert {r["projection"]: r["lag_events"] for r in status} == dict.fromkeys(PROJECTIONS, 0)
    finally:
        await conn.close()


async def test_a_gap_is_filled_from_the_log_not_waited_for(
    store: EventStore, projector_pool: asyncpg.Pool, database_url: str
) -> None:
    await store.append_batch(generate(9, agents=1, events=50))
    events = await all_events(store)
    model = PROJECTIONS["balance"]
    async with projector_pool.acquire() as conn, conn.transaction():
        applied = await apply_batch(conn, model, [events[-1]], Quarantine(projector_pool, "t"))
    assert applied == 50  # versions 1..49 read from the events table
    conn = await asyncpg.connect(database_url)
    try:
        await assert_read_models_match_fold(conn, ["balances"])
    finally:
        await conn.close()


async def test_a_poison_event_is_quarantined_and_the_stream_goes_on(
    store: EventStore, projector_pool: asyncpg.Pool, database_url: str
) -> None:
    batch = generate(4, agents=1, events=10)
    poison = batch[4].event.__class__(
        **{
            **{f: getattr(batch[4].event, f) for f in batch[4].event.__struct_fields__},
            "event_type": "FundsDeposited",
            "data": '{"amount": "oops", "asset": "PFLEA"}',
        }
    )
    batch[4] = batch[4].__class__(batch[4].stream_id, "agent", poison)
    await store.append_batch(batch)
    events = await all_events(store)
    async with projector_pool.acquire() as conn, conn.transaction():
        await apply_batch(
            conn, PROJECTIONS["balance"], events, Quarantine(projector_pool, "projector:balance")
        )
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT source, reason FROM quarantine")
        assert row["source"] == "projector:balance" and "FundsDeposited v5" in row["reason"]
        version = await conn.fetchval("SELECT version FROM projection_checkpoints WHERE projection='balance'")
        assert version == 10
    finally:
        await conn.close()


async def test_rebuild_equals_live_and_reads_keep_working(
    store: EventStore, projector_pool: asyncpg.Pool, database_url: str
) -> None:
    await store.append_batch(generate(5, agents=40, events=6000))
    await deliver_shuffled(projector_pool, await all_events(store), 5)
    conn = await asyncpg.connect(database_url)
    reader = await asyncpg.connect(role_dsn(database_url, READER_ROLE, SERVICE_PASSWORD))
    try:
        live = {t: await conn.fetch(f"SELECT * FROM {t} ORDER BY 1, 2") for t in TABLE_COLUMNS}
        expected_total = await reader.fetchval("SELECT sum(balance) FROM balances")
        stop = asyncio.Event()
        reads: list[object] = []

        async def keep_reading() -> None:
            while not stop.is_set():
                reads.append(await reader.fetchval("SELECT sum(balance) FROM balances"))
                await asyncio.sleep(0)

        task = asyncio.create_task(keep_reading())
        for name in PROJECTIONS:
            report = await rebuild(database_url, PROJECTIONS[name])
            assert report.events == 6000
        stop.set()
        await task
        assert reads and all(total == expected_total for total in reads), "a read saw a half-swapped table"
        for table, rows in live.items():
            assert await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2") == rows, f"{table} differs"
        await assert_read_models_match_fold(conn)
    finally:
        await conn.close()
        await reader.close()


@pytest.mark.parametrize("table", [*TABLE_COLUMNS, "leaderboard", "projection_status", "events"])
async def test_the_read_only_role_can_read_and_never_write(database_url: str, table: str) -> None:
    conn = await asyncpg.connect(role_dsn(database_url, READER_ROLE, SERVICE_PASSWORD))
    try:
        await conn.fetch(f"SELECT * FROM {table} LIMIT 1")
        for statement in (
            f"DELETE FROM {table}",
            f"UPDATE {table} SET agent_id = 'x'"
            if table not in ("projection_status", "events")
            else f"DELETE FROM {table}",
            f"TRUNCATE {table}",
            f"INSERT INTO {table} SELECT * FROM {table} LIMIT 1",
        ):
            with pytest.raises(asyncpg.PostgresError):
                await conn.execute(statement)
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute("CREATE TABLE sneaky (x int)")
    finally:
        await conn.close()

"""One decode policy on every read path: an unreadable stored event stops no reader.

The log gets, as its owner would have written them, an event no upcaster can lift (BetPlaced
at schema -1) and one whose data does not fit its type; every path must go on past them: the
store reads them, the relay publishes them as stored, projectors (live and gap fill) and rebuilds
quarantine them and fold the rest, time travel skips them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.projectors.apply import apply_batch
from services.projectors.rebuild import rebuild
from shared.db import PROJECTOR_ROLE, create_pool, role_dsn
from shared.history import current_state
from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore
from shared.upcasting import UnreadableEvent
from shared.wire import DeliveredEvent, delivered_event
from tests.conftest import SERVICE_PASSWORD
from tests.support import service_env, stream_messages

AGENT = "reader-test"
ROWS = [  # (event_type, schema_version, data)
    ("AgentRegistered", 1, "{}"),
    ("FundsDeposited", 1, '{"amount": "10", "asset": "PFLEA"}'),
    ("BetPlaced", -1, '{"stake": "1", "game": "dice"}'),  # no upcaster from v-1 (v0 is the article's)
    ("FundsDeposited", 1, '{"amount": "abc", "asset": "PFLEA"}'),  # not an amount
    ("FundsDeposited", 1, '{"amount": "5", "asset": "PFLEA"}'),
]
UNREADABLE = {3, 4}


@pytest.fixture
async def log(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        for version, (event_type, schema, data) in enumerate(ROWS, 1):
            await conn.execute(
                """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                                       metadata, occurred_at)
                   VALUES ($1, $2, 'agent', $3, $4, $5::jsonb, $6::jsonb, $7)""",
                uuid.uuid4(),
                AGENT,
                event_type,
                version,
                data,
                f'{{"schema_version": {schema}}}',
                datetime(2026, 1, 1, version, tzinfo=UTC),
            )
    finally:
        await conn.close()


async def _quarantined(database_url: str, source: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [
            r["reason"] for r in await conn.fetch("SELECT reason FROM quarantine WHERE source = $1", source)
        ]
    finally:
        await conn.close()


async def test_the_store_reads_them_and_decoding_names_why(log: None, store: EventStore) -> None:
    events = await store.read_stream(AGENT)
    assert [e.version for e in events] == [1, 2, 3, 4, 5]
    for e in events:
        if e.version in UNREADABLE:
            with pytest.raises(UnreadableEvent, match=e.event_type):
                e.decode()
        else:
            e.decode()
    assert events[2].schema_version == -1  # kept as stored


async def test_time_travel_skips_them(log: None, database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        state, version = await current_state(conn, AGENT, use_snapshots=False)
    finally:
        await conn.close()
    assert (version, state.available("PFLEA")) == (5, Decimal(15))


@pytest.mark.parametrize("delivered", ["all", "only the last (gap fill)"])
async def test_a_projector_quarantines_them_and_folds_the_rest(
    log: None, store: EventStore, database_url: str, delivered: str
) -> None:
    events = [DeliveredEvent.of(e) for e in await store.read_stream(AGENT)]
    batch = events if delivered == "all" else events[-1:]
    pool = await create_pool(role_dsn(database_url, PROJECTOR_ROLE, SERVICE_PASSWORD))
    try:
        async with pool.acquire() as conn, conn.transaction():
            applied = await apply_batch(
                conn, PROJECTIONS["balance"], batch, Quarantine(pool, "projector:balance")
            )
        balance = await pool.fetchval("SELECT balance FROM balances WHERE agent_id = $1", AGENT)
    finally:
        await pool.close()
    assert applied == 5 and balance == Decimal(15)
    reasons = await _quarantined(database_url, "projector:balance")
    assert len(reasons) == 2
    assert any("BetPlaced v3" in r and "schema v-1" in r for r in reasons)
    assert any("FundsDeposited v4" in r for r in reasons)


async def test_a_rebuild_quarantines_them_and_folds_the_rest(log: None, database_url: str) -> None:
    report = await rebuild(database_url, PROJECTIONS["balance"])
    assert report.events == 5
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT balance FROM balances WHERE agent_id = $1", AGENT) == Decimal(15)
    finally:
        await conn.close()
    reasons = await _quarantined(database_url, "projector:balance")
    assert len(reasons) == 2 and all(r.startswith("rebuild balance") for r in reasons)


async def test_the_relay_publishes_them_as_stored_and_goes_on(
    log: None, settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    relay = ServiceProcess("services.relay", service_env(settings), tmp_path)
    relay.start()
    try:

        async def all_relayed() -> list[DeliveredEvent] | None:
            msgs = await stream_messages(
                js_streams.jetstream(), topology.events_stream, topology.events_filter
            )
            got = [delivered_event(m.data, m.headers) for m in msgs]
            return got if len(got) >= len(ROWS) else None

        relayed = await wait_until(all_relayed, 30, "every event relayed")
    finally:
        relay.kill()
    assert [e.version for e in relayed] == [1, 2, 3, 4, 5]
    assert (relayed[2].schema_version, relayed[2].data) == (-1, '{"game": "dice", "stake": "1"}')

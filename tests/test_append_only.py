"""Append-only is enforced by Postgres: no service role can change or erase a stored event."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest

from shared.db import SERVICE_ROLES, role_dsn
from shared.events import FundsDeposited
from shared.store import EventStore, NewEvent
from tests.conftest import SERVICE_PASSWORD

ATTACKS = [
    'UPDATE events SET data = \'{"amount": "1000000"}\'',
    "DELETE FROM events",
    "TRUNCATE events",
    "ALTER TABLE events DISABLE TRIGGER events_no_update_delete",
    "SET session_replication_role = replica",
    "DROP TABLE events",
    "DROP TRIGGER events_no_update_delete ON events",
]


@pytest.mark.parametrize("role", SERVICE_ROLES)
@pytest.mark.parametrize("attack", ATTACKS)
async def test_service_roles_cannot_change_stored_events(
    store: EventStore, database_url: str, role: str, attack: str
) -> None:
    await store.append("victim", "agent", [NewEvent.of(FundsDeposited(amount=Decimal(1), asset="PFLEA"))], 0)
    conn = await asyncpg.connect(role_dsn(database_url, role, SERVICE_PASSWORD))
    try:
        with pytest.raises(asyncpg.PostgresError):
            await conn.execute(attack)
    finally:
        await conn.close()
    [event] = await store.read_stream("victim")
    assert '"1"' in event.data


@pytest.mark.parametrize(
    "statement", ["UPDATE events SET version = 99", "DELETE FROM events", "TRUNCATE events"]
)
async def test_even_the_owner_is_stopped_by_the_triggers(
    store: EventStore, database_url: str, statement: str
) -> None:
    await store.append("victim", "agent", [NewEvent.of(FundsDeposited(amount=Decimal(1), asset="PFLEA"))], 0)
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await conn.execute(statement)
    finally:
        await conn.close()
    assert len(await store.read_stream("victim")) == 1


async def test_reader_role_cannot_append(database_url: str) -> None:
    conn = await asyncpg.connect(role_dsn(database_url, "pflea_reader", SERVICE_PASSWORD))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                   metadata, occurred_at) VALUES (gen_random_uuid(), 'x', 'agent', 'X', 1, '{}',
                   '{"schema_version": 1}', now())"""
            )
    finally:
        await conn.close()

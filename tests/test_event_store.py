"""The event store against a real Postgres: concurrency, idempotency, exact money, upcasting."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import asyncpg
import pytest

from shared.db import OWNER_ROLE, role_dsn
from shared.events import BetPlaced, FundsDeposited
from shared.migrate import MigrationError, migrate
from shared.store import (
    DuplicateEventError,
    EventStore,
    NewEvent,
    OptimisticConcurrencyError,
    Snapshot,
    StreamEvent,
    StreamHeads,
)
from tests.conftest import SERVICE_PASSWORD


def deposit(amount: str, asset: str = "PFLEA") -> NewEvent:
    return NewEvent.of(FundsDeposited(amount=Decimal(amount), asset=asset))


async def test_amounts_round_trip_exactly(store: EventStore) -> None:
    await store.append("alice", "agent", [deposit("0.1"), deposit("0.2")], expected_version=0)
    events = [e.decode() for e in await store.read_stream("alice")]
    assert sum(e.amount for e in events) == Decimal("0.3")  # type: ignore[attr-defined]
    await store.append("bob", "agent", [deposit("0.000000000000000001")], expected_version=0)
    [tiny] = await store.read_stream("bob")
    assert tiny.decode().amount == Decimal("1E-18")  # type: ignore[attr-defined]
    assert '"0.000000000000000001"' in tiny.data


async def test_append_returns_new_version_and_reads_in_order(store: EventStore) -> None:
    assert await store.append("s1", "agent", [deposit("1"), deposit("2")], expected_version=0) == 2
    assert await store.append("s1", "agent", [deposit("3")], expected_version=2) == 3
    events = await store.read_stream("s1")
    assert [e.version for e in events] == [1, 2, 3]
    assert [e.version for e in await store.read_stream("s1", 2, 2)] == [2]


async def test_second_writer_with_stale_version_is_rejected(store: EventStore) -> None:
    await store.append("race", "agent", [deposit("1")], expected_version=0)
    results = await asyncio.gather(
        store.append("race", "agent", [deposit("2")], expected_version=1),
        store.append("race", "agent", [deposit("3")], expected_version=1),
        return_exceptions=True,
    )
    wins = [r for r in results if r == 2]
    losses = [r for r in results if isinstance(r, OptimisticConcurrencyError)]
    assert len(wins) == 1 and len(losses) == 1
    assert (losses[0].stream_id, losses[0].expected, losses[0].actual) == ("race", 1, 2)
    assert [e.version for e in await store.read_stream("race")] == [1, 2]


async def test_many_racing_appenders_keep_versions_contiguous(store: EventStore) -> None:
    async def try_append() -> bool:
        while True:
            version = await store.stream_version("busy")
            try:
                await store.append("busy", "agent", [deposit("1")], expected_version=version)
                return True
            except OptimisticConcurrencyError:
                continue

    await asyncio.gather(*(try_append() for _ in range(20)))
    assert [e.version for e in await store.read_stream("busy")] == list(range(1, 21))


async def test_reappending_the_same_event_ids_is_a_no_op(store: EventStore) -> None:
    events = [deposit("5"), deposit("6")]
    assert await store.append("idem", "agent", events, expected_version=0) == 2
    # A retry after an unknown commit outcome: same ids, same (now stale) expected version.
    assert await store.append("idem", "agent", events, expected_version=0) == 2
    assert len(await store.read_stream("idem")) == 2


async def test_partial_overlap_of_event_ids_is_an_error_not_a_conflict(store: EventStore) -> None:
    first = deposit("1")
    await store.append("mix", "agent", [first], expected_version=0)
    with pytest.raises(DuplicateEventError):
        await store.append("mix", "agent", [first, deposit("2")], expected_version=1)
    with pytest.raises(DuplicateEventError):
        await store.append("other", "agent", [first], expected_version=0)


async def test_batch_append_versions_each_stream_and_skips_duplicates(store: EventStore) -> None:
    await store.append("a", "agent", [deposit("1")], expected_version=0)
    known = deposit("9")
    await store.append("b", "agent", [known], expected_version=0)
    items = [StreamEvent(s, "agent", deposit(str(i))) for i, s in enumerate("abab", 1)]
    repeated = deposit("7")
    items += [StreamEvent("b", "agent", known), StreamEvent("c", "agent", repeated)]
    items += [StreamEvent("c", "agent", repeated)]
    items += [StreamEvent("d", "agent", deposit(str(i))) for i in range(100)]  # COPY path
    result = await store.append_batch(items)
    assert sorted(result.duplicates) == sorted([known.event_id, repeated.event_id])
    assert [e.version for e in await store.read_stream("a")] == [1, 2, 3]
    assert [e.version for e in await store.read_stream("b")] == [1, 2, 3]
    assert [e.version for e in await store.read_stream("c")] == [1]
    assert [e.version for e in await store.read_stream("d")] == list(range(1, 101))
    # Re-running the whole batch (a redelivery) stores nothing new.
    again = await store.append_batch(items)
    assert again.appended == []


async def test_batch_append_with_known_heads_equals_the_careful_way(store: EventStore) -> None:
    """The writer trusts the heads it committed; whatever made them stale, versions stay 1..n
    and duplicates are still told apart."""
    heads = StreamHeads()
    first = [StreamEvent(s, "agent", deposit("1")) for s in "ab" * 40]
    await store.append_batch(first, heads=heads)
    assert heads.versions == {"a": 40, "b": 40} and heads.misses == 0
    # Another process appends to "a": the trusted head of "a" is now behind the table.
    await store.append("a", "agent", [deposit("2")], expected_version=40)
    second = [StreamEvent(s, "agent", deposit("3")) for s in "abc" * 30]
    result = await store.append_batch(second, heads=heads)
    assert heads.misses == 1 and len(result.appended) == 90
    assert heads.versions == {"a": 71, "b": 70, "c": 30}
    # A redelivered event (already stored) among new ones: found, skipped, the rest appended.
    third = [StreamEvent("b", "agent", first[1].event), StreamEvent("b", "agent", deposit("4"))]
    result = await store.append_batch(third, heads=heads)
    assert result.duplicates == [first[1].event.event_id] and heads.misses == 2
    # A batch Postgres rejects leaves no trusted head behind that was never committed.
    bad = [StreamEvent("c", "agent", deposit("5")), StreamEvent("x" * 300, "agent", deposit("6"))]
    with pytest.raises(asyncpg.CheckViolationError):
        await store.append_batch(bad, heads=heads)
    assert "c" not in heads.versions
    await store.append_batch([StreamEvent("c", "agent", deposit("7"))], heads=heads)
    for stream, n in {"a": 71, "b": 71, "c": 31}.items():
        assert [e.version for e in await store.read_stream(stream)] == list(range(1, n + 1))


async def test_snapshot_round_trip(store: EventStore) -> None:
    assert await store.load_snapshot("snap", "balance") is None
    await store.append_batch([StreamEvent("snap", "agent", deposit("1")) for _ in range(30)])
    hashes = {e.version: e.hash for e in await store.read_stream("snap")}
    await store.save_snapshot(Snapshot("snap", "balance", 10, 1, '{"PFLEA": "1.5"}', hashes[10]))
    await store.save_snapshot(Snapshot("snap", "balance", 20, 1, '{"PFLEA": "2.5"}', hashes[20]))
    latest = await store.load_snapshot("snap", "balance")
    assert latest is not None and latest.version == 20 and '"2.5"' in latest.state
    older = await store.load_snapshot("snap", "balance", at_or_before=15)
    assert older is not None and older.version == 10


async def test_a_forged_snapshot_is_ignored_and_logged(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot whose event hash is not the stored event's (forged, or of a rewritten history)
    is never folded from: the newest trusted one is used, or none."""
    await store.append_batch([StreamEvent("forged", "agent", deposit("1")) for _ in range(30)])
    hashes = {e.version: e.hash for e in await store.read_stream("forged")}
    await store.save_snapshot(Snapshot("forged", "balance", 10, 1, '{"PFLEA": "10"}', hashes[10]))
    await store.save_snapshot(Snapshot("forged", "balance", 30, 1, '{"PFLEA": "1000000"}', hashes[29]))
    await store.save_snapshot(Snapshot("forged", "balance", 20, 1, '{"PFLEA": "999"}', b""))
    with caplog.at_level("WARNING", logger="shared.store"):
        trusted = await store.load_snapshot("forged", "balance")
    assert trusted is not None and trusted.version == 10
    assert [r.version for r in caplog.records if "snapshot ignored" in r.getMessage()] == [30, 20]  # type: ignore[attr-defined]


async def test_event_stored_in_old_shape_is_read_in_current_shape(
    store: EventStore, database_url: str
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                                   metadata, occurred_at)
               VALUES ($1, 'old', 'agent', 'BetPlaced', 1, '{"stake": "2.50", "game": "dice"}',
                       '{"schema_version": 1}', now())""",
            uuid.uuid4(),
        )
    finally:
        await conn.close()
    [stored] = await store.read_stream("old")
    assert stored.schema_version == 2
    assert stored.decode() == BetPlaced(amount=Decimal("2.50"), asset="PFLEA", game="dice")
    [from_log] = await store.read_all(0)
    assert from_log.decode() == stored.decode()


async def test_migrations_are_idempotent(database_url: str) -> None:
    owner = role_dsn(database_url, OWNER_ROLE, SERVICE_PASSWORD)
    assert await migrate(owner) == []
    assert await migrate(owner) == []


async def test_migrations_refuse_a_superuser(database_url: str) -> None:
    """What a superuser creates, it owns: the grants are written for pflea_owner's tables."""
    with pytest.raises(MigrationError, match="pflea bootstrap"):
        await migrate(database_url)


def test_every_schema_step_has_an_upcaster() -> None:
    from shared.upcasting import missing_upcasters

    assert missing_upcasters() == []

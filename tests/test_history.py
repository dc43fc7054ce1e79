"""Time travel and what-if: exact answers that equal a brute-force fold, and change nothing stored.

The brute force is ``tests.reference.fold`` (written from the definitions, sharing no code with
the folds under test) over the events selected straight from the table.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
import pytest

from services.relay.snapshots import Snapshotter
from shared.db import PROJECTOR_ROLE, READER_ROLE, create_pool, role_dsn
from shared.events import AgentRegistered, BetPlaced, BetWon, FundsDeposited
from shared.history import AgentView, AsOf, History, HistoryError, UnknownAgent, current_state, view
from shared.ops import Lifecycle
from shared.projections.agent import AgentFold
from shared.store import EventStore, NewEvent, StreamEvent
from tests.conftest import SERVICE_PASSWORD
from tests.reference import fold, generate
from tests.test_projections import all_events, deliver_shuffled

AGENTS = 4


class Row(msgspec.Struct, frozen=True):
    event_id: uuid.UUID
    stream_id: str
    version: int
    event_type: str
    data: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime


@pytest.fixture
async def reader_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(role_dsn(database_url, READER_ROLE, SERVICE_PASSWORD))
    yield pool
    await pool.close()


@pytest.fixture
async def projector_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(role_dsn(database_url, PROJECTOR_ROLE, SERVICE_PASSWORD))
    yield pool
    await pool.close()


async def late_arriving_history(store: EventStore, seed: int, events: int = 1200) -> None:
    """A log whose source times are not in version order (late deliveries), written in batches."""
    rng = random.Random(seed)
    items = generate(seed, agents=AGENTS, events=events)
    shaken = []
    for item in items:
        late = timedelta(minutes=rng.randint(1, 90)) if rng.random() < 0.2 else timedelta(0)
        event = msgspec.structs.replace(item.event, occurred_at=item.event.occurred_at - late)
        shaken.append(StreamEvent(item.stream_id, item.stream_type, event))
    for start in range(0, len(shaken), 150):
        await store.append_batch(shaken[start : start + 150])


async def stored(database_url: str) -> list[Row]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """SELECT event_id, stream_id, version, event_type, data, occurred_at, recorded_at
               FROM events ORDER BY stream_id, version"""
        )
    finally:
        await conn.close()
    return [Row(**{**dict(r), "data": msgspec.json.decode(r["data"])}) for r in rows]


def brute_force(
    rows: list[Row], agent: str, keep: Any, extra: Sequence[tuple[str, dict[str, Any]]] = ()
) -> dict[str, Any]:
    """Balances, P&L and portfolio of ``agent`` from the rows ``keep`` accepts, in version order."""
    picked = [(r.stream_id, r.event_type, r.data) for r in rows if r.stream_id == agent and keep(r)]
    result = fold(picked + [(agent, kind, data) for kind, data in extra])
    # One agent: drop the agent from the (agent, asset) keys.
    return {
        "balances": {a: v["balance"] for (s, a), v in result["balances"].items()},
        "pnl": {a: v for (s, a), v in result["pnl"].items()},
        "portfolio": {a: v for (s, a), v in result["portfolio"].items()},
    }


def answer(view: AgentView) -> dict[str, Any]:
    return {
        "balances": view.state.balances(),
        "pnl": view.state.pnl_rows(),
        "portfolio": view.state.portfolio_rows(),
    }


def random_times(rng: random.Random, rows: list[Row], by: str, n: int) -> list[datetime]:
    """Instants on, just before and just after stored times, and outside the stored range."""
    moments = [getattr(r, f"{by}_at") for r in rows]
    picks = [min(moments) - timedelta(days=1), max(moments) + timedelta(days=1)]
    for _ in range(n):
        t = rng.choice(moments)
        picks.append(t + rng.choice([timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1)]))
    return picks


async def test_time_travel_equals_a_brute_force_fold_at_random_points(
    store: EventStore, reader_pool: asyncpg.Pool, database_url: str
) -> None:
    await late_arriving_history(store, seed=21)
    rows = await stored(database_url)
    history = History(reader_pool)
    rng = random.Random(21)
    for agent in sorted({r.stream_id for r in rows}):
        mine = [r for r in rows if r.stream_id == agent]
        for version in [0, len(mine), *rng.sample(range(1, len(mine)), 15)]:
            view = await history.state(agent, AsOf(version=version))
            assert view.version == version
            assert answer(view) == brute_force(rows, agent, lambda r, v=version: r.version <= v)
        for by in ("occurred", "recorded"):
            for t in random_times(rng, mine, by, 15):
                view = await history.state(agent, AsOf(at=t, by=by))
                expected = brute_force(rows, agent, lambda r, t=t, by=by: getattr(r, f"{by}_at") <= t)
                assert answer(view) == expected, f"{agent} as of {by} {t}"


async def test_what_if_without_events_equals_a_fold_that_skips_them_and_changes_nothing_stored(
    store: EventStore, reader_pool: asyncpg.Pool, projector_pool: asyncpg.Pool, database_url: str
) -> None:
    await late_arriving_history(store, seed=22, events=600)
    await deliver_shuffled(projector_pool, await all_events(store), 22)  # read models filled
    before = await checksums(database_url)
    rows = await stored(database_url)
    agent = rows[0].stream_id
    mine = [r for r in rows if r.stream_id == agent]
    rng = random.Random(22)
    history = History(reader_pool)
    bet = next(r for r in mine if r.event_type == "BetPlaced")
    skipped = {bet.event_id, *(r.event_id for r in rng.sample(mine, 5))}
    win = BetWon(amount=Decimal("12.5"), asset="USDC")
    result = await history.what_if(agent, without=skipped, add=[win])
    expected = brute_force(
        rows, agent, lambda r: r.event_id not in skipped, [("BetWon", {"amount": "12.5", "asset": "USDC"})]
    )
    assert answer(result.hypothetical) == expected
    assert answer(result.actual) == brute_force(rows, agent, lambda r: True)
    usdc = result.difference()["balances"]["USDC"]["balance"]
    assert usdc == expected["balances"]["USDC"] - result.actual.state.balances().get("USDC", 0)
    # And as of a point in the past, both base and hypothetical are cut there.
    cut = mine[len(mine) // 2].version
    past = await history.what_if(agent, without=[bet.event_id], as_of=AsOf(version=cut))
    assert answer(past.hypothetical) == brute_force(
        rows, agent, lambda r: r.version <= cut and r.event_id != bet.event_id
    )
    assert await checksums(database_url) == before


async def test_what_if_by_retraction_equals_a_refold_at_random_points(
    store: EventStore, reader_pool: asyncpg.Pool, database_url: str
) -> None:
    """Switching events off is answered from the actual state (AgentFold.without) when that is
    exact, and by a refold otherwise: either way the brute force's answer, with the same counts."""
    await late_arriving_history(store, seed=24, events=900)
    rows = await stored(database_url)
    history = History(reader_pool)
    rng = random.Random(24)
    by_retraction = 0
    for agent in sorted({r.stream_id for r in rows}):
        mine = [r for r in rows if r.stream_id == agent]
        points = [AsOf(), *(AsOf(version=v) for v in rng.sample(range(1, len(mine) + 1), 8))]
        points += [
            AsOf(at=t, by=by) for by in ("occurred", "recorded") for t in random_times(rng, mine, by, 6)
        ]
        for as_of in points:
            skipped = {r.event_id for r in rng.sample(mine, rng.choice([1, 2, 4]))}
            result = await history.what_if(agent, without=skipped, as_of=as_of)
            async with reader_pool.acquire() as conn:
                refold = await view(conn, agent, as_of, skipped)
            assert answer(result.hypothetical) == answer(refold), f"{agent} {as_of} without {skipped}"
            assert result.hypothetical.state.escrows == refold.state.escrows
            assert result.hypothetical.state.registered == refold.state.registered
            counts = ("version", "events", "undecodable", "excluded", "head")
            assert [getattr(result.hypothetical, c) for c in counts] == [getattr(refold, c) for c in counts]
            by_retraction += result.hypothetical.retracted
    assert by_retraction > 40, "retraction was hardly used: the test proves nothing"


def test_without_declines_what_only_a_refold_can_tell() -> None:
    deposit = FundsDeposited(amount=Decimal("5.00"), asset="PFLEA")
    bet, other_bet = (BetPlaced(amount=Decimal(n), asset="PFLEA", game="dice") for n in ("2", "1"))
    state = AgentFold()
    for event in (AgentRegistered(), deposit, bet, other_bet):
        state.apply(event)
    after = state.without([bet])
    assert after is not None and after.balances() == {"PFLEA": Decimal("4.00")}
    assert (after.pnl["PFLEA"].total_wagered, after.pnl["PFLEA"].bet_count) == (Decimal(1), 1)
    assert state.balances() == {"PFLEA": Decimal("2.00")}, "the state taken from is left as it was"
    assert state.pnl["PFLEA"].bet_count == 2
    assert state.without([AgentRegistered()]) is None  # stateful: refold
    assert state.without([bet, other_bet]) is None  # P&L row left all zero: a refold has none


async def test_snapshots_give_identical_answers(
    store: EventStore, reader_pool: asyncpg.Pool, database_url: str
) -> None:
    await late_arriving_history(store, seed=23, events=900)
    snapshotter = Snapshotter(store, Lifecycle(), every=7, batch_size=250)
    while await snapshotter.snapshot_once():
        pass
    rows = await stored(database_url)
    with_snapshots, without_snapshots = History(reader_pool), History(reader_pool, use_snapshots=False)
    rng = random.Random(23)
    used = 0
    for agent in sorted({r.stream_id for r in rows}):
        mine = [r for r in rows if r.stream_id == agent]
        points = [AsOf(), *(AsOf(version=v) for v in rng.sample(range(1, len(mine) + 1), 10))]
        points += [AsOf(at=t, by="occurred") for t in random_times(rng, mine, "occurred", 8)]
        points += [AsOf(at=t, by="recorded") for t in random_times(rng, mine, "recorded", 8)]
        for as_of in points:
            skip = {r.event_id for r in rng.sample(mine, rng.choice([0, 1, 3]))}
            fast = await with_snapshots.state(agent, as_of, without=skip)
            slow = await without_snapshots.state(agent, as_of, without=skip)
            assert slow.snapshot_version == 0
            used += fast.snapshot_version > 0
            assert answer(fast) == answer(slow)
            assert fast.state.escrows == slow.state.escrows
            assert (fast.version, fast.events) == (slow.version, slow.events)
    assert used > 50, "the snapshots were hardly used: the test proves nothing"


async def test_a_snapshot_of_an_older_schema_is_ignored_not_misread(
    store: EventStore, reader_pool: asyncpg.Pool, database_url: str
) -> None:
    await store.append_batch(
        [StreamEvent("a1", "agent", NewEvent.of(FundsDeposited(amount=Decimal(5), asset="PFLEA")))]
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """INSERT INTO snapshots (stream_id, snapshot_type, version, schema_version, state)
               VALUES ('a1', 'agent', 1, 0, '{"balance": "nonsense"}')"""
        )
    finally:
        await conn.close()
    view = await History(reader_pool).state("a1")
    assert view.state.balances() == {"PFLEA": Decimal(5)}
    assert view.snapshot_version == 0


async def test_questions_without_an_answer_say_why(store: EventStore, reader_pool: asyncpg.Pool) -> None:
    await store.append_batch(generate(5, agents=1, events=10))
    history = History(reader_pool)
    with pytest.raises(UnknownAgent, match="nobody"):
        await history.state("nobody")
    with pytest.raises(HistoryError, match="is at version 10, there is no version 11"):
        await history.state("agent-000", AsOf(version=11))
    with pytest.raises(HistoryError, match="not events of agent-000"):
        await history.state("agent-000", without=[uuid.uuid4()])
    with pytest.raises(HistoryError, match="no time zone"):
        AsOf(at=datetime(2026, 1, 1))


async def checksums(database_url: str) -> dict[str, str]:
    """A digest of every table a query might touch: what-if must leave them all as they were."""
    tables = [
        "events",
        "snapshots",
        "command_results",
        "balances",
        "pnl",
        "portfolio",
        "leaderboard_entries",
        "projection_checkpoints",
        "projection_positions",
        "quarantine",
    ]
    digest = (
        "SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM {} x"
    )
    conn = await asyncpg.connect(database_url)
    try:
        return {t: await conn.fetchval(digest.format(t)) for t in tables}
    finally:
        await conn.close()


async def test_old_event_shapes_are_upcast_in_time_travel_and_in_command_decisions(
    store: EventStore, reader_pool: asyncpg.Pool, database_url: str
) -> None:
    await store.append("old", "agent", [NewEvent.of(FundsDeposited(amount=Decimal(10), asset="PFLEA"))], 0)
    conn = await asyncpg.connect(database_url)
    try:  # a BetPlaced in its v1 shape: the amount was called "stake" and the asset was implied
        await conn.execute(
            """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data,
                                   metadata, occurred_at)
               VALUES ($1, 'old', 'agent', 'BetPlaced', 2, '{"stake": "2.50", "game": "dice"}',
                       '{"schema_version": 1}', now())""",
            uuid.uuid4(),
        )
    finally:
        await conn.close()
    view = await History(reader_pool).state("old", AsOf(version=2))
    assert view.state.balances() == {"PFLEA": Decimal("7.50")}
    assert view.state.pnl_rows()["PFLEA"]["total_wagered"] == Decimal("2.50")
    async with reader_pool.acquire() as conn:
        state, version = await current_state(conn, "old")
    assert (state.available("PFLEA"), version) == (Decimal("7.50"), 2)

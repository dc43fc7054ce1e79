"""Agent commands: validated against the agent's state before any event exists, applied once.

The handler runs in-process against the real NATS and Postgres, or inside real writer
processes; commands are sent through the public ``LedgerClient``.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.simulator import Simulator, load_simulator_config, running_simulator
from services.simulator.content import WIN_PROBABILITY
from services.writer.commands import CommandHandler
from shared.commands import Code, command_event_id
from shared.envelope import bet_event_id, ingested_event_id
from shared.events import AgentRegistered, FundsDeposited
from shared.jetstream import Topology
from shared.ledger_client import LedgerClient
from shared.ops import Lifecycle
from shared.projections.agent import AgentFold
from shared.settings import Settings, SettingsError, load_settings
from shared.store import EventStore, NewEvent
from shared.wire import decode_reply
from tests.support import service_env, truth_event_id


@pytest.fixture
async def start_handlers(
    settings: Settings, store: EventStore, topology: Topology, js_streams: nats.NATS
) -> AsyncIterator[Callable[[int], Awaitable[LedgerClient]]]:
    """Start N in-process command handlers (one queue group) and return a client for them."""
    lifecycle = Lifecycle()
    tasks: list[asyncio.Task[None]] = []
    conns: list[nats.NATS] = []

    async def start(n: int = 1) -> LedgerClient:
        for _ in range(n):
            nc = await nats.connect(settings.nats_url)
            conns.append(nc)
            handler = CommandHandler(nc, store, topology, settings, lifecycle)
            tasks.append(asyncio.create_task(handler.run()))
            await nc.flush()
        await asyncio.sleep(0)  # let the handlers subscribe
        for nc in conns:
            await nc.flush()
        return LedgerClient(js_streams, topology, timeout_s=10)

    yield start
    lifecycle.stop()
    await asyncio.gather(*tasks)
    for nc in conns:
        await nc.close()


async def funded(store: EventStore, agent: str, amount: str, asset: str = "PFLEA") -> None:
    """An agent registered and credited, as the ingester would have recorded it."""
    await store.append(
        agent,
        "agent",
        [
            NewEvent.of(AgentRegistered(name=agent)),
            NewEvent.of(FundsDeposited(amount=Decimal(amount), asset=asset)),
        ],
        expected_version=0,
    )


async def balances_along_the_stream(store: EventStore, agent: str) -> list[dict[str, Decimal]]:
    """The agent's balances after each event, in version order."""
    state, seen = AgentFold(), []
    for recorded in await store.read_stream(agent):
        state.apply(recorded.decode())
        seen.append(state.balances())
    return seen


async def count(database_url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def agent_name() -> str:
    return f"agent-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("writers", [1, 2])
async def test_two_bets_racing_for_the_last_funds_one_is_accepted_one_rejected(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore, writers: int
) -> None:
    # One writer serialises an agent's commands; two race, and the event store decides.
    client = await start_handlers(writers)
    for _ in range(5):
        agent = agent_name()
        await funded(store, agent, "10")
        replies = await asyncio.gather(
            client.place_bet(agent, "dice", "10"), client.place_bet(agent, "crash", "10")
        )
        assert sorted(r.status for r in replies) == ["accepted", "rejected"]
        rejected = next(r for r in replies if not r.accepted)
        assert rejected.code == Code.INSUFFICIENT_FUNDS
        assert "needs 10, only 0 available" in (rejected.reason or "")
        history = await balances_along_the_stream(store, agent)
        assert history[-1]["PFLEA"] == 0
        assert all(b.get("PFLEA", 0) >= 0 for b in history)


async def test_many_bets_across_two_writer_processes_never_overdraw(
    settings: Settings, store: EventStore, js_streams: nats.NATS, topology: Topology, tmp_path: Path
) -> None:
    env = service_env(settings)
    writers = []
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
        writers.append(ServiceProcess("services.writer", env, tmp_path / f"w{i}"))
    try:
        for writer in writers:
            writer.start()
        for writer in writers:
            await writer.wait_ready()
        client = LedgerClient(js_streams, topology, timeout_s=20)
        agent = agent_name()
        await funded(store, agent, "10")
        replies = await asyncio.gather(*(client.place_bet(agent, "dice", "1") for _ in range(30)))
        assert sum(r.accepted for r in replies) == 10
        assert {r.code for r in replies if not r.accepted} == {Code.INSUFFICIENT_FUNDS}
        history = await balances_along_the_stream(store, agent)
        assert history[-1]["PFLEA"] == 0
        assert all(b.get("PFLEA", 0) >= 0 for b in history)
        for writer in writers:
            assert writer.terminate() == 0, writer.log_tail()
    finally:
        for writer in writers:
            writer.kill()


async def test_a_retried_command_applies_once_and_gets_the_original_answer(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore, settings: Settings
) -> None:
    client = await start_handlers(2)
    agent = agent_name()
    await funded(store, agent, "10")
    command_id = uuid.uuid4()
    first = await client.place_bet(agent, "dice", "4", command_id=command_id)
    # The same command again, some of them at the same time: one bet, one answer.
    again = await asyncio.gather(
        *(client.place_bet(agent, "dice", "4", command_id=command_id) for _ in range(5))
    )
    assert first.accepted
    assert all(reply == first for reply in again)
    assert list(first.event_ids) == [command_event_id(command_id, 0)]
    assert (await balances_along_the_stream(store, agent))[-1]["PFLEA"] == 6
    assert await count(settings.database_url, "SELECT count(*) FROM events WHERE stream_id = $1", agent) == 3


async def test_a_rejection_is_the_answer_for_its_command_id_even_after_funds_arrive(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    await funded(store, agent, "1")
    command_id = uuid.uuid4()
    first = await client.withdraw_funds(agent, "5", "PFLEA", "0xabc", command_id=command_id)
    await store.append(agent, "agent", [NewEvent.of(FundsDeposited(amount=Decimal(10), asset="PFLEA"))], None)
    assert await client.withdraw_funds(agent, "5", "PFLEA", "0xabc", command_id=command_id) == first
    assert first.code == Code.INSUFFICIENT_FUNDS
    assert (await client.withdraw_funds(agent, "5", "PFLEA", "0xabc")).accepted


async def test_a_command_id_reused_for_another_command_is_refused(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    await funded(store, agent, "10")
    command_id = uuid.uuid4()
    assert (await client.place_bet(agent, "dice", "1", command_id=command_id)).accepted
    reply = await client.withdraw_funds(agent, "1", "PFLEA", "0xabc", command_id=command_id)
    assert reply.code == Code.BAD_COMMAND and "new command_id" in (reply.reason or "")
    assert (await balances_along_the_stream(store, agent))[-1]["PFLEA"] == 9


async def test_an_unknown_agent_is_rejected_and_nothing_is_recorded(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], settings: Settings
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    replies = [
        await client.place_bet(agent, "dice", "1"),
        await client.claim_faucet(agent),
        await client.lock_escrow(agent, "1", "PFLEA", "e1"),
    ]
    assert {r.code for r in replies} == {Code.UNKNOWN_AGENT}
    assert "RegisterAgent" in (replies[0].reason or "")
    assert await count(settings.database_url, "SELECT count(*) FROM events") == 0


async def test_a_registered_agent_claims_the_faucet_and_bets_with_it(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    assert (await client.register_agent(agent, "Ada")).accepted
    assert (await client.register_agent(agent)).code == Code.ALREADY_REGISTERED
    faucet = await client.claim_faucet(agent)
    assert faucet.accepted and faucet.version == 2
    bet = await client.place_bet(agent, "dice", Decimal("2.50"))
    # No Purple Flea API configured: the bet is recorded, its outcome is not known.
    assert bet.accepted and bet.won is None
    types = [e.event_type for e in await store.read_stream(agent)]
    assert types == ["AgentRegistered", "FaucetClaimed", "BetPlaced"]
    assert (await balances_along_the_stream(store, agent))[-1] == {"PFLEA": Decimal("7.50")}


async def test_the_local_faucet_is_rate_limited_per_agent(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore
) -> None:
    """Default: one claim per agent per day, when no Purple Flea API answers it; the refusal
    says when the next one may come, and is kept like any rejection (same id, same answer)."""
    client = await start_handlers(2)
    agent, other = agent_name(), agent_name()
    for name in (agent, other):
        assert (await client.register_agent(name)).accepted
    assert (await client.claim_faucet(agent)).accepted
    again = await client.claim_faucet(agent)
    assert again.code == Code.RATE_LIMITED and "the next one from" in (again.reason or "")
    assert (await client.claim_faucet(agent, command_id=again.command_id)).code == Code.RATE_LIMITED
    assert (await client.claim_faucet(other)).accepted  # per agent
    # Two writers at once: still one claim (a loser's append conflicts, its retry counts it).
    third = agent_name()
    assert (await client.register_agent(third)).accepted
    replies = await asyncio.gather(*(client.claim_faucet(third) for _ in range(8)))
    assert sum(r.accepted for r in replies) == 1, [r.code for r in replies]
    types = [e.event_type for e in await store.read_stream(agent)]
    assert types == ["AgentRegistered", "FaucetClaimed"]


def test_faucet_limits_are_positive_settings() -> None:
    assert load_settings({"PFLEA_FAUCET_CLAIMS": "3", "PFLEA_FAUCET_WINDOW_S": "60"}).faucet_claims == 3
    for variable in ("PFLEA_FAUCET_CLAIMS", "PFLEA_FAUCET_WINDOW_S"):
        with pytest.raises(SettingsError, match=variable):
            load_settings({variable: "0"})


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-1", "0", "1e309", "abc", "0.0000000000000000001"])
async def test_a_bad_amount_is_rejected_naming_the_field(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore, amount: str
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    await funded(store, agent, "10")
    reply = await client.place_bet(agent, "dice", amount)
    assert reply.status == "rejected" and reply.code == Code.BAD_AMOUNT
    assert (reply.reason or "").startswith("amount:")
    assert await store.stream_version(agent) == 2


async def test_escrow_is_locked_released_once_and_never_released_twice(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], store: EventStore
) -> None:
    client = await start_handlers(1)
    agent = agent_name()
    await funded(store, agent, "10", "USDC")
    assert (await client.lock_escrow(agent, "4", "USDC", "deal-1")).accepted
    assert (await client.lock_escrow(agent, "1", "USDC", "deal-1")).code == Code.ESCROW_EXISTS
    assert (await client.lock_escrow(agent, "7", "USDC", "deal-2")).code == Code.INSUFFICIENT_FUNDS
    assert (await client.release_escrow(agent, "deal-9")).code == Code.ESCROW_NOT_LOCKED
    released = await client.release_escrow(agent, "deal-1")
    assert released.accepted
    assert (await client.release_escrow(agent, "deal-1")).code == Code.ESCROW_NOT_LOCKED
    state = AgentFold()
    for recorded in await store.read_stream(agent):
        state.apply(recorded.decode())
    assert state.portfolio_rows()["USDC"] == {
        "available": Decimal(10),
        "in_escrow": Decimal(0),
        "total": Decimal(10),
    }


async def test_a_message_that_is_not_a_command_gets_a_reason(
    start_handlers: Callable[[int], Awaitable[LedgerClient]], js_streams: nats.NATS, topology: Topology
) -> None:
    await start_handlers(1)
    msg = await js_streams.request(topology.command_subject("agent-x", "PlaceBet"), b'{"nope": 1}', timeout=5)
    reply = decode_reply(msg.data)
    assert reply.status == "rejected" and reply.code == Code.BAD_COMMAND


async def _stored_once(database_url: str, sim: Simulator, agent: str) -> bool:
    """Whether every well-formed transaction of ``agent`` so far is stored, each exactly once
    (under its identity), and nothing else from a feed is."""
    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch(
            "SELECT event_id FROM events WHERE stream_id = $1 AND metadata ? 'feed'",
            agent,
        )
    finally:
        await conn.close()
    # The truth after the query: the feed only grows, so nothing stored can be missing from it.
    expected = {truth_event_id(tx) for tx in sim.truth(agent) if tx.malformed is None}
    ids = [r["event_id"] for r in stored]
    assert len(ids) == len(set(ids))
    assert set(ids) <= expected, set(ids) - expected
    return set(ids) == expected


async def test_bets_and_claims_through_purple_flea_record_its_answers_and_the_feeds_never_double_them(
    settings: Settings, store: EventStore, js_streams: nats.NATS, topology: Topology, tmp_path: Path
) -> None:
    sim = Simulator(load_simulator_config({}, port=0, seed=5, agents=2, backlog=40, rate=10))
    async with running_simulator(sim.config, sim) as url:
        env = service_env(
            settings,
            PURPLEFLEA_API_URL=url,
            PFLEA_AGENTS_FROM_SIMULATOR="1",
            PFLEA_INGEST_POLL_INTERVAL_S="0.1",
        )
        ingester = ServiceProcess("services.ingester", env, tmp_path)
        writer = ServiceProcess("services.writer", env, tmp_path)
        try:
            ingester.start()
            writer.start()
            agent = "agent-0001"
            ingested = lambda: _stored_once(settings.database_url, sim, agent)  # noqa: E731
            await wait_until(ingested, 60, "the backlog ingested")
            # The ingester stops while the feeds keep growing: the bets land ahead of what it read.
            assert ingester.terminate() == 0, ingester.log_tail()
            unread = len(sim.truth(agent))
            await wait_until(lambda: _grown(sim, agent, unread + 3), 30, "the feed to grow")
            await writer.wait_ready()
            client = LedgerClient(js_streams, topology, timeout_s=20)
            bets = [await client.place_bet(agent, "dice", "1.00") for _ in range(6)]
            faucet = await client.claim_faucet(agent)
            assert all(r.accepted for r in [*bets, faucet]), [r.reason for r in [*bets, faucet]]
            for reply in bets:
                assert reply.bet_id is not None
                won = [False, True] if reply.won else [False]
                assert list(reply.event_ids) == [bet_event_id(agent, reply.bet_id, won=w) for w in won]
                assert reply.payout == (Decimal("2.00") if reply.won else Decimal(0))
            assert {r.won for r in bets} == {True, False}
            assert len(faucet.tx_ids) == 1
            assert list(faucet.event_ids) == [ingested_event_id("faucet", agent, faucet.tx_ids[0])]
            recorded = {e.event_id: e for e in await store.read_stream(agent)}
            for reply in [*bets, faucet]:
                for event_id in reply.event_ids:
                    assert recorded[event_id].meta()["origin"] == "purpleflea"
            ingester.start()  # resumes, polls the bets' and the claim's reports, and what it skipped
            await wait_until(ingested, 60, "every transaction ingested")
            await wait_until(lambda: _writer_drained(js_streams, topology), 30, "writer caught up")
            # The feeds keep growing meanwhile: everything up to now, each exactly once.
            await wait_until(ingested, 60, "every transaction ingested")
        finally:
            ingester.kill()
            writer.kill()


async def _grown(sim: Simulator, agent: str, size: int) -> bool:
    return len(sim.truth(agent)) >= size


async def _writer_drained(nc: nats.NATS, topology: Topology) -> bool:
    info = await nc.jetstream().consumer_info(topology.tx_stream, topology.writer_durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.parametrize("raw", ["NaN", "-1", "0", "ten", "1e309"])
def test_a_bad_faucet_amount_names_its_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="PFLEA_FAUCET_AMOUNT"):
        load_settings({"PFLEA_FAUCET_AMOUNT": raw})


def _first_bet_loses(seed: int, agent: str) -> bool:
    """Whether the simulator's first command bet of ``agent`` loses (its outcomes are seeded)."""
    return random.Random(f"{seed}:{agent}:commands").random() >= WIN_PROBABILITY


async def test_a_bet_retried_after_purple_flea_applied_it_gets_its_outcome_not_a_rejection(
    settings: Settings, store: EventStore, js_streams: nats.NATS, topology: Topology, tmp_path: Path
) -> None:
    seed = 9
    sim = Simulator(load_simulator_config({}, port=0, seed=seed, agents=4, backlog=30, rate=0))
    agent = next(a.agent_id for a in sim.credentials if _first_bet_loses(seed, a.agent_id))
    async with running_simulator(sim.config, sim) as url:
        env = service_env(
            settings,
            PURPLEFLEA_API_URL=url,
            PFLEA_AGENTS_FROM_SIMULATOR="1",
            PFLEA_INGEST_POLL_INTERVAL_S="0.1",
        )
        ingester = ServiceProcess("services.ingester", env, tmp_path).start()
        writer = ServiceProcess("services.writer", env, tmp_path).start()
        try:
            all_ingested = lambda: _stored_once(settings.database_url, sim, agent)  # noqa: E731
            await wait_until(all_ingested, 60, "the backlog ingested")
            everything = sim.balances(agent)[0]["PFLEA"]
            # A writer sent this bet of everything to Purple Flea, then died before its commit;
            # the ingester has since stored the bet, so the ledger now shows no PFLEA left.
            command_id = uuid.uuid4()
            conn = await asyncpg.connect(settings.database_url)
            try:
                await conn.execute(
                    """INSERT INTO command_attempts (command_id, agent_id, command_type)
                       VALUES ($1, $2, 'PlaceBet')""",
                    command_id,
                    agent,
                )
            finally:
                await conn.close()
            outcome = sim.place_bet(agent, "dice", everything, "PFLEA", str(command_id))
            assert not outcome.won
            await wait_until(all_ingested, 60, "the bet ingested")
            await writer.wait_ready()
            client = LedgerClient(js_streams, topology, timeout_s=20)
            retried = await client.place_bet(agent, "dice", everything, command_id=command_id)
            assert retried.accepted and retried.won is False, retried.reason
            assert retried.bet_id == outcome.bet_id
            fresh = await client.place_bet(agent, "dice", "1")
            assert fresh.code == Code.INSUFFICIENT_FUNDS
            assert await _stored_once(settings.database_url, sim, agent)
        finally:
            ingester.kill()
            writer.kill()

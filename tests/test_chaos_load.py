"""Chaos under contention and backlog: commands racing for the same funds across two writers
that get killed, and a slow projector facing 100 000 events.

Seeds: ``PFLEA_CHAOS_SEEDS`` (default 1,2,3; the 100k backlog runs the first seed only unless
seeds are given). Each run ends with the one invariant checker.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec
import pytest

from shared.commands import Reply
from shared.ledger_client import LedgerClient, LedgerUnavailable
from tests.chaos import scenarios
from tests.chaos.backlog import append_backlog, backlog
from tests.chaos.checker import PROJECTIONS
from tests.chaos.fixtures import chaos_run, chaos_servers_fixture  # noqa: F401 - fixture
from tests.chaos.schedule import chaos_seeds, rng_for
from tests.chaos.servers import ChaosServers

pytestmark = pytest.mark.chaos
# Nothing here kills nats-server, so it need not fsync each message: the 100k backlog relays
# ~10x faster (see EmbeddedNats).
CHAOS_DURABLE_NATS = False

FUNDS = Decimal("100.00")


def _test_id(request: pytest.FixtureRequest) -> str:
    return request.node.nodeid.split("[")[0]


@pytest.mark.parametrize("seed", chaos_seeds())
async def test_commands_racing_for_the_same_funds_across_two_killed_writers_never_overdraw(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    schedule = scenarios.command_race(seed, _test_id(request))
    env = {"PFLEA_FAUCET_AMOUNT": str(FUNDS)}
    services = ("writer", "writer-2", "relay", *(f"projector-{p}" for p in PROJECTIONS))
    async with chaos_run(chaos_servers, schedule, tmp_path, env=env) as run:
        await run.start_services(services)
        client = LedgerClient(await run.nats(), run.topology, timeout_s=2.0, attempts=3)
        agents = [f"racer-{i}" for i in range(4)]
        for agent in agents:
            assert (await _until_answered(client.register_agent, agent)).accepted
            assert (await _until_answered(client.claim_faucet, agent)).accepted
        races = [_race(client, agent, rng_for(f"race:{agent}", seed)) for agent in agents]
        faults = asyncio.create_task(run.play())
        outcomes = await asyncio.gather(*races)
        await faults
        verdict = await run.finish()
        conn = await asyncpg.connect(run.database_url)
        try:
            for agent, replies in zip(agents, outcomes, strict=True):
                await _assert_spent_exactly_once(conn, agent, replies)
        finally:
            await conn.close()
    assert verdict.ok, verdict.explain()


async def _until_answered(send, *args, **kwargs) -> Reply:  # noqa: ANN001 - a LedgerClient method
    """The final answer to one command, resending it with the same id while no writer answers."""
    command_id = kwargs.pop("command_id", None) or uuid.uuid4()
    for _ in range(15):
        try:
            reply = await send(*args, command_id=command_id, **kwargs)
        except LedgerUnavailable:
            continue
        if not reply.retryable:
            return reply
    raise AssertionError(f"no final answer to command {command_id} of {args}")


async def _race(client: LedgerClient, agent: str, rng) -> list[tuple[Reply, Decimal]]:  # noqa: ANN001
    """40 bets and withdrawals worth ~2x the agent's funds, sent at seeded instants over the
    2.5 s in which the writers get killed, so that some are in flight when one dies."""

    async def send(at_s: float, amount: Decimal, bet: bool) -> tuple[Reply, Decimal]:
        await asyncio.sleep(at_s)
        if bet:
            return await _until_answered(client.place_bet, agent, "dice", amount), amount
        return await _until_answered(client.withdraw_funds, agent, amount, "PFLEA", "0xabc"), amount

    plan = [
        (rng.uniform(0, 2.5), Decimal(rng.randint(200, 800)).scaleb(-2), rng.random() < 0.6)
        for _ in range(40)
    ]
    return list(await asyncio.gather(*(send(*step) for step in plan)))


async def _assert_spent_exactly_once(
    conn: asyncpg.Connection, agent: str, replies: list[tuple[Reply, Decimal]]
) -> None:
    accepted = [amount for reply, amount in replies if reply.accepted]
    refused = {reply.code for reply, _ in replies if not reply.accepted}
    assert refused <= {"insufficient_funds"}, f"{agent}: unexpected refusals {refused}"
    assert accepted and len(accepted) < len(replies), f"{agent}: the race was not a race"
    spent = sum(accepted, Decimal(0))
    rows = await conn.fetch(
        "SELECT event_type, data FROM events WHERE stream_id = $1 ORDER BY version", agent
    )
    balance, lowest, debits = Decimal(0), Decimal(0), 0
    for row in rows:
        amount = Decimal(msgspec.json.decode(row["data"]).get("amount", "0"))
        if row["event_type"] == "FaucetClaimed":
            balance += amount
        elif row["event_type"] in ("BetPlaced", "FundsWithdrawn"):
            balance -= amount
            debits += 1
        lowest = min(lowest, balance)
    assert debits == len(accepted), f"{agent}: {debits} debits stored for {len(accepted)} accepted commands"
    assert lowest >= 0, f"{agent}: the balance went to {lowest} at some version: funds were spent twice"
    assert balance == FUNDS - spent
    assert (
        await conn.fetchval("SELECT balance FROM balances WHERE agent_id = $1 AND asset = 'PFLEA'", agent)
        == FUNDS - spent
    )


@pytest.mark.parametrize("seed", chaos_seeds(heavy=True))
@pytest.mark.timeout(300)
async def test_a_slow_projector_drains_a_100k_backlog_without_a_redelivery_storm(
    chaos_servers: ChaosServers, seed: int, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ack_wait_s, batch = 0.5, 5000  # every batch of the slow projector outlasts the ack wait
    schedule, slow = scenarios.slow_projector(seed, _test_id(request), ack_wait_s)
    env = {"PFLEA_ACK_WAIT_S": str(ack_wait_s), "PFLEA_PROJECTOR_BATCH_SIZE": str(batch)}
    async with chaos_run(chaos_servers, schedule, tmp_path, env=env) as run:
        run.external = await append_backlog(run.database_url, backlog(seed, agents=50, events=100_000))
        await run.start_services(("writer", "relay", *(f"projector-{p}" for p in PROJECTIONS if p != slow)))
        await run.play()

        redelivered: list[int] = []

        async def count_redeliveries() -> None:
            js = await run.js()
            info = await js.consumer_info(run.topology.events_stream, run.topology.projector_durable(slow))
            redelivered.append(int(info.num_redelivered or 0))
            run.notes["redelivered"] = redelivered[0]

        verdict = await run.finish(converge_s=200, measure=count_redeliveries)
    assert verdict.ok, verdict.explain()
    # A batch may be redelivered once around a fetch boundary; a storm redelivers the backlog.
    assert redelivered[0] <= batch, f"{redelivered[0]} redeliveries of a 100 000-event backlog"

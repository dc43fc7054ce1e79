"""The ``pflea`` CLI as a user runs it: a subprocess with the environment, against real servers."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from shared.db import PROJECTOR_ROLE, create_pool, role_dsn
from shared.events import FundsDeposited
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore, NewEvent
from tests.conftest import SERVICE_PASSWORD
from tests.reference import generate
from tests.support import REPO, service_env
from tests.test_projections import all_events, deliver_shuffled


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return msgspec.json.decode(self.out)


async def pflea(settings: Settings, *args: str) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        # The test's own data folder: agents' credentials are written there.
        env=service_env(settings, PFLEA_DATA_DIR=str(settings.data_dir)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def projected(store: EventStore, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A log of 8 agents with every read model caught up; yields an owner connection."""
    await store.append_batch(generate(31, agents=8, events=800))
    pool = await create_pool(role_dsn(database_url, PROJECTOR_ROLE, SERVICE_PASSWORD))
    try:
        await deliver_shuffled(pool, await all_events(store), 31)
    finally:
        await pool.close()
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


def decimals(rows: dict[str, Any], text: tuple[str, ...] = ("asset", "agent_id")) -> dict[str, Any]:
    """JSON amounts (strings) back to Decimal; counts and the ``text`` fields kept as they are."""
    return {
        k: decimals(v) if isinstance(v, dict) else Decimal(v) if isinstance(v, str) and k not in text else v
        for k, v in rows.items()
    }


async def test_balance_pnl_portfolio_and_leaderboard_json_match_the_read_models(
    settings: Settings, projected: asyncpg.Connection
) -> None:
    agents = [r["stream_id"] for r in await projected.fetch("SELECT DISTINCT stream_id FROM events")]
    for agent in agents[:3]:
        balances = await projected.fetch("SELECT asset, balance FROM balances WHERE agent_id = $1", agent)
        shown = await pflea(settings, "balance", agent, "--json")
        assert shown.code == 0, shown.err
        assert decimals(shown.json()["balances"]) == {r["asset"]: r["balance"] for r in balances}
        pnl = await projected.fetch("SELECT * FROM pnl WHERE agent_id = $1", agent)
        shown = await pflea(settings, "pnl", agent, "--json")
        expected = {
            r["asset"]: {k: v for k, v in dict(r).items() if k not in ("agent_id", "asset", "last_position")}
            for r in pnl
        }
        assert decimals(shown.json()["pnl"]) == expected
        portfolio = await projected.fetch("SELECT * FROM portfolio WHERE agent_id = $1", agent)
        shown = await pflea(settings, "portfolio", agent, "--json", "--asset", "usdc")
        expected = {
            r["asset"]: {"available": r["available"], "in_escrow": r["in_escrow"], "total": r["total"]}
            for r in portfolio
            if r["asset"] == "USDC"
        }
        assert decimals(shown.json()["portfolio"]) == expected
    board = await projected.fetch("SELECT * FROM leaderboard ORDER BY asset, rank, agent_id")
    shown = await pflea(settings, "leaderboard", "--json", "--top", "1000")
    assert [decimals(row) for row in shown.json()["leaderboard"]] == [dict(r) for r in board]
    top = await pflea(settings, "leaderboard", "--json", "--asset", "PFLEA", "--top", "2")
    assert [r["agent_id"] for r in top.json()["leaderboard"]] == [
        r["agent_id"] for r in board if r["asset"] == "PFLEA"
    ][:2]
    table = await pflea(settings, "leaderboard")
    assert table.code == 0 and table.out.splitlines()[0].split()[:3] == ["asset", "rank", "agent_id"]


async def test_balance_as_of_a_version_a_time_and_without_an_event(
    settings: Settings, store: EventStore, projected: asyncpg.Connection
) -> None:
    agent = "agent-000"
    events = await store.read_stream(agent)
    middle = events[len(events) // 2]
    by_version = await pflea(settings, "balance", agent, "--version", str(middle.version), "--json")
    at_time = await pflea(
        settings, "balance", agent, "--at", middle.recorded_at.isoformat(), "--by", "recorded", "--json"
    )
    assert by_version.code == 0, by_version.err
    assert by_version.json()["balances"] == at_time.json()["balances"]
    assert by_version.json()["version"] == middle.version
    deposit = next(e for e in events if e.event_type == "FundsDeposited")
    amount = Decimal(msgspec.json.decode(deposit.data)["amount"])
    asset = msgspec.json.decode(deposit.data)["asset"]
    what_if = await pflea(settings, "balance", agent, "--without", str(deposit.event_id), "--json")
    answer = what_if.json()
    assert Decimal(answer["difference"]["balances"][asset]) == -amount
    assert Decimal(answer["balances"][asset]) == Decimal(answer["actual"]["balances"][asset]) - amount
    human = await pflea(settings, "balance", agent, "--without", str(deposit.event_id))
    assert human.code == 0 and "what-if" in human.out and f"-{amount}" in human.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["balance", "nobody"], "agent 'nobody' has no events"),
        (["pnl", "agent-000", "--at", "yesterday"], "--at: 'yesterday' is not an ISO 8601 time"),
        (["portfolio", "agent-000", "--version", "99999"], "there is no version 99999"),
        (["balance", "agent-000", "--without", "not-a-uuid"], "is not an event id"),
        (["events", "nobody"], "agent 'nobody' has no events"),
        (["quarantine", "--show", "12345"], "no entry 12345"),
    ],
)
async def test_a_question_without_an_answer_fails_clearly(
    settings: Settings, projected: asyncpg.Connection, args: list[str], message: str
) -> None:
    result = await pflea(settings, *args)
    assert result.code == 1
    assert message in result.err


@pytest.fixture
async def writer(settings: Settings, tmp_path: Path, js_streams: nats.NATS) -> AsyncIterator[ServiceProcess]:
    """The writer, and the relay and snapshotter beside it."""
    procs = [
        ServiceProcess(m, service_env(settings), tmp_path) for m in ("services.writer", "services.relay")
    ]
    try:
        for proc in procs:
            await proc.start().wait_ready()
        yield procs[0]
    finally:
        for proc in procs:
            proc.kill()


async def test_services_run_on_uvloop(writer: ServiceProcess) -> None:
    """uvloop is a dependency (shared/service.py says what it saves): the services use it."""
    started = [
        msgspec.json.decode(line)
        for line in writer.log_path.read_text().splitlines()
        if line.startswith("{") and '"starting ' in line
    ]
    assert [entry["event_loop"] for entry in started] == ["uvloop"]


async def test_commands_from_the_cli_print_the_reply_and_exit_non_zero_when_rejected(
    settings: Settings, writer: ServiceProcess
) -> None:
    # Each agent sends with its own credentials (this plain server checks none of them).
    for agent in ("ada", "bob"):
        added = await pflea(settings, "agents", "add", agent)
        assert added.code == 0, added.err
    assert (await pflea(settings, "agent", "ada", "register", "--name", "Ada")).code == 0
    assert (await pflea(settings, "agent", "ada", "faucet")).code == 0  # 10.00 PFLEA
    command_id = str(uuid.uuid4())
    bet = await pflea(settings, "agent", "ada", "bet", "dice", "4", "--command-id", command_id, "--json")
    assert bet.code == 0 and bet.json()["status"] == "accepted"
    again = await pflea(settings, "agent", "ada", "bet", "dice", "4", "--command-id", command_id, "--json")
    assert again.json() == bet.json()
    too_much = await pflea(settings, "agent", "ada", "withdraw", "100", "0xabc")
    assert too_much.code == 1
    assert "insufficient_funds: PFLEA: needs 100, only 6.00 available" in too_much.out
    assert (await pflea(settings, "agent", "ada", "escrow-lock", "deal-1", "5")).code == 0
    assert (await pflea(settings, "agent", "ada", "escrow-release", "deal-1")).code == 0
    released_twice = await pflea(settings, "agent", "ada", "escrow-release", "deal-1")
    assert released_twice.code == 1 and "escrow_not_locked" in released_twice.out
    unknown = await pflea(settings, "agent", "bob", "bet", "dice", "1")
    assert unknown.code == 1 and "unknown_agent" in unknown.out
    balance = await pflea(settings, "balance", "ada", "--version", "99", "--json")
    assert balance.code == 1  # the stream has 6 events, not 99
    balance = await pflea(settings, "balance", "ada", "--at", "2999-01-01", "--json")
    assert balance.json()["balances"] == {"PFLEA": "6.00"}


async def test_events_follow_prints_the_history_then_new_events(
    settings: Settings, store: EventStore, writer: ServiceProcess
) -> None:
    agent = "follower"
    for n in range(3):
        await store.append(
            agent, "agent", [NewEvent.of(FundsDeposited(amount=Decimal(n + 1), asset="PFLEA"))], None
        )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "events",
        agent,
        "--follow",
        "--json",
        cwd=REPO,
        env=service_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        seen: list[dict[str, Any]] = []

        async def read(count: int) -> None:
            while len(seen) < count:
                seen.append(msgspec.json.decode(await proc.stdout.readline()))

        await asyncio.wait_for(read(3), 30)
        for n in range(3, 6):
            await store.append(
                agent, "agent", [NewEvent.of(FundsDeposited(amount=Decimal(n + 1), asset="PFLEA"))], None
            )
        await asyncio.wait_for(read(6), 30)
        assert [e["version"] for e in seen] == [1, 2, 3, 4, 5, 6]
        assert [e["data"]["amount"] for e in seen] == ["1", "2", "3", "4", "5", "6"]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_status_shows_streams_lag_projections_checkpoints_and_quarantine(
    settings: Settings,
    store: EventStore,
    writer_pool: asyncpg.Pool,
    writer: ServiceProcess,
    projected: asyncpg.Connection,
) -> None:
    await Quarantine(writer_pool, "test").put(b"\xff not json", "not UTF-8", agent_id="agent-000")

    async def relayed() -> bool:
        status = await pflea(settings, "status", "--json")
        streams = {s["stream"]: s["messages"] for s in status.json()["streams"]}
        return streams[f"{settings.namespace.upper()}_EVENTS"] == 800

    await wait_until(relayed, 30, "the relay published the log", interval=0.5)
    report = (await pflea(settings, "status", "--json")).json()
    assert {p["projection"]: p["lag_events"] for p in report["projections"]} == {
        "balance": 0,
        "leaderboard": 0,
        "pnl": 0,
        "portfolio": 0,
    }
    assert {float(p["lag_seconds"]) for p in report["projections"]} == {0.0}
    relay = next(t for t in report["checkpoints"]["tailers"] if t["kind"] == "relay")
    assert (relay["lag_events"], float(relay["lag_seconds"])) == (0, 0.0)
    consumers = {c["consumer"]: c for c in report["consumers"]}
    assert consumers["writer"]["pending"] == 0
    assert consumers["projector-balance"]["pending"] is None  # no projector process has started
    assert report["quarantine"]["entries"] == 1
    assert {t["kind"] for t in report["checkpoints"]["tailers"]} == {"relay", "snapshots"}
    human = await pflea(settings, "status")
    assert human.code == 0 and "Quarantine: 1 entries" in human.out and "lag_seconds" in human.out
    # An event no projector has applied: lag in events and in seconds (its age).
    await store.append_batch(generate(32, agents=1, events=1))
    await asyncio.sleep(0.2)
    behind = {p["projection"]: p for p in (await pflea(settings, "status", "--json")).json()["projections"]}
    assert behind["balance"]["lag_events"] == 1 and float(behind["balance"]["lag_seconds"]) >= 0.2
    listed = (await pflea(settings, "quarantine", "--list", "--json")).json()["quarantine"]
    assert [e["reason"] for e in listed] == ["not UTF-8"]
    shown = (await pflea(settings, "quarantine", "--show", str(listed[0]["id"]), "--json")).json()
    assert shown["raw_encoding"] == "base64" and shown["agent_id"] == "agent-000"

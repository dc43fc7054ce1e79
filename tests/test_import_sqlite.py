"""``pflea import sqlite``: the article's SQLite EventStore, written here as the article writes it,
brought into the ledger — read models equal to an independent Decimal fold of the file, nothing
doubled by a second import, by a re-run after a crash, or by the ingester polling the same
transactions later; unreadable rows quarantined with their raw text while the rest goes in."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from devstack.article_store import ArticleStore
from devstack.processes import ServiceProcess, wait_until
from services.importer import run as importer
from services.importer.article import Origin
from services.importer.sqlite_file import ArticleFile
from shared.db import WRITER_ROLE, role_dsn
from shared.events import ARTICLE_SCHEMA_VERSION
from shared.quarantine import Quarantine
from shared.settings import Settings
from shared.store import EventStore
from shared.upcasting import decode_event
from tests.conftest import SERVICE_PASSWORD
from tests.feed_server import FeedServer
from tests.reference import TABLE_COLUMNS, fold, table_rows
from tests.support import REPO, service_env
from tests.test_projector_services import caught_up

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PROJECTIONS = ("balance", "pnl", "portfolio", "leaderboard")
# The article's event types whose source transaction type the feed names (for the re-poll).
SOURCE_TYPE = {
    "FundsDeposited": "deposit",
    "FundsWithdrawn": "withdraw",
    "BetPlaced": "bet",
    "BetWon": "win",
    "FeeCharged": "fee",
    "FaucetClaimed": "faucet",
    "EscrowLocked": "escrow",
    "EscrowReleased": "escrow_release",
    "TradeExecuted": "trade",
    "WalletTransferIn": "transfer_in",
    "WalletTransferOut": "transfer_out",
    "AssetSwapped": "swap",
    "DomainPurchased": "domain_purchase",
    "DomainRenewed": "domain_renewal",
    "DomainSold": "domain_sale",
}


def history(agent: str) -> list[tuple[str, dict[str, Any]]]:
    """One agent's history in the article's shapes: every event type, amounts as floats (0.1,
    0.7: inexact in binary), fees under ``fee`` as its projections read them, a bet without
    ``game``, a type the catalogue does not know."""
    return [
        ("AgentRegistered", {"name": agent}),
        ("FundsDeposited", {"tx_id": f"{agent}-1", "amount": 100.1}),
        ("BetPlaced", {"tx_id": f"{agent}-2", "amount": 12.5}),  # the article's v1: no game
        ("BetWon", {"tx_id": f"{agent}-3", "amount": 25.7, "game": "dice"}),
        ("BetPlaced", {"tx_id": f"{agent}-4", "amount": 0.1, "game": "crash"}),
        ("FeeCharged", {"tx_id": f"{agent}-5", "fee": 0.1}),  # what its projections read
        ("FeeCharged", {"tx_id": f"{agent}-6", "amount": 0.2, "reason": "withdrawal"}),  # its ingester's
        ("FundsWithdrawn", {"tx_id": f"{agent}-7", "amount": 5.05, "address": "0xabc"}),
        ("FaucetClaimed", {"tx_id": f"{agent}-8", "amount": 1}),
        ("EscrowLocked", {"tx_id": f"{agent}-9", "amount": 10.3, "escrow_id": "e1"}),
        ("EscrowReleased", {"tx_id": f"{agent}-10", "amount": 4.4, "escrow_id": "e1"}),
        (
            "TradeExecuted",
            {
                "tx_id": f"{agent}-11",
                "amount": 50.25,
                "asset": "usdc",
                "side": "buy",
                "instrument": "BTC",
                "quantity": 0.0007,
                "price": 71785.71,
            },
        ),
        ("WalletTransferIn", {"tx_id": f"{agent}-12", "amount": 70.7, "asset": "USDC", "chain": "base"}),
        ("WalletTransferOut", {"tx_id": f"{agent}-13", "amount": 0.7, "asset": "USDC"}),
        ("AssetSwapped", {"tx_id": f"{agent}-14", "amount": 3.3, "to_asset": "USDC", "to_amount": 3.0}),
        ("DomainPurchased", {"tx_id": f"{agent}-15", "amount": 9.99, "domain": f"{agent}.ai"}),
        ("DomainRenewed", {"tx_id": f"{agent}-16", "amount": 4.99, "domain": f"{agent}.ai"}),
        ("DomainSold", {"tx_id": f"{agent}-17", "amount": 19.9, "domain": f"{agent}.ai"}),
        ("LoyaltyPointsAwarded", {"tx_id": f"{agent}-18", "points": 5, "amount": 3.3}),
    ]


def write_article_file(path: Path, agents: tuple[str, ...] = ("agent-a", "agent-b")) -> Path:
    store = ArticleStore(path)
    for agent in agents:
        for i, (event_type, data) in enumerate(history(agent)):
            tx_id = data.get("tx_id")
            if event_type == "FundsWithdrawn":
                data = {k: v for k, v in data.items() if k != "tx_id"}  # only in metadata.raw_tx_id
            metadata = {"source": "purpleflea", "raw_tx_id": tx_id} if tx_id else {"source": "agent"}
            store.append(agent, event_type, data, T0 + timedelta(minutes=i), metadata=metadata)
    store.append("vault-1", "FundsDeposited", {"amount": 1.5}, T0, stream_type="vault")
    store.snapshot(agents[0], {"balance": 123.45, "version": 18}, T0 + timedelta(hours=1))
    store.close()
    return path


def article_fold(path: Path) -> dict[str, dict[tuple[str, str], dict[str, Decimal]]]:
    """The read models the article's history should give, read straight from the file with
    Decimal (independent of the importer and the upcasters)."""
    import sqlite3

    db = sqlite3.connect(path)
    rows = db.execute("SELECT stream_id, event_type, data FROM events ORDER BY stream_id, version").fetchall()
    db.close()
    events = []
    for stream, kind, text in rows:
        data = json.loads(text, parse_float=Decimal)
        if "amount" not in data and "fee" in data:
            data["amount"] = data["fee"]
        data["asset"] = str(data.get("asset", "PFLEA")).upper()
        events.append((stream, kind, data))
    return fold(events)


async def assert_read_models_equal(url: str, expected: dict[str, Any]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for table, columns in TABLE_COLUMNS.items():
            actual = await table_rows(conn, table, columns)
            assert actual == expected[table], f"{table} differs from the fold of the article's file"
    finally:
        await conn.close()


async def pflea(settings: Settings, *args: str, database_url: str | None = None) -> tuple[int, str, str]:
    env = service_env(settings, DATABASE_URL=database_url or writer_url(settings))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def writer_url(settings: Settings) -> str:
    return role_dsn(settings.database_url, WRITER_ROLE, SERVICE_PASSWORD)


async def log_rows(url: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT position, event_id, stream_id, version, hash FROM events ORDER BY position"
        )
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


async def count(url: str, sql: str, *args: Any) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def test_the_article_shapes_are_lifted_exactly_on_read() -> None:
    fee = decode_event("FeeCharged", ARTICLE_SCHEMA_VERSION, '{"fee": 0.1, "tx_id": 7}')
    assert (fee.amount, fee.asset, fee.tx_id) == (Decimal("0.1"), "PFLEA", "7")  # type: ignore[attr-defined]
    bet = decode_event("BetPlaced", ARTICLE_SCHEMA_VERSION, '{"amount": 0.7, "note": "x"}')
    assert (bet.amount, bet.game, bet.extra) == (Decimal("0.7"), "unknown", {"note": "x"})  # type: ignore[attr-defined]
    ingester_shaped = decode_event("FeeCharged", ARTICLE_SCHEMA_VERSION, '{"amount": 1e-7, "fee": 2}')
    assert ingester_shaped.amount == Decimal("0.0000001")  # type: ignore[attr-defined]


@pytest.fixture
def processes() -> Any:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


async def test_an_imported_article_store_folds_like_the_article_and_is_never_doubled(
    settings: Settings, js_streams: nats.NATS, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    path = write_article_file(tmp_path / "agent.db")
    db = settings.database_url
    code, out, err = await pflea(settings, "import", "sqlite", str(path))
    assert code == 0, err
    assert "imported 39, already stored 0, quarantined 0" in out, out
    assert "1 snapshot(s) in the file not imported" in out
    stored = await log_rows(db)
    assert [r[3] for r in stored if r[2] == "agent-a"] == list(range(1, 20))  # renumbered from 1
    assert await count(db, "SELECT count(*) FROM events WHERE stream_type = 'vault'") == 1

    env = service_env(settings, PFLEA_SNAPSHOT_EVERY="10")
    processes.append(ServiceProcess("services.relay", env, tmp_path).start())
    for name in PROJECTIONS:
        (tmp_path / name).mkdir()
        processes.append(ServiceProcess("services.projectors", env, tmp_path / name, name).start())
    for name in PROJECTIONS:
        await wait_until(lambda n=name: caught_up(db, n), 90, f"{name} applied the imported events", 0.2)
    await assert_read_models_equal(db, article_fold(path))
    assert await count(db, "SELECT count(*) FROM quarantine") == 0  # every projector read every event

    # Importing the same file again changes nothing.
    code, out, err = await pflea(settings, "import", "sqlite", str(path))
    assert code == 0, err
    assert "imported 0, already stored 39" in out, out
    assert await log_rows(db) == stored

    # The ingester reads agent-a's feed from its start (the feed forgot the cursor): the same
    # transactions get the same ids and are skipped; only the new one is stored.
    items = [
        feed_item("agent-a", event_type, data, i) for i, (event_type, data) in enumerate(history("agent-a"))
    ]
    feed = FeedServer([item for item in items if item is not None])
    feed.forgotten = {"agent-a-18"}
    feed.items.append({"id": "agent-a-new", "type": "deposit", "amount": "2", "created_at": T0.isoformat()})
    async with feed.running() as url:
        poll_env = service_env(
            settings,
            PURPLEFLEA_API_URL=url,
            PURPLEFLEA_AGENTS="agent-a:key-a",
            PFLEA_INGEST_POLL_INTERVAL_S="0.1",
        )
        for module in ("services.ingester", "services.writer"):
            processes.append(ServiceProcess(module, poll_env, tmp_path).start())
        new = "SELECT count(*) FROM events WHERE data->>'tx_id' = 'agent-a-new'"
        await wait_until(lambda: _positive(db, new), 60, "the new transaction stored")
    ingester = processes[-2]
    assert "the feed no longer knows this cursor" in ingester.log_tail(400), "the feed was not read again"
    after = await log_rows(db)
    assert after[: len(stored)] == stored and len(after) == len(stored) + 1
    doubled = """SELECT count(*) FROM (SELECT data->>'tx_id' FROM events WHERE data ? 'tx_id'
                                      GROUP BY 1 HAVING count(*) > 1) d"""
    assert await count(db, doubled) == 0


async def _positive(url: str, sql: str) -> bool:
    return await count(url, sql) > 0


def feed_item(agent: str, event_type: str, data: dict[str, Any], i: int) -> dict[str, Any] | None:
    """What Purple Flea's feed says of a transaction the article stored as ``data``."""
    source = SOURCE_TYPE.get(event_type)
    if source is None:
        return None
    item = {k: str(v) if isinstance(v, float | int) else v for k, v in data.items() if k != "tx_id"}
    if "fee" in item:
        item["amount"] = item.pop("fee")
    return {
        "id": data["tx_id"],
        "type": source,
        **item,
        "created_at": (T0 + timedelta(minutes=i)).isoformat(),
    }


def write_file_with_bad_rows(path: Path) -> Path:
    store = ArticleStore(path)
    store.append("agent-c", "FundsDeposited", {"tx_id": "c-1", "amount": 10.5}, T0)
    store.append_raw("agent-c", "BetPlaced", '{"tx_id": "c-2", "amount": 1.5', T0.isoformat())  # cut off
    store.append("agent-c", "BetWon", {"tx_id": "c-3", "game": "dice"}, T0)  # no amount
    store.append("agent-c", "FundsWithdrawn", {"tx_id": "c-4", "amount": -3}, T0)  # negative
    store.append("agent-c", "FeeCharged", {"tx_id": "c-5", "fee": 0.25}, T0)
    store.append_raw("agent-c", "FundsDeposited", '{"tx_id": "c-6", "amount": 1}', "yesterday")
    store.append("agent c", "FundsDeposited", {"tx_id": "d-1", "amount": 1}, T0)  # no agent id
    store.close()
    return path


async def test_unreadable_rows_are_quarantined_with_their_raw_text_and_the_rest_is_imported(
    settings: Settings, store: EventStore, writer_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = write_file_with_bad_rows(tmp_path / "bad.db")
    sink = importer.LedgerSink(store, Quarantine(writer_pool, importer.QUARANTINE_SOURCE), path.name)
    report = await importer.import_file(ArticleFile(path), Origin(path.name, "casino"), sink)
    assert (report.rows, report.appended, len(report.quarantined)) == (7, 2, 5)
    reasons = {q.version: q.reason for q in report.quarantined}
    assert reasons[1].startswith("data: not JSON")
    assert "amount" in reasons[2]
    assert reasons[3].startswith("data.amount: must not be negative")
    assert reasons[5].startswith("occurred_at:")
    assert reasons[0].startswith("stream_id:")  # the row of "agent c"
    conn = await asyncpg.connect(settings.database_url)
    try:
        kept = await conn.fetch("SELECT source, reason, raw, agent_id FROM quarantine ORDER BY id")
        assert [r["source"] for r in kept] == ["import"] * 5
        assert any(b'{\\"tx_id\\": \\"c-2\\", \\"amount\\": 1.5' in bytes(r["raw"]) for r in kept)
        assert (
            await conn.fetchval("SELECT string_agg(data->>'tx_id', ',' ORDER BY version) FROM events")
            == "c-1,c-5"
        )
    finally:
        await conn.close()

    again = await importer.import_file(ArticleFile(path), Origin(path.name, "casino"), sink)
    assert (again.appended, again.already_stored, len(again.quarantined)) == (0, 2, 5)
    assert await count(settings.database_url, "SELECT count(*) FROM quarantine") == 5  # counted, not copied


class Killed(Exception):
    pass


class CrashingSink(importer.LedgerSink):
    """Dies (as a SIGKILL would leave it) after ``batches`` committed batches."""

    def __init__(self, *args: Any, batches: int) -> None:
        super().__init__(*args)
        self.batches = batches

    async def append(self, items: list[Any]) -> importer.Appended:
        if self.batches == 0:
            raise Killed("half-way")
        self.batches -= 1
        return await super().append(items)


async def test_an_import_run_again_after_a_crash_half_way_doubles_nothing(
    settings: Settings, store: EventStore, writer_pool: asyncpg.Pool, tmp_path: Path, monkeypatch: Any
) -> None:
    path = write_article_file(tmp_path / "agent.db", agents=("agent-a", "agent-b", "agent-c"))
    monkeypatch.setattr(importer, "BATCH_SIZE", 10)
    origin = Origin(path.name, "casino")
    quarantine = Quarantine(writer_pool, importer.QUARANTINE_SOURCE)
    with pytest.raises(Killed):
        await importer.import_file(
            ArticleFile(path), origin, CrashingSink(store, quarantine, path.name, batches=3)
        )
    half = await log_rows(settings.database_url)
    assert len(half) == 30  # the crash really came half-way

    report = await importer.import_file(
        ArticleFile(path), origin, importer.LedgerSink(store, quarantine, path.name)
    )
    assert (report.appended, report.already_stored) == (58 - 30, 30)
    final = await log_rows(settings.database_url)
    assert final[:30] == half and len(final) == 58 == len({r[1] for r in final})
    for stream in ("agent-a", "agent-b", "agent-c"):
        assert [r[3] for r in final if r[2] == stream] == list(range(1, 20))


async def test_a_dry_run_reports_counts_and_what_it_would_quarantine_and_writes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    path = write_file_with_bad_rows(tmp_path / "bad.db")
    code, out, err = await pflea(settings, "import", "sqlite", str(path), "--dry-run")
    assert code == 0, err
    assert "7 rows in 1 streams; would import 2" in out and "quarantine 5" in out, out
    assert "agent-c: FeeCharged 1, FundsDeposited 1" in out
    assert out.count("  quarantine: row ") == 5
    for table in ("events", "quarantine"):
        assert await count(settings.database_url, f"SELECT count(*) FROM {table}") == 0


async def test_the_import_runs_only_as_the_writer_role(settings: Settings, tmp_path: Path) -> None:
    path = write_article_file(tmp_path / "agent.db", agents=("agent-a",))
    code, _, err = await pflea(settings, "import", "sqlite", str(path), database_url=settings.database_url)
    assert code == 2 and "runs only as its own role pflea_writer" in err, err
    assert await count(settings.database_url, "SELECT count(*) FROM events") == 0


def test_beside_pflea_up_the_import_logs_in_as_the_writer_with_the_stacks_secret(
    tmp_path: Path, monkeypatch: Any
) -> None:
    from services.cli.imports import writer_url
    from shared.private_files import write_private
    from shared.stack import StackInfo, write_stack

    for name in ("DATABASE_URL", "NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PFLEA_DATA_DIR", str(tmp_path))
    write_stack(tmp_path, StackInfo("postgresql://pflea_reader:r@127.0.0.1:15432/pflea", "nats://x", 1))
    write_private(tmp_path / "secrets" / "postgres.json", json.dumps({WRITER_ROLE: "w s/cret"}))
    assert writer_url() == "postgresql://pflea_writer:w%20s%2Fcret@127.0.0.1:15432/pflea"

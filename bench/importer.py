"""Import: ``pflea import sqlite`` of an article-style SQLite file of ``import_events`` events
over 1,000 agents (every catalogue type, amounts as JSON floats, fees under ``fee``), run as a
user runs it: a ``python -m services.cli`` process as ``pflea_writer``, clock from its start
(interpreter start-up included) to its exit, into a fresh database.

Its limit: **raw COPY** (limits scenario), what Postgres absorbs of the writer's rows with
nothing of ours in the way. Target: 100,000 events in under 20 s, i.e. ≥ 5,000 events/s.
"""

from __future__ import annotations

import asyncio
import os
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Harness
from bench.processes import cpu_seconds
from bench.report import Figure, Target
from bench.servers import SERVICE_PASSWORD
from devstack.article_store import ArticleStore
from shared.db import WRITER_ROLE, connect, role_dsn

AGENTS = 1_000
REPO = Path(__file__).resolve().parent.parent
# (article event type, extra data) in rotation; amounts are added as floats
_KINDS: list[tuple[str, dict[str, Any]]] = [
    ("FundsDeposited", {}),
    ("BetPlaced", {}),  # no game: the article's v1
    ("BetWon", {"game": "dice"}),
    ("FeeCharged", {}),  # under ``fee``
    ("BetPlaced", {"game": "crash"}),
    ("FaucetClaimed", {}),
    ("EscrowLocked", {"escrow_id": "e"}),
    ("EscrowReleased", {"escrow_id": "e"}),
    ("TradeExecuted", {"side": "buy", "instrument": "BTC", "quantity": 0.0007, "asset": "USDC"}),
    ("WalletTransferIn", {"chain": "base"}),
    ("AssetSwapped", {"to_asset": "USDC", "to_amount": 1.25}),
    ("DomainPurchased", {"domain": "x.ai"}),
    ("LoyaltyPointsAwarded", {"points": 3}),  # outside the catalogue
]


def write_article_file(path: Path, events: int) -> None:
    rng = random.Random(20)
    store = ArticleStore(path)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(events):
        agent = f"agent-{n % AGENTS:04d}"
        kind, extra = _KINDS[n // AGENTS % len(_KINDS)]
        amount = round(rng.uniform(0.01, 100), 2)
        data: dict[str, Any] = {"tx_id": f"t{n}", **extra}
        data["fee" if kind == "FeeCharged" else "amount"] = amount
        metadata = {"source": "purpleflea", "raw_tx_id": f"t{n}"}
        store.append(agent, kind, data, start + timedelta(seconds=n), metadata=metadata)
    store.close()


async def _import(path: Path, database_url: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the import process, the first line it printed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env["DATABASE_URL"] = database_url
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "import",
        "sqlite",
        str(path),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    seconds = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"pflea import exited {proc.returncode}: {err.decode()[-500:]}")
    return seconds, cpu, out.decode().splitlines()[0]


def _postgres_cpu(pid: int) -> float:
    """The server's CPU so far: live backends, and those it reaped (the import's, once closed)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return cpu_seconds(pid, tree=True) + times.children_user + times.children_system


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def run(h: Harness) -> None:
    events = h.sizes.import_events
    folder = Path(tempfile.mkdtemp(prefix="pflea-bench-import-"))
    path = folder / "article.db"
    url = await h.servers.new_database("import")
    try:
        write_article_file(path, events)
        postgres = h.servers.postgres.proc
        pg_before = _postgres_cpu(postgres.pid) if postgres else 0.0
        seconds, cpu, summary = await _import(path, role_dsn(url, WRITER_ROLE, SERVICE_PASSWORD))
        pg_cpu = _postgres_cpu(postgres.pid) - pg_before if postgres else 0.0
        conn = await connect(url)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM events")
        finally:
            await conn.close()
        if stored != events:
            raise RuntimeError(f"{stored:,} events stored of {events:,}: {summary}")
        h.add(
            Figure(
                "import",
                "pflea import sqlite",
                events / seconds,
                "events/s",
                "raw COPY",
                h.limit("raw COPY"),
                Target("min", 100_000 / 20, unit="events/s"),
                note=f"{events:,} article events over {AGENTS:,} agents in {seconds:.1f} s, process start "
                f"to exit; CPU: the import process {cpu:.1f} s ({cpu / events * 1e6:.0f} µs per event), "
                f"Postgres {pg_cpu:.1f} s (the whole server, other databases' idle work included); "
                f"it said: {summary}",
            )
        )
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
        await h.servers.drop_database(url)

"""The obvious alternatives, on the end-to-end scenario's workload, in the same run.

The transactions are the ones the e2e scenario ingests (the simulator with the same seed,
``e2e_agents`` × ``e2e_per_agent``, six feeds), parsed once by the ingester's own parser
(malformed ones dropped) *before* the clock starts: each alternative is timed storing events
only, with no feed polling, no parsing, no read models, no message bus. That is the best case
for them; this pipeline's figure includes all of those.

- **the article's SQLite ``EventStore``** (``devstack.article_store``, its file format): one
  append and one commit per transaction, SQLite's defaults (rollback journal, synchronous FULL),
  a file on this disk;
- **the Python ``eventsourcing`` library** (9.x, ``eventsourcing.postgres``) on the bench's
  Postgres (same durability as ours): one aggregate per agent holding its balances, one
  ``save`` per transaction; and batched, one ``save`` per page of up to 200 of an agent's
  transactions (as PFLEA_TX carries them). It also stores each aggregate's creation event (one
  per agent), not counted in its rate.

Reported: events/s and the ratio to this pipeline's end-to-end events/s in the same run
(``e2e`` runs first). Information, not targets.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from bench.harness import Harness
from bench.report import Figure
from devstack.article_store import ArticleStore
from services.simulator import Simulator, SimulatorConfig
from shared.transactions import Rejected, parse_transaction

PAGE = 200
NAMESPACE = uuid.UUID("0b0c5a1e-4c6f-4f43-9d63-7c0a3f1e2b17")


class Tx(msgspec.Struct, frozen=True):
    agent_id: str
    event_type: str
    data: dict[str, Any]
    occurred_at: datetime


def workload(h: Harness) -> list[Tx]:
    """The e2e scenario's transactions, parsed; per agent in feed order."""
    s = h.sizes
    # The e2e simulator process's seed is its default, as here.
    sim = Simulator(
        SimulatorConfig(agents=s.e2e_agents, backlog=s.e2e_per_agent, rate=0, history=s.e2e_per_agent)
    )
    txs = []
    for stored in sim.truth():
        try:
            envelope = parse_transaction(stored.raw, stored.agent_id, stored.feed)
        except Rejected:
            continue
        data = msgspec.json.decode(envelope.data)
        txs.append(Tx(envelope.agent_id, envelope.event_type, data, envelope.occurred_at))
    return txs


def pages(txs: list[Tx]) -> Iterator[list[Tx]]:
    """Runs of up to ``PAGE`` consecutive transactions of one agent."""
    page: list[Tx] = []
    for tx in txs:
        if page and (tx.agent_id != page[0].agent_id or len(page) == PAGE):
            yield page
            page = []
        page.append(tx)
    if page:
        yield page


def sqlite_article(txs: list[Tx], folder: Path) -> float:
    store = ArticleStore(folder / "article.db")
    try:
        started = time.perf_counter()
        for tx in txs:
            store.append(tx.agent_id, tx.event_type, tx.data, tx.occurred_at)
            store.db.commit()
        return time.perf_counter() - started
    finally:
        store.db.close()


@functools.cache
def _account_class() -> type[Any]:
    """The aggregate, defined once: the library registers each class by its topic."""
    # Imported here: a bench dependency (pyproject's `bench` extra), not the ledger's.
    from eventsourcing.domain import Aggregate, event

    class AgentAccount(Aggregate):  # one per agent: its balances, folded from its transactions
        @event("Registered")
        def __init__(self, agent_id: str) -> None:
            self.agent_id = agent_id
            self.balances: dict[str, Decimal] = {}

        @staticmethod
        def create_id(agent_id: str) -> uuid.UUID:
            return uuid.uuid5(NAMESPACE, agent_id)

        @event("TransactionRecorded")
        def record(self, event_type: str, data: dict[str, Any], occurred_at: datetime) -> None:
            asset, amount = data.get("asset"), data.get("amount")
            if isinstance(asset, str) and isinstance(amount, str):
                self.balances[asset] = self.balances.get(asset, Decimal(0)) + Decimal(amount)

    return AgentAccount


def _eventsourcing(txs: list[Tx], url: str, *, batched: bool) -> float:
    from eventsourcing.application import Application

    AgentAccount = _account_class()  # noqa: N806
    parts = urlsplit(url)
    app = Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"),
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or ""),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
        }
    )
    try:
        accounts: dict[str, Any] = {}
        started = time.perf_counter()
        for page in pages(txs):
            account = accounts.get(page[0].agent_id)
            if account is None:
                account = accounts[page[0].agent_id] = AgentAccount(page[0].agent_id)
            for tx in page:
                account.record(tx.event_type, tx.data, tx.occurred_at)
                if not batched:
                    app.save(account)
            if batched:
                app.save(account)
        seconds = time.perf_counter() - started
        stored = app.recorder.max_notification_id() or 0  # rows in its table: registered + txs
        expected = len(txs) + len(accounts)
        if stored != expected:
            raise RuntimeError(f"eventsourcing stored {stored} events, expected {expected}")
        return seconds
    finally:
        app.close()


async def run(h: Harness) -> None:
    txs = workload(h)
    pipeline = next(
        (f for f in h.figures if f.scenario == "end-to-end" and f.name == "simulator → 4 read models"), None
    )
    rate = pipeline.value if pipeline is not None else None
    results: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="pflea-compare-") as tmp:
        seconds = await asyncio.to_thread(sqlite_article, txs, Path(tmp))
        results.append(
            ("the article's SQLite EventStore, a commit per transaction", seconds, "a file on this disk")
        )
    for batched in (False, True):
        # A fresh database (the owner's login): the library creates its own table in it.
        url = await h.servers.new_database("eventsourcing-batched" if batched else "eventsourcing")
        try:
            seconds = await asyncio.to_thread(_eventsourcing, txs, url, batched=batched)
        finally:
            await h.servers.drop_database(url)
        how = (
            f"a save per page of up to {PAGE} of an agent's transactions"
            if batched
            else "a save per transaction"
        )
        results.append((f"eventsourcing on Postgres, {how}", seconds, "one aggregate per agent"))
    for name, seconds, note in results:
        h.add(
            Figure(
                "compare",
                name,
                len(txs) / seconds,
                "events/s",
                "this pipeline end to end (same run)" if rate else None,
                rate,
                note=f"{len(txs):,} transactions of the e2e workload, storing only (no polling, "
                f"parsing or read models); {note}; {seconds:.1f} s. The ratio is to this pipeline, "
                "which does all of those",
            )
        )

"""Time travel: ``pflea balance AGENT --at T`` for one agent with ``time_travel_events`` events,
with and without snapshots, timed in-process (the query, not the CLI's interpreter start-up).

The agent's events are generated server-side, one a second from 2025-01-01; the queries ask for
``at`` moments drawn (seeded) from its whole history, each once, on a ``pflea_reader`` pool as
the CLI uses. "With snapshots": the snapshots the writer keeps (one every
``PFLEA_SNAPSHOT_EVERY`` events) are taken first with ``shared.history.take_snapshots``.

HOOK. ``shared.history`` is being built alongside this harness, so it is imported lazily and a
missing or changed API makes both figures "not available" with the reason, without stopping the
run. Everything this scenario needs from it is in ``_history``, ``_balance_at`` and
``_take_snapshots``; if the API changes, adapt those three and nothing else.
"""

from __future__ import annotations

import importlib
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.harness import Harness
from bench.report import Figure, Target
from bench.servers import SERVICE_PASSWORD
from bench.workload import generate_log
from shared.db import READER_ROLE, WRITER_ROLE, connect, create_pool, role_dsn
from shared.settings import Settings
from shared.store import EventStore

AGENT_PREFIX = "tt-agent-"
AGENT = AGENT_PREFIX + "00000"
FIRST_EVENT_AT = datetime(2025, 1, 1, tzinfo=UTC)
NO_SNAPSHOTS = "balance --at, no snapshots"
WITH_SNAPSHOTS = "balance --at, with snapshots"


class NotAvailable(Exception):
    pass


# --- the hook: everything taken from shared.history -------------------------------------------


def _history() -> Any:
    try:
        history = importlib.import_module("shared.history")
    except ModuleNotFoundError:
        raise NotAvailable("shared/history.py does not exist yet") from None
    except Exception as exc:  # a half-written module must not stop the rest of the run
        raise NotAvailable(f"importing shared.history failed: {exc!r}") from None
    missing = [n for n in ("History", "AsOf", "take_snapshots", "stream_head") if not hasattr(history, n)]
    if missing:
        raise NotAvailable(f"shared.history has no {', '.join(missing)}")
    return history


async def _balance_at(history: Any, pool: asyncpg.Pool, at: datetime, use_snapshots: bool) -> Any:
    """What ``pflea balance AGENT --at`` computes (services/cli/queries.py)."""
    view = await history.History(pool, use_snapshots=use_snapshots).state(AGENT, history.AsOf(at=at))
    return view.state.balances()


async def _take_snapshots(history: Any, writer_pool: asyncpg.Pool) -> int:
    async with writer_pool.acquire() as conn:
        head = await history.stream_head(conn, AGENT)
        saved: int = await history.take_snapshots(
            EventStore(writer_pool), conn, AGENT, Settings().snapshot_every, head
        )
    return saved


# ----------------------------------------------------------------------------------------------


async def _timed(
    history: Any, pool: asyncpg.Pool, moments: list[datetime], use_snapshots: bool
) -> list[float]:
    await _balance_at(history, pool, moments[0], use_snapshots)  # warm the connection
    timings = []
    for at in moments:
        started = time.perf_counter()
        await _balance_at(history, pool, at, use_snapshots)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _figure(
    name: str, result: list[float] | str, events: int, target: Target | None, extra: str = ""
) -> Figure:
    if isinstance(result, str):
        return Figure("time travel", name, None, "ms", target=target, note=result)
    return Figure(
        "time travel",
        name,
        statistics.median(result),
        "ms",
        target=target,
        note=f"median of {len(result)} queries at random moments of {events:,} events; "
        f"max {max(result):.1f} ms{extra}",
    )


async def _measure(h: Harness, url: str, history: Any) -> tuple[list[float] | str, list[float] | str, str]:
    events = h.sizes.time_travel_events
    conn = await connect(url)
    try:
        await generate_log(conn, events, 1, prefix=AGENT_PREFIX)
        await conn.execute("VACUUM ANALYZE events")
    finally:
        await conn.close()
    rng = random.Random(7)
    moments = [
        FIRST_EVENT_AT + timedelta(seconds=rng.randrange(events)) for _ in range(h.sizes.time_travel_queries)
    ]
    reader = await create_pool(role_dsn(url, READER_ROLE, SERVICE_PASSWORD), max_size=2)
    writer = await create_pool(role_dsn(url, WRITER_ROLE, SERVICE_PASSWORD), max_size=2)
    try:
        plain: list[float] | str = await _timed(history, reader, moments, use_snapshots=False)
        started = time.perf_counter()
        saved = await _take_snapshots(history, writer)
        extra = f"; {saved:,} snapshots taken in {time.perf_counter() - started:.1f} s beforehand"
        snap: list[float] | str = await _timed(history, reader, moments, use_snapshots=True)
    finally:
        await reader.close()
        await writer.close()
    return plain, snap, extra


async def run(h: Harness) -> None:
    events = h.sizes.time_travel_events
    target = Target("max", 50, unit="ms")
    try:
        history = _history()
    except NotAvailable as exc:
        h.add(_figure(NO_SNAPSHOTS, f"not available: {exc}", events, None))
        h.add(_figure(WITH_SNAPSHOTS, f"not available: {exc}", events, target))
        return
    url = await h.servers.new_database("timetravel")
    try:
        plain, snap, extra = await _measure(h, url, history)
    except (AttributeError, TypeError) as exc:  # the API moved under the hook: say so, go on
        plain = snap = f"not available: adapt the hook in bench/time_travel.py to shared.history ({exc!r})"
        extra = ""
    finally:
        await h.servers.drop_database(url)
    h.add(_figure(NO_SNAPSHOTS, plain, events, None))
    h.add(_figure(WITH_SNAPSHOTS, snap, events, target, extra))

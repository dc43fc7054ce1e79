"""``pflea events AGENT [--follow]``: an agent's stored history, then (``--follow``) new events live.

Following subscribes to ``<ns>.events.<agent>.>`` *before* reading the history, so nothing
committed in between is missed; events already printed are skipped by version, and a gap (a
slow subscriber may lose core NATS messages) is filled from the log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.cli.connections import OK, connect_nats, reader_pool, run, settings, stop_on_signals
from services.cli.render import cell, print_json
from shared.history import UnknownAgent
from shared.money import to_text
from shared.store import RecordedEvent, fetch_stream
from shared.wire import BadMessage, DeliveredEvent, delivered_event

PAGE = 5000


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "events", help="an agent's events, oldest first; --follow prints new ones as they come"
    )
    p.add_argument("agent")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=lambda args: run(lambda: _events(args)))


class Line(msgspec.Struct, frozen=True):
    version: int
    position: int
    event_id: uuid.UUID
    event_type: str
    occurred_at: datetime
    recorded_at: datetime
    data: msgspec.Raw


def _line(e: RecordedEvent | DeliveredEvent) -> Line:
    return Line(
        e.version, e.position, e.event_id, e.event_type, e.occurred_at, e.recorded_at, msgspec.Raw(e.data)
    )


def _show(agent: str, line: Line, as_json: bool) -> None:
    if as_json:
        print_json(
            {"agent_id": agent, **msgspec.structs.asdict(line), "data": msgspec.json.decode(line.data)}
        )
        return
    data: dict[str, Any] = msgspec.json.decode(line.data)
    amount = data.get("amount")
    if isinstance(amount, str) and amount:
        with contextlib.suppress(ArithmeticError):
            data["amount"] = to_text(Decimal(amount))
    what = " ".join(str(data[k]) for k in ("amount", "asset") if k in data)
    print(
        f"v{line.version:<6} #{line.position:<8} {cell(line.occurred_at)}  {line.event_type:<18} "
        f"{what:<28} {line.event_id}",
        flush=True,
    )


async def _events(args: argparse.Namespace) -> int:
    s = settings()
    nc: Client | None = None
    queue: asyncio.Queue[Msg] = asyncio.Queue()
    if args.follow:
        nc = await connect_nats(s)

        async def received(msg: Msg) -> None:
            await queue.put(msg)

        await nc.subscribe(f"{s.namespace}.events.{args.agent}.>", cb=received)
        await nc.flush()
    pool = await reader_pool(s)
    try:
        last = await _history(pool, args, 0)
        if last == 0 and not args.follow:
            raise UnknownAgent(args.agent)
        if args.follow:
            await _follow(pool, args, queue, last)
    finally:
        await pool.close()
        if nc is not None:
            await nc.close()
    return OK


async def _history(pool: asyncpg.Pool, args: argparse.Namespace, after: int, upto: int | None = None) -> int:
    """Print the stored events after version ``after`` (up to ``upto``); the last version printed."""
    last = after
    while True:
        stop = last + PAGE if upto is None else min(last + PAGE, upto)
        async with pool.acquire() as conn:
            page = await fetch_stream(conn, args.agent, last + 1, stop)
        for event in page:
            _show(args.agent, _line(event), args.json)
        if page:
            last = page[-1].version
        if len(page) < PAGE or (upto is not None and last >= upto):
            return last


async def _follow(pool: asyncpg.Pool, args: argparse.Namespace, queue: asyncio.Queue[Msg], last: int) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            getting = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if getting not in done:
                getting.cancel()
                return
            msg = getting.result()
            try:
                line = _line(delivered_event(msg.data, msg.headers))
            except BadMessage:
                continue  # not a relayed event: nothing to show
            if line.version <= last:
                continue  # printed from the log already, or a relay repeat
            if line.version > last + 1:
                last = await _history(pool, args, last, line.version - 1)
            _show(args.agent, line, args.json)
            last = line.version
    finally:
        stopping.cancel()

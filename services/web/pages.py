"""The explorer's pages: leaderboard, agent, explain a number, time travel, what-if, operations."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import nats.errors
from aiohttp import web

from services.web.app import EXPLORER, render, require_agent, require_operator, viewer
from services.web.chart import chart
from services.web.reads import (
    FIGURES,
    EventFilter,
    balance_points,
    events_by_id,
    events_page,
    read_models,
    state_rows,
)
from services.web.reads import (
    explain as explain_figure,
)
from services.web.reads import (
    leaderboard as read_leaderboard,
)
from shared.events import EVENT_TYPES
from shared.history import (
    NOW,
    TIME_BASES,
    AsOf,
    History,
    HistoryError,
    UnknownAgent,
    parse_added,
    parse_event_ids,
    parse_time,
)
from shared.pipeline_status import database_status, jetstream_status

TOP = 20
PAGE = 50
CHART_POINTS = 160
QUARANTINE_SHOWN = 50
RAW_SHOWN = 2048  # bytes of a quarantined payload shown on the page


async def leaderboard(request: web.Request) -> web.Response:
    return render(request, "leaderboard.html", boards=await _boards(request))


async def leaderboard_table(request: web.Request) -> web.Response:
    """The tables alone: what the page's script swaps in when an event arrives."""
    return render(request, "leaderboard_tables.html", boards=await _boards(request))


async def _boards(request: web.Request) -> dict[str, list[Any]]:
    who = viewer(request)
    return await read_leaderboard(request.app[EXPLORER].pool, TOP, who.agent_id)


async def agent(request: web.Request) -> web.Response:
    agent_id = require_agent(request)
    pool = request.app[EXPLORER].pool
    only = EventFilter(
        types=tuple(t for t in request.query.getall("type", []) if t in EVENT_TYPES),
        since=_time(request, "since"),
        until=_time(request, "until"),
    )
    models, points, page = await asyncio.gather(
        read_models(pool, agent_id),
        balance_points(pool, agent_id, CHART_POINTS),
        events_page(pool, agent_id, _int(request, "before"), PAGE, only),
    )
    if not points:
        raise UnknownAgent(agent_id)
    return render(
        request,
        "agent.html",
        agent_id=agent_id,
        models=models,
        chart=chart(points),
        head=points[-1].version,
        page=page,
        only=only,
        event_types=sorted(EVENT_TYPES),
        query=request.query,
    )


async def explain(request: web.Request) -> web.Response:
    agent_id = require_agent(request)
    asset, figure = request.query.get("asset", ""), request.query.get("figure", "balance")
    if figure not in FIGURES:
        raise HistoryError(f"figure: choose one of {', '.join(FIGURES)}, got {figure!r}")
    explained = await explain_figure(
        request.app[EXPLORER].pool, agent_id, asset, figure, PAGE * 4, _int(request, "before")
    )
    return render(request, "explain.html", agent_id=agent_id, asset=asset, figure=figure, explained=explained)


def _as_of(request: web.Request) -> AsOf:
    q = request.query
    by = q.get("by", "occurred")
    if by not in TIME_BASES:
        raise HistoryError(f"by: choose occurred or recorded, got {by!r}")
    if q.get("at"):
        return AsOf(at=parse_time(q["at"], "at"), by=by)  # type: ignore[arg-type]
    version = _int(request, "version")
    return AsOf(version=version) if version is not None else NOW


async def history(request: web.Request) -> web.Response:
    agent_id = require_agent(request)
    as_of = _as_of(request)
    past_now = History(request.app[EXPLORER].pool)
    then, now = await asyncio.gather(past_now.state(agent_id, as_of), past_now.state(agent_id))
    return render(
        request,
        "history.html",
        agent_id=agent_id,
        as_of=as_of,
        then=then,
        then_rows=state_rows(then.state),
        now_rows=state_rows(now.state),
        head=now.head,
        query=request.query,
    )


async def what_if(request: web.Request) -> web.Response:
    agent_id = require_agent(request)
    pool = request.app[EXPLORER].pool
    without = parse_event_ids(request.query.getall("without", []), "without")
    add_type, add_data = request.query.get("add_type", ""), request.query.get("add_data", "")
    added = parse_added([f"{add_type}:{add_data}"], "add") if add_type else []
    result = await History(pool).what_if(agent_id, without=without, add=added, as_of=_as_of(request))
    return render(
        request,
        "what_if.html",
        agent_id=agent_id,
        excluded=await events_by_id(pool, agent_id, without),
        added=added,
        add_type=add_type,
        add_data=add_data,
        actual=state_rows(result.actual.state),
        hypothetical=state_rows(result.hypothetical.state),
        difference=result.difference(),
        event_types=sorted(EVENT_TYPES),
    )


async def operations(request: web.Request) -> web.Response:
    require_operator(request)
    explorer = request.app[EXPLORER]
    report = await database_status(explorer.pool)
    nats_error = None
    if explorer.nc is None:
        nats_error = "not connected to NATS"
    else:
        try:
            report.update(await jetstream_status(explorer.nc, explorer.topology))
        except (nats.errors.Error, TimeoutError) as exc:
            nats_error = f"NATS did not answer ({exc!r})"
    rows = await explorer.pool.fetch(
        """SELECT id, source, agent_id, seen_count, received_at, reason, substring(raw for $2) AS raw,
                  length(raw) AS raw_length
           FROM quarantine ORDER BY id DESC LIMIT $1""",
        QUARANTINE_SHOWN,
        RAW_SHOWN,
    )
    quarantine = [{**dict(r), "raw": _shown(bytes(r["raw"]))} for r in rows]
    return render(request, "operations.html", report=report, nats_error=nats_error, quarantine=quarantine)


def _shown(raw: bytes) -> str:
    """Bytes as text a person can read: UTF-8 where it is, escapes where it is not (the
    template then escapes it for HTML)."""
    return raw.decode("utf-8", errors="backslashreplace")


def _int(request: web.Request, name: str) -> int | None:
    text = request.query.get(name, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise HistoryError(f"{name}: {text!r} is not a whole number") from None


def _time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name, "")
    return parse_time(text, name) if text else None

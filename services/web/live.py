"""Live updates: committed events from ``<ns>.events.<agent>.>`` as server-sent events.

Each open page holds one core NATS subscription (as user ``web``, which may only watch
events): an agent's page its own subject, the operator's leaderboard every agent's. A message
becomes one SSE ``ledger`` event with the event's version, type and id; the page then fetches
what changed from Postgres, so a message lost by a slow subscriber costs freshness, never
correctness. A comment line every ``KEEPALIVE_S`` notices a closed browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web
from nats.aio.msg import Msg

from services.web.app import EXPLORER, require_agent, viewer
from shared.wire import BadMessage, delivered_event

KEEPALIVE_S = 15.0
QUEUE = 1000  # messages held for a slow browser before the oldest are dropped


async def agent_events(request: web.Request) -> web.StreamResponse:
    agent_id = require_agent(request)
    return await _stream(request, f"{request.app[EXPLORER].topology.namespace}.events.{agent_id}.>")


async def all_events(request: web.Request) -> web.StreamResponse:
    who = viewer(request)
    topology = request.app[EXPLORER].topology
    subject = topology.events_filter if who.is_operator else f"{topology.namespace}.events.{who.agent_id}.>"
    return await _stream(request, subject)


async def _stream(request: web.Request, subject: str) -> web.StreamResponse:
    nc = request.app[EXPLORER].nc
    if nc is None:
        raise web.HTTPServiceUnavailable(
            text="live updates need NATS, which this explorer is not connected to"
        )
    queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE)

    async def received(msg: Msg) -> None:
        try:
            event = delivered_event(msg.data, msg.headers)
        except BadMessage:
            return
        line = json.dumps(
            {
                "agent_id": event.stream_id,
                "version": event.version,
                "event_type": event.event_type,
                "event_id": str(event.event_id),
            }
        )
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(f"event: ledger\ndata: {line}\n\n".encode())

    sub = await nc.subscribe(subject, cb=received)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    try:
        await nc.flush()
        await response.prepare(request)
        await response.write(b": subscribed\n\n")
        while True:
            try:
                chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                chunk = b": keepalive\n\n"
            await response.write(chunk)
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return response

"""Ground truth and control for tests and tooling: ``/admin/*``, no key, never faulted."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from shared.money import to_text

from .api import feed_paths
from .config import FaultKnobs
from .feed import StoredTx
from .simulator import UnknownAgent
from .state import SIMULATOR, advance_clock, bad_request, error_text, json_response

_encode = msgspec.json.encode


def _agent_ids(request: web.Request) -> list[str] | None:
    """The ``agent_id`` asked for (validated), or None for every agent."""
    agent_id = request.query.get("agent_id")
    if agent_id is None:
        return None
    try:
        request.app[SIMULATOR].feed(agent_id)
    except UnknownAgent as exc:
        raise web.HTTPNotFound(
            text=error_text("unknown_agent", str(exc)),
            content_type="application/json",
        ) from None
    return [agent_id]


async def agents(request: web.Request) -> web.Response:
    credentials = request.app[SIMULATOR].credentials
    listed = [{"agent_id": c.agent_id, "api_key": c.api_key} for c in credentials]
    return json_response(_encode({"agents": listed}))


async def feeds(request: web.Request) -> web.Response:
    """Each feed's base URL relative to the simulator's, e.g. ``{"faucet": "/faucet"}``."""
    return json_response(_encode({"feeds": feed_paths()}))


def _truth_item(tx: StoredTx) -> dict[str, Any]:
    return {
        "agent_id": tx.agent_id,
        "seq": tx.seq,
        "id": tx.id,
        "type": tx.type,
        "malformed": tx.malformed,
        "feed": tx.feed,
        # Every fragment we write is UTF-8 (escapes such as \ud800 are ASCII text).
        "raw": tx.raw.decode(),
    }


async def truth(request: web.Request) -> web.Response:
    advance_clock(request.app)
    sim = request.app[SIMULATOR]
    wanted = _agent_ids(request)
    txs = sim.truth(wanted[0] if wanted else None)
    return json_response(_encode({"transactions": [_truth_item(tx) for tx in txs]}))


async def balances(request: web.Request) -> web.Response:
    """Per agent, what the well-formed transactions leave: available and escrowed, per asset."""
    advance_clock(request.app)
    sim = request.app[SIMULATOR]
    result: dict[str, Any] = {}
    for agent_id in _agent_ids(request) or list(sim.feeds):
        available, escrow = sim.balances(agent_id)
        result[agent_id] = {
            "available": {asset: to_text(amount) for asset, amount in available.items()},
            "escrow": {asset: to_text(amount) for asset, amount in escrow.items()},
        }
    return json_response(_encode({"balances": result}))


async def stats(request: web.Request) -> web.Response:
    advance_clock(request.app)
    return json_response(_encode(request.app[SIMULATOR].count_pruned_unread()))


async def get_faults(request: web.Request) -> web.Response:
    return json_response(_encode(request.app[SIMULATOR].faults))


async def set_faults(request: web.Request) -> web.Response:
    """Change some fault knobs (a partial ``FaultKnobs`` object); answers the knobs in force."""
    sim = request.app[SIMULATOR]
    try:
        patch = msgspec.json.decode(await request.read(), type=dict[str, Any])
        knobs = msgspec.convert({**msgspec.structs.asdict(sim.faults), **patch}, FaultKnobs)
    except msgspec.DecodeError as exc:  # includes ValidationError, e.g. a rate above 1
        raise bad_request(str(exc)) from None
    sim.set_faults(knobs)
    return json_response(_encode(knobs))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/agents", agents)
    app.router.add_get("/admin/feeds", feeds)
    app.router.add_get("/admin/truth", truth)
    app.router.add_get("/admin/balances", balances)
    app.router.add_get("/admin/stats", stats)
    app.router.add_get("/admin/faults", get_faults)
    app.router.add_post("/admin/faults", set_faults)

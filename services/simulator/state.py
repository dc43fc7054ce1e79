"""What every handler reads from the aiohttp app: the simulator, its clock, JSON answers."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from .simulator import Simulator

SIMULATOR = web.AppKey("simulator", Simulator)
# loop.time() when the app started: the simulator's clock counts from there.
STARTED_AT = web.AppKey("started_at", float)
# Set when the server stops, so an injected hang never delays shutdown.
STOPPING = web.AppKey("stopping", asyncio.Event)


def advance_clock(app: web.Application) -> None:
    """Bring the feeds up to now, so every answer reflects the configured rate."""
    started_at = app.get(STARTED_AT)
    if started_at is not None:
        app[SIMULATOR].advance(asyncio.get_running_loop().time() - started_at)


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def error_text(error: str, detail: str) -> str:
    return msgspec.json.encode({"error": error, "detail": detail}).decode()


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_text(error, detail).encode(), status, headers)


def bad_request(detail: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=error_text("bad_request", detail), content_type="application/json")

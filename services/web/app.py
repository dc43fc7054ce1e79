"""The explorer's aiohttp application: routes, security headers, login, template rendering.

Every page is rendered on the server by Jinja2 with autoescaping on, so nothing that came from
a feed (an agent id, a game name, a quarantined payload) is ever read as HTML. The Content
Security Policy allows scripts, styles and connections from this origin only, and no inline
script: the little JavaScript there is lives in ``static/explorer.js``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import jinja2
from aiohttp import web
from nats.aio.client import Client

from services.web.auth import COOKIE, SESSION_S, Gate, Viewer
from shared import display
from shared.history import HistoryError, UnknownAgent
from shared.jetstream import Topology

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # form posts then carry their Origin (checked)
    "Cross-Origin-Opener-Policy": "same-origin",
}
PUBLIC = ("/login", "/static/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Explorer:
    """What every handler reads from: the reader pool, NATS (as user ``web``), who may look."""

    pool: asyncpg.Pool
    nc: Client | None
    topology: Topology
    gate: Gate
    templates: jinja2.Environment


EXPLORER = web.AppKey("explorer", Explorer)
VIEWER = web.RequestKey("viewer", Viewer)


RATIOS = frozenset({"win_rate", "roi"})  # P&L figures that are ratios, read as percentages


def figure_cell(value: Any, figure: str) -> str:
    """A read-model figure by its name: a ratio as a percentage, anything else as :func:`cell`."""
    return percent(value) if figure in RATIOS else cell(value)


def percent(value: Any) -> str:
    """A ratio as a percentage (:func:`shared.display.percent`), an en dash for nothing."""
    return display.percent(value, missing="–")


def cell(value: Any) -> str:
    """How a figure reads on a page (:func:`shared.display.cell`), an en dash for nothing."""
    return display.cell(value, missing="–")


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["cell"] = cell
    env.filters["percent"] = percent
    env.filters["figure_cell"] = figure_cell
    env.filters["hex"] = lambda b: bytes(b).hex() if b else ""
    env.globals["static"] = _static_urls()
    return env


def _static_urls() -> Callable[[str], str]:
    """``static('explorer.js')`` -> its URL with a digest of its content, so a browser's cached
    copy is never stale."""
    versions = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12] for path in (HERE / "static").iterdir()
    }
    return lambda name: f"/static/{name}?v={versions[name]}"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    explorer = request.app[EXPLORER]
    html = explorer.templates.get_template(template).render(viewer=request.get(VIEWER), **context)
    return web.Response(text=html, content_type="text/html", status=status)


def viewer(request: web.Request) -> Viewer:
    return request[VIEWER]


def require_operator(request: web.Request) -> None:
    if not viewer(request).is_operator:
        raise web.HTTPForbidden(text="the operator's page: log in with the operator token")


def require_agent(request: web.Request) -> str:
    agent_id = request.match_info["agent"]
    if not viewer(request).may_see(agent_id):
        raise web.HTTPForbidden(text=f"logged in as {viewer(request).name}: you may see only your own pages")
    return agent_id


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def login_required(request: web.Request, handler: Handler) -> web.StreamResponse:
    gate = request.app[EXPLORER].gate
    if request.method == "POST" and not _same_origin(request):
        raise web.HTTPForbidden(text="cross-site form posts are refused")
    who = gate.bearer(request.headers.get("Authorization")) or gate.session(request.cookies.get(COOKIE))
    if who is None and not request.path.startswith(PUBLIC):
        if request.headers.get("Accept", "").startswith("text/event-stream"):
            raise web.HTTPUnauthorized()
        raise web.HTTPSeeOther(f"/login?next={request.path_qs}" if request.path != "/" else "/login")
    if who is not None:
        request[VIEWER] = who
    return await handler(request)


@web.middleware
async def answers_for_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnknownAgent as exc:
        return render(request, "error.html", 404, message=str(exc))
    except HistoryError as exc:
        return render(request, "error.html", 400, message=str(exc))
    except web.HTTPForbidden as exc:
        return render(request, "error.html", 403, message=exc.text or "forbidden")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


async def login_page(request: web.Request) -> web.Response:
    return render(request, "login.html", next=_safe_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    gate = request.app[EXPLORER].gate
    agent_id, secret = str(form.get("agent", "")).strip(), str(form.get("secret", ""))
    who = gate.agent_login(agent_id, secret) if agent_id else gate.operator_login(secret)
    target = _safe_next(str(form.get("next", "")))
    if who is None:
        error = "wrong agent id or password" if agent_id else "wrong operator token"
        return render(request, "login.html", 401, next=target, error=error)
    response = web.HTTPSeeOther(target if who.is_operator else _agent_home(target, who))
    response.set_cookie(
        COOKIE,
        gate.cookie(who),
        max_age=SESSION_S,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=request.secure,
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


def _safe_next(target: str | None) -> str:
    """Only a path on this site: ``//host`` (and ``/\\host``, which browsers read alike) would leave it."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _agent_home(target: str, who: Viewer) -> str:
    return target if target.startswith(f"/agents/{who.agent_id}") else f"/agents/{who.agent_id}"


def make_app(pool: asyncpg.Pool, nc: Client | None, topology: Topology, gate: Gate) -> web.Application:
    from services.web import live, pages

    app = web.Application(middlewares=[security_headers, login_required, answers_for_errors])
    app[EXPLORER] = Explorer(pool, nc, topology, gate, templates())
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", pages.leaderboard)
    app.router.add_get("/leaderboard/table", pages.leaderboard_table)
    app.router.add_get("/agents/{agent}", pages.agent)
    app.router.add_get("/agents/{agent}/explain", pages.explain)
    app.router.add_get("/agents/{agent}/history", pages.history)
    app.router.add_get("/agents/{agent}/what-if", pages.what_if)
    app.router.add_get("/operations", pages.operations)
    app.router.add_get("/live", live.all_events)
    app.router.add_get("/live/{agent}", live.agent_events)
    app.router.add_static("/static/", HERE / "static")
    return app

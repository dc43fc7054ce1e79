"""The Purple Flea contract: ``GET /transactions``, ``POST /bets``, ``POST /faucet``.

Each request draws one fault decision (see :mod:`.faults`). A 429 is answered before anything
happens. A command that then gets a 5xx or a hang *was* applied: the answer is what got lost,
which is exactly the case its ``request_id`` idempotency exists for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from shared.money import MoneyError, parse_amount

from . import rawjson
from .faults import FaultDecision
from .feed import UnknownSince
from .simulator import BetOutcome, InsufficientFunds
from .state import (
    SIMULATOR,
    STOPPING,
    advance_clock,
    bad_request,
    error_response,
    error_text,
    json_response,
)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class BetRequest(msgspec.Struct, frozen=True):
    agent_id: str
    game: str
    amount: Any  # a decimal string or JSON number; shared.money decides what is acceptable
    request_id: str
    asset: str = "PFLEA"


class FaucetRequest(msgspec.Struct, frozen=True):
    agent_id: str
    request_id: str


# float_hook: a JSON number amount such as 0.1 arrives as Decimal("0.1"), never a float.
_bet_decoder = msgspec.json.Decoder(BetRequest, float_hook=Decimal)
_faucet_decoder = msgspec.json.Decoder(FaucetRequest)
Command = TypeVar("Command", BetRequest, FaucetRequest)


def _authorize(request: web.Request, agent_id: str) -> None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    owner = request.app[SIMULATOR].agent_for_key(key.strip()) if scheme == "Bearer" else None
    if owner is None:
        raise web.HTTPUnauthorized(
            text=error_text("unauthorized", "missing or unknown API key"),
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if owner != agent_id:
        raise web.HTTPForbidden(
            text=error_text("forbidden", f"this API key does not belong to {agent_id!r}"),
            content_type="application/json",
        )


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise bad_request(f"limit: must be a positive integer, got {text!r}")
    return min(limit, MAX_LIMIT)


def _throttle(request: web.Request) -> FaultDecision:
    """This request's fault decision; a 429 (with Retry-After) is raised here."""
    sim = request.app[SIMULATOR]
    decision = sim.decide_fault()
    if decision.throttle:
        raise web.HTTPTooManyRequests(
            text=error_text("rate_limited", "too many requests; retry later"),
            content_type="application/json",
            headers={"Retry-After": str(sim.faults.retry_after)},
        )
    return decision


async def _deliver(
    request: web.Request, decision: FaultDecision, answer: Callable[[], web.Response]
) -> web.Response:
    """``answer()``, unless the decision says the answer fails (5xx) or comes late (hang)."""
    if decision.server_error is not None:
        return error_response(decision.server_error, "server_error", "injected fault; retry")
    if decision.hang_s > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request.app[STOPPING].wait(), decision.hang_s)
    return answer()


async def transactions(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    agent_id = request.query.get("agent_id", "")
    if not agent_id:
        raise bad_request("agent_id: required")
    _authorize(request, agent_id)
    limit = _limit(request.query.get("limit"))
    since = request.query.get("since") or None
    decision = _throttle(request)

    def page() -> web.Response:
        advance_clock(request.app)
        try:
            items = sim.page(agent_id, since, limit, decision.overlap)
        except UnknownSince as exc:
            return error_response(400, "unknown_since", str(exc))
        return json_response(rawjson.envelope("transactions", (tx.parts for tx in items)))

    return await _deliver(request, decision, page)


async def _command(request: web.Request, decoder: msgspec.json.Decoder[Command]) -> Command:
    try:
        command = decoder.decode(await request.read())
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise bad_request(str(exc)) from None
    _authorize(request, command.agent_id)
    if not command.request_id:
        raise bad_request("request_id: must not be empty")
    return command


def _bet_answer(outcome: BetOutcome) -> web.Response:
    win = outcome.win_tx.raw if outcome.win_tx is not None else b"null"
    won = b"true" if outcome.won else b"false"
    body = b'{"bet_tx":' + outcome.bet_tx.raw + b',"win_tx":' + win + b',"won":' + won + b"}"
    return json_response(body)


async def bets(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    command = await _command(request, _bet_decoder)
    try:
        amount = parse_amount(command.amount)
    except MoneyError as exc:
        raise bad_request(str(exc)) from None
    if amount <= 0 or not command.game or not command.asset:
        raise bad_request("amount must be positive; game and asset must not be empty")
    decision = _throttle(request)
    advance_clock(request.app)
    try:
        outcome = sim.place_bet(command.agent_id, command.game, amount, command.asset, command.request_id)
    except InsufficientFunds as exc:
        return error_response(409, "insufficient_funds", str(exc))
    return await _deliver(request, decision, lambda: _bet_answer(outcome))


async def faucet(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    command = await _command(request, _faucet_decoder)
    decision = _throttle(request)
    advance_clock(request.app)
    tx = sim.claim_faucet(command.agent_id, command.request_id)
    return await _deliver(request, decision, lambda: json_response(tx.raw))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/transactions", transactions)
    app.router.add_post("/bets", bets)
    app.router.add_post("/faucet", faucet)

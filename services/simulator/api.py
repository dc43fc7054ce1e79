"""The Purple Flea contract: each feed's ``GET /transactions``, the casino's ``POST /bet``,
the faucet's ``POST /claim``.

Each request draws one fault decision (see :mod:`.faults`). A 429 is answered before anything
happens. A command that then gets a 5xx or a hang *was* applied: the answer is what got lost. The
simulator honours an ``Idempotency-Key`` header (the ledger sends its command id) by answering
a repeated key with the first outcome; the documented Purple Flea API promises no such thing.
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
from .feed import FAUCET_AMOUNT, FEEDS, UnknownSince
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
    amount: Any  # a JSON number (or decimal string); shared.money decides what is acceptable


class ClaimRequest(msgspec.Struct, frozen=True):
    agent_id: str


# float_hook: a JSON number amount such as 0.1 arrives as Decimal("0.1"), never a float.
_bet_decoder = msgspec.json.Decoder(BetRequest, float_hook=Decimal)
_claim_decoder = msgspec.json.Decoder(ClaimRequest)
Command = TypeVar("Command", BetRequest, ClaimRequest)
IDEMPOTENCY_KEY = "Idempotency-Key"


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
    """``GET <feed base>/transactions?agent_id=&since=&limit=``: one agent's page of one feed."""
    sim = request.app[SIMULATOR]
    feed = request.match_info.get("feed", "casino")
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
            items = sim.page(agent_id, since, limit, decision.overlap, feed=feed)
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
    return command


def _bet_answer(outcome: BetOutcome) -> web.Response:
    return json_response(
        b'{"bet_id":%s,"outcome":"%s","payout":%s}'
        % (rawjson.string(outcome.bet_id), b"win" if outcome.won else b"loss", rawjson.number(outcome.payout))
    )


async def bet(request: web.Request) -> web.Response:
    """``POST <casino>/bet {agent_id, game, amount}`` -> ``{bet_id, outcome, payout}``."""
    sim = request.app[SIMULATOR]
    command = await _command(request, _bet_decoder)
    try:
        amount = parse_amount(command.amount)
    except MoneyError as exc:
        raise bad_request(str(exc)) from None
    if amount <= 0 or not command.game:
        raise bad_request("amount must be positive; game must not be empty")
    decision = _throttle(request)
    advance_clock(request.app)
    key = request.headers.get(IDEMPOTENCY_KEY)
    try:
        outcome = sim.place_bet(command.agent_id, command.game, amount, "PFLEA", key)
    except InsufficientFunds as exc:
        return error_response(409, "insufficient_funds", str(exc))
    return await _deliver(request, decision, lambda: _bet_answer(outcome))


async def claim(request: web.Request) -> web.Response:
    """``POST <faucet>/claim {agent_id}`` -> ``{success, amount, tx_id}``; ``success: false``
    once the agent has had ``faucet_limit`` claims (0: no limit)."""
    sim = request.app[SIMULATOR]
    command = await _command(request, _claim_decoder)
    decision = _throttle(request)
    advance_clock(request.app)
    tx = sim.claim_faucet(command.agent_id, request.headers.get(IDEMPOTENCY_KEY))
    if tx is None:
        body = b'{"success":false,"amount":0,"tx_id":null,"error":"claim limit reached"}'
    else:
        body = b'{"success":true,"amount":%s,"tx_id":%s}' % (
            rawjson.number(FAUCET_AMOUNT),
            rawjson.string(tx.id or ""),
        )
    return await _deliver(request, decision, lambda: json_response(body))


def add_routes(app: web.Application) -> None:
    # The casino's base is the simulator's root; every other feed's is /<feed>.
    app.router.add_get("/transactions", transactions)
    app.router.add_get("/{{feed:{}}}/transactions".format("|".join(FEEDS)), transactions)
    app.router.add_post("/bet", bet)
    app.router.add_post("/faucet/claim", claim)


def feed_paths() -> dict[str, str]:
    """Each feed's base, relative to the simulator's URL."""
    return {feed: "" if feed == "casino" else f"/{feed}" for feed in FEEDS}

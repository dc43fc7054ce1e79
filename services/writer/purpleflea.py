"""Purple Flea's command endpoints, as documented: the casino's ``POST /bet`` and the faucet's
``POST /claim``, each with ``Authorization: Bearer <agent key>``.

    POST <PURPLEFLEA_API_URL>/bet      {"agent_id", "game", "amount"}  -> {"bet_id", "outcome", "payout"}
    POST <PURPLEFLEA_FAUCET_URL>/claim {"agent_id"}                    -> {"success", "amount", "tx_id"}

Amounts leave as JSON numbers written from the Decimal's own digits and come back read as
Decimal; a float never holds one. The documented API has no idempotency key, so a request is
sent again only when it surely never arrived (the connection was refused) or was turned away
before anything happened (429). A timeout or a 5xx leaves the outcome unknown: that is
reported, never retried blindly. Each request still carries ``Idempotency-Key: <command id>``
for a server that honours it (the simulator does).
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from shared.money import MoneyError, parse_amount
from shared.settings import AgentCredential

log = logging.getLogger(__name__)


class UpstreamRejected(Exception):
    """Purple Flea refused the command (e.g. 409 insufficient funds): final, nothing happened."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Purple Flea answered {status}: {detail}")
        self.status = status
        self.detail = detail


class UpstreamUnavailable(Exception):
    """Purple Flea could not be asked (refused connection, 429 for too long): nothing happened."""


class OutcomeUnknown(Exception):
    """The request may have been applied, but no answer came (timeout, 5xx)."""


class BadAnswer(Exception):
    """Purple Flea answered 200 with something that is not the documented answer."""


class BetAnswer(msgspec.Struct, frozen=True):
    bet_id: str
    outcome: str
    payout: Any = 0

    def checked(self) -> tuple[bool, Decimal]:
        """(won, payout); raises BadAnswer for an outcome other than win/loss or a bad payout."""
        if self.outcome not in ("win", "loss"):
            raise BadAnswer(f"outcome: expected 'win' or 'loss', got {self.outcome!r}")
        if not self.bet_id:
            raise BadAnswer("bet_id: empty")
        try:
            payout = parse_amount(self.payout, "payout")
        except MoneyError as exc:
            raise BadAnswer(str(exc)) from None
        won = self.outcome == "win"
        if won and payout <= 0:
            raise BadAnswer(f"payout: a win must pay more than 0, got {self.payout!r}")
        return won, payout


class ClaimAnswer(msgspec.Struct, frozen=True):
    success: bool
    amount: Any = None
    tx_id: str | None = None
    error: str | None = None

    def checked(self) -> tuple[Decimal, str]:
        """(amount, tx_id) of a successful claim; raises BadAnswer when either is unusable."""
        try:
            amount = parse_amount(self.amount, "amount")
        except MoneyError as exc:
            raise BadAnswer(str(exc)) from None
        if amount <= 0:
            raise BadAnswer(f"amount: a claim must credit more than 0, got {self.amount!r}")
        if not self.tx_id:
            raise BadAnswer("tx_id: missing from a successful claim")
        return amount, self.tx_id


class _Error(msgspec.Struct, frozen=True):
    error: str = "error"
    detail: str = ""


# float_hook: JSON numbers are read as Decimal from their own digits.
_bet_decoder = msgspec.json.Decoder(BetAnswer, float_hook=Decimal)
_claim_decoder = msgspec.json.Decoder(ClaimAnswer, float_hook=Decimal)
_error_decoder = msgspec.json.Decoder(_Error)
_encode = msgspec.json.encode


def bet_body(agent_id: str, game: str, amount: Decimal) -> bytes:
    """``{"agent_id", "game", "amount"}`` with the amount as a plain JSON number."""
    return _encode({"agent_id": agent_id, "game": game, "amount": msgspec.Raw(format(amount, "f").encode())})


class PurpleFleaCommands:
    """The API client; keys come from ``PURPLEFLEA_AGENTS`` and, with
    ``PFLEA_AGENTS_FROM_SIMULATOR=1``, from the simulator's ``/admin/agents``."""

    def __init__(
        self,
        casino_url: str,
        faucet_url: str,
        agents: tuple[AgentCredential, ...],
        *,
        from_simulator: bool,
        timeout_s: float,
        budget_s: float,
    ) -> None:
        self.casino = httpx.AsyncClient(base_url=casino_url.rstrip("/"), timeout=httpx.Timeout(timeout_s))
        self.faucet = httpx.AsyncClient(base_url=faucet_url.rstrip("/"), timeout=httpx.Timeout(timeout_s))
        self.keys = {a.agent_id: a.api_key for a in agents}
        self.from_simulator = from_simulator
        self.budget_s = budget_s
        self._refreshed_at = -1e9

    async def close(self) -> None:
        await self.casino.aclose()
        await self.faucet.aclose()

    async def key_for(self, agent_id: str) -> str | None:
        """The agent's API key, or None: then the agent is not linked to Purple Flea."""
        if agent_id not in self.keys and self.from_simulator:
            await self._refresh_simulator_agents()
        return self.keys.get(agent_id)

    async def _refresh_simulator_agents(self) -> None:
        # New simulator agents are rare; asking at most every few seconds keeps an unknown agent's
        # commands from hammering /admin/agents.
        if time.monotonic() - self._refreshed_at < 5.0:
            return
        self._refreshed_at = time.monotonic()
        try:
            response = await self.casino.get("/admin/agents")
            response.raise_for_status()
            for agent in response.json()["agents"]:
                self.keys.setdefault(agent["agent_id"], agent["api_key"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("could not list the simulator's agents: %r", exc)

    async def place_bet(
        self, agent_id: str, key: str, game: str, amount: Decimal, command_id: str
    ) -> BetAnswer:
        content = await self._post(self.casino, "/bet", key, bet_body(agent_id, game, amount), command_id)
        try:
            return _bet_decoder.decode(content)
        except msgspec.DecodeError as exc:
            raise BadAnswer(f"not the documented answer of POST /bet ({exc})") from None

    async def claim_faucet(self, agent_id: str, key: str, command_id: str) -> ClaimAnswer:
        content = await self._post(self.faucet, "/claim", key, _encode({"agent_id": agent_id}), command_id)
        try:
            return _claim_decoder.decode(content)
        except msgspec.DecodeError as exc:
            raise BadAnswer(f"not the documented answer of POST /claim ({exc})") from None

    async def _post(
        self, http: httpx.AsyncClient, path: str, key: str, body: bytes, command_id: str
    ) -> bytes:
        deadline = time.monotonic() + self.budget_s
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Idempotency-Key": command_id,
        }
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await http.post(path, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never reached the server
                problem = type(exc).__name__
            except httpx.TransportError as exc:  # sent, maybe applied: say so, do not resend
                raise OutcomeUnknown(f"{path}: {type(exc).__name__} after sending") from None
            else:
                status = response.status_code
                if status == 200:
                    return response.content
                if status == 429:
                    problem = "HTTP 429"
                elif 400 <= status < 500:
                    raise UpstreamRejected(status, _detail(response.content))
                else:
                    raise OutcomeUnknown(f"{path}: HTTP {status}")
            wait = min(0.05 * 2**attempt, 1.0)
            if time.monotonic() + wait > deadline:
                raise UpstreamUnavailable(f"{path}: {problem} after {attempt} tries")
            log.info("retrying %s (%s)", path, problem)
            await asyncio.sleep(wait)


def _detail(content: bytes) -> str:
    try:
        error = _error_decoder.decode(content)
    except msgspec.DecodeError:
        return content[:200].decode(errors="replace")
    return f"{error.error}: {error.detail}" if error.detail else error.error

"""Purple Flea's command endpoints (``POST /bets``, ``POST /faucet``) for the writer.

Each call carries ``request_id`` = the command id, and Purple Flea answers a repeated request id
with the first outcome. So retrying a call whose answer was lost (5xx, timeout) is safe, and so
is a writer that crashed between the call and its commit: the retried command gets the same
transactions, hence the same event ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import httpx
import msgspec

from shared.money import to_text
from shared.settings import AgentCredential

log = logging.getLogger(__name__)


class UpstreamRejected(Exception):
    """Purple Flea refused the command (e.g. 409 insufficient funds): final, nothing happened."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Purple Flea answered {status}: {detail}")
        self.status = status
        self.detail = detail


class UpstreamUnavailable(Exception):
    """No answer in time (429, 5xx, timeouts): the outcome is unknown, retry the same command."""


class BetAnswer(msgspec.Struct, frozen=True):
    bet_tx: msgspec.Raw
    win_tx: msgspec.Raw
    won: bool


class _Error(msgspec.Struct, frozen=True):
    error: str = "error"
    detail: str = ""


_bet_decoder = msgspec.json.Decoder(BetAnswer)
_error_decoder = msgspec.json.Decoder(_Error)
_encode = msgspec.json.encode


class PurpleFleaCommands:
    """The API client; keys come from ``PURPLEFLEA_AGENTS`` and, with
    ``PFLEA_AGENTS_FROM_SIMULATOR=1``, from the simulator's ``/admin/agents``."""

    def __init__(
        self,
        base_url: str,
        agents: tuple[AgentCredential, ...],
        *,
        from_simulator: bool,
        timeout_s: float,
        budget_s: float,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout_s))
        self.keys = {a.agent_id: a.api_key for a in agents}
        self.from_simulator = from_simulator
        self.budget_s = budget_s
        self._refreshed_at = -1e9

    async def close(self) -> None:
        await self.http.aclose()

    async def key_for(self, agent_id: str) -> str | None:
        """The agent's API key, or None: then its commands are recorded locally only."""
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
            response = await self.http.get("/admin/agents")
            response.raise_for_status()
            for agent in response.json()["agents"]:
                self.keys.setdefault(agent["agent_id"], agent["api_key"])
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            log.warning("could not list the simulator's agents: %r", exc)

    async def place_bet(
        self, agent_id: str, key: str, game: str, amount: Decimal, asset: str, request_id: str
    ) -> tuple[list[bytes], bool]:
        """The raw transactions of the bet (and its win, if won) and whether it won."""
        body = {
            "agent_id": agent_id,
            "game": game,
            "amount": to_text(amount),
            "asset": asset,
            "request_id": request_id,
        }
        answer = _bet_decoder.decode(await self._post("/bets", key, body))
        txs = [bytes(answer.bet_tx)]
        if bytes(answer.win_tx) != b"null":
            txs.append(bytes(answer.win_tx))
        return txs, answer.won

    async def claim_faucet(self, agent_id: str, key: str, request_id: str) -> list[bytes]:
        body = {"agent_id": agent_id, "request_id": request_id}
        return [await self._post("/faucet", key, body)]

    async def _post(self, path: str, key: str, body: dict[str, str]) -> bytes:
        deadline = time.monotonic() + self.budget_s
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.post(
                    path, content=_encode(body), headers={"Authorization": f"Bearer {key}"}
                )
            except httpx.TransportError as exc:  # includes timeouts
                problem = f"{type(exc).__name__}"
            else:
                status = response.status_code
                if status == 200:
                    return response.content
                if status in (400, 401, 403, 404, 409, 422):
                    raise UpstreamRejected(status, _detail(response.content))
                problem = f"HTTP {status}"
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

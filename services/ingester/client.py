"""The Purple Flea transaction feed over httpx, with its failure modes as exceptions."""

from __future__ import annotations

import logging

import httpx

from services.ingester.pages import BadPage, Page, split_page
from shared.settings import AgentCredential, Feed

log = logging.getLogger(__name__)


class FeedError(Exception):
    pass


class RateLimited(FeedError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited; retry after {retry_after}s")
        self.retry_after = retry_after


class AuthFailed(FeedError):
    """401/403: the key is wrong; retrying soon will not help."""


class Transient(FeedError):
    """5xx, timeouts, connection errors: retry with backoff."""


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        return 1.0  # an HTTP-date or garbage: a second is a safe guess


class FeedClient:
    """One feed's httpx client, shared by every agent's poller of that feed."""

    def __init__(
        self, base_url: str, timeout_s: float, max_connections: int = 32, *, name: str = "casino"
    ) -> None:
        self.name = name
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def fetch(self, agent: AgentCredential, since: str | None, limit: int) -> Page:
        params: dict[str, str | int] = {"agent_id": agent.agent_id, "limit": limit}
        if since is not None:
            params["since"] = since
        try:
            response = await self.http.get(
                "/transactions",
                params=params,
                headers={"Authorization": f"Bearer {agent.api_key}"},
            )
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise Transient(f"transport: {exc!r}") from None
        status = response.status_code
        if status == 200:
            return split_page(response.content)
        if status == 429:
            raise RateLimited(_retry_after(response))
        if status in (401, 403):
            raise AuthFailed(f"HTTP {status}: the API key for {agent.agent_id} was refused")
        if status >= 500:
            raise Transient(f"HTTP {status}")
        raise BadPage(f"HTTP {status}: {response.text[:200]}", response.content)

    async def simulator_agents(self) -> list[AgentCredential]:
        """The simulator's agents and keys (``PFLEA_AGENTS_FROM_SIMULATOR=1``)."""
        response = await self.http.get("/admin/agents")
        response.raise_for_status()
        return [AgentCredential(a["agent_id"], a["api_key"]) for a in response.json()["agents"]]

    async def simulator_feeds(self) -> list[Feed]:
        """The simulator's feeds (used when PURPLEFLEA_FEEDS is unset)."""
        response = await self.http.get("/admin/feeds")
        response.raise_for_status()
        base = str(self.http.base_url).rstrip("/")
        return [Feed(name, base + path) for name, path in response.json()["feeds"].items()]

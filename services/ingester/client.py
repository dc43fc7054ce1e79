"""The Purple Flea transaction feed over httpx, with its failure modes as exceptions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import AsyncIterator

import httpx

from services.ingester.pages import BadPage, Page, split_page
from shared.settings import AgentCredential, Feed

log = logging.getLogger(__name__)

USER_AGENT = "pflea-ingester"


class FeedError(Exception):
    pass


class RateLimited(FeedError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limited; retry after {retry_after}s")
        self.retry_after = retry_after


class AuthFailed(FeedError):
    """401/403: the key is wrong; retrying soon will not help."""


class Transient(FeedError):
    """5xx, timeouts, connection errors, a body that is no page: retry with backoff.

    Nothing was consumed, so the cursor stays where it is; ``kind`` is the failure's label in
    ``pflea_ingester_feed_errors_total``.
    """

    def __init__(self, reason: str, kind: str = "transient") -> None:
        super().__init__(reason)
        self.kind = kind


class CursorRejected(FeedError):
    """A 4xx for a ``since`` cursor: the feed no longer knows it (pruned, or the feed was reset)."""

    def __init__(self, since: str, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status} for since={since!r}: {_excerpt(body)}")
        self.since = since
        self.status = status


def _excerpt(body: bytes, size: int = 160) -> str:
    """The start of a body, printable in one log line."""
    text = body[:size].decode("utf-8", "replace")
    return repr(text + ("…" if len(body) > size else ""))


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        return max(0.0, min(float(value), 300.0))
    except ValueError:
        return 1.0  # an HTTP-date or garbage: a second is a safe guess


def _inflater(encoding: str) -> zlib._Decompress | None:
    """A decompressor for the response's ``Content-Encoding``; None when it is not compressed."""
    match encoding.strip().lower():
        case "" | "identity":
            return None
        case "gzip" | "x-gzip" | "deflate":
            return zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
        case _:  # we ask for gzip or deflate only
            raise Transient(f"Content-Encoding {encoding!r} was not asked for", "bad_body")


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    """The body, decompressed, refused as soon as it passes ``limit`` bytes.

    Decompression is bounded as well: each chunk may inflate to the room left and no more, so a
    few kilobytes that would inflate to gigabytes (a gzip bomb) cost at most ``limit`` bytes.
    """
    inflater = _inflater(response.headers.get("Content-Encoding", ""))
    body = bytearray()
    async for chunk in response.aiter_raw():
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk, limit + 1 - len(body))
            except zlib.error as exc:
                raise Transient(f"corrupt compressed body ({exc})", "bad_body") from None
        body += chunk
        if len(body) > limit:
            raise Transient(
                f"the body is over {limit} bytes (PFLEA_INGEST_MAX_PAGE_BYTES); not read further",
                "too_large",
            )
    if inflater is not None and not inflater.eof:
        raise Transient("the compressed body ends early", "bad_body")
    return bytes(body)


def _page(response: httpx.Response, body: bytes, agent_id: str, since: str | None) -> Page:
    """The page a response holds, or the feed error it is."""
    status = response.status_code
    if status == 200:
        try:
            return split_page(body)
        except BadPage as exc:
            # Nothing was consumed and the cursor stays: a proxy's HTML or a cut-off body is a
            # passing fault, not a transaction to quarantine.
            raise Transient(f"HTTP 200 but {exc}: {_excerpt(body)}", "bad_body") from None
    if status == 429:
        raise RateLimited(_retry_after(response))
    if status in (401, 403):
        raise AuthFailed(f"HTTP {status}: the API key for {agent_id} was refused")
    if status >= 500 or status == 408:
        raise Transient(f"HTTP {status}")
    if 400 <= status < 500:
        if since is not None:
            raise CursorRejected(since, status, body)
        raise Transient(f"HTTP {status} for the first page: {_excerpt(body)}", "http_4xx")
    raise Transient(f"HTTP {status}: not a page of transactions", "http_status")


class Lanes:
    """Up to ``size`` httpx transports of one kept-alive connection each, a request in flight
    on each: the most recently used is handed out first, so the connections that stay open are
    the ones in use (an idle one expires after httpx's keep-alive expiry, 5 s).

    One shared pool of ``size`` connections cost 2.7 times the CPU per request with 16 requests
    in flight (953 against 353 µs, ``bench/runs/2026-12-04-ingest-lanes.md``): httpcore's pool
    looks at every connection it holds, and asks the socket of each idle one whether the server
    closed it, on each request and each response it finishes.

    The lanes share one TLS context: httpx builds one per transport otherwise, loading the CA
    bundle each time (~24 ms of CPU and a few hundred KB each; with 48 lanes on each of six feeds
    the ingester's RSS doubled).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.made = 0
        self.tls = httpx.create_ssl_context()
        self.free: list[httpx.AsyncHTTPTransport] = []  # a stack: the last one freed on top
        self.freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[httpx.AsyncHTTPTransport]:
        if self.free:
            transport = self.free.pop()
        elif self.made < self.size:
            self.made += 1
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            transport = httpx.AsyncHTTPTransport(verify=self.tls, limits=limits)
        else:
            async with self.freed:
                await self.freed.wait_for(lambda: bool(self.free))
                transport = self.free.pop()
        try:
            yield transport
        finally:
            self.free.append(transport)
            if self.made == self.size:  # someone may be waiting for it
                async with self.freed:
                    self.freed.notify()

    async def close(self) -> None:
        for transport in self.free:
            await transport.aclose()
        self.free.clear()


class FeedClient:
    """One feed's httpx client, shared by every agent's poller of that feed."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float,
        max_connections: int = 32,
        *,
        name: str = "casino",
        max_page_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.name = name
        base = base_url.rstrip("/")
        # Polls go straight to a transport: the client's per-request work (merging defaults,
        # cookies, auth and redirect handling) was a third of the ingester's CPU per poll, and a
        # poll needs none of it. The client serves the simulator's admin calls.
        self.lanes = Lanes(max_connections)
        timeout = httpx.Timeout(timeout_s)
        self.http = httpx.AsyncClient(base_url=base, timeout=timeout)
        self.transactions_url = httpx.URL(base + "/transactions")
        self.timeout = timeout.as_dict()
        # httpx's timeouts are per read: a feed dripping a byte a second would never trip them.
        self.deadline_s = timeout_s
        self.max_page_bytes = max_page_bytes

    async def close(self) -> None:
        await self.http.aclose()
        await self.lanes.close()

    async def fetch(self, agent: AgentCredential, since: str | None, limit: int) -> Page:
        params: dict[str, str | int] = {"agent_id": agent.agent_id, "limit": limit}
        if since is not None:
            params["since"] = since
        try:
            async with asyncio.timeout(self.deadline_s):
                response, body = await self._get(params, agent)
        except TimeoutError:
            raise Transient(
                f"no complete answer within {self.deadline_s}s (PFLEA_INGEST_TIMEOUT_S)", "deadline"
            ) from None
        except httpx.TimeoutException as exc:
            raise Transient(f"timeout: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise Transient(f"transport: {exc!r}") from None
        return _page(response, body, agent.agent_id, since)

    async def _get(
        self, params: dict[str, str | int], agent: AgentCredential
    ) -> tuple[httpx.Response, bytes]:
        """``GET /transactions`` and its body, read only where it will be used."""
        request = httpx.Request(
            "GET",
            self.transactions_url,
            params=params,
            headers={
                "Authorization": f"Bearer {agent.api_key}",
                # Only what read_bounded can inflate with a bound (not br or zstd).
                "Accept-Encoding": "gzip, deflate",
                "User-Agent": USER_AGENT,
            },
            extensions={"timeout": self.timeout},
        )
        async with self.lanes.lane() as transport:
            response = await transport.handle_async_request(request)
            response.request = request
            try:
                if response.status_code in (401, 403, 429) or response.status_code >= 500:
                    return response, b""
                return response, await read_bounded(response, self.max_page_bytes)
            finally:
                await response.aclose()  # the connection is kept alive for the next, or dropped

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

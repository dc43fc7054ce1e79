"""A Purple Flea feed for one agent on a real aiohttp server, misbehaving on cue.

Normal answers follow the contract (``GET /transactions``, items after ``since``, 400
``unknown_since`` for a cursor it does not know). ``faults`` are answered first, one per request:
each is a handler returning a bad response, or ``None`` for one normal answer in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FeedServer:
    def __init__(self, items: list[dict[str, Any]] | None = None) -> None:
        self.items: list[dict[str, Any]] = list(items or [])
        self.forgotten: set[str] = set()  # cursors answered with 400 unknown_since
        self.faults: list[Handler | None] = []
        self.requests = 0

    async def transactions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.faults:
            fault = self.faults.pop(0)
            if fault is not None:
                return await fault(request)
        since = request.query.get("since")
        ids = [str(item["id"]) for item in self.items]
        if since is not None and (since in self.forgotten or since not in ids):
            return json_error(400, "unknown_since", f"since: {since!r} is not in this feed")
        start = ids.index(since) + 1 if since is not None else 0
        limit = int(request.query.get("limit", "100"))
        body = msgspec.json.encode({"transactions": self.items[start : start + limit]})
        return web.Response(body=body, content_type="application/json")

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on a free port of 127.0.0.1; yields the base URL."""
        app = web.Application()
        app.router.add_get("/transactions", self.transactions)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


def json_error(status: int, error: str, detail: str) -> web.Response:
    body = msgspec.json.encode({"error": error, "detail": detail})
    return web.Response(status=status, body=body, content_type="application/json")


def body(status: int, data: bytes, content_type: str = "text/html") -> Handler:
    """Answer ``status`` with exactly ``data``."""

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=data, content_type=content_type)

    return answer


def gzip_bomb(inflated_bytes: int) -> Handler:
    """A gzip body of a few kilobytes per megabyte that inflates to ``inflated_bytes``."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1 << 20)
    parts = [packer.compress(b'{"transactions": [')]
    parts += [packer.compress(zeros) for _ in range(inflated_bytes >> 20)]
    data = b"".join(parts) + packer.flush()

    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=data, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    return answer


def drip(every_s: float) -> Handler:
    """A 200 whose page arrives one byte every ``every_s`` seconds, for as long as anyone listens."""

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up: what we want
            for byte in b'{"transactions": [' + b" " * 1_000_000:
                await response.write(bytes([byte]))
                await asyncio.sleep(every_s)
        return response

    return answer

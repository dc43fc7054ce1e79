"""The feed client's connections (services/ingester/client.py ``Lanes``) against a real HTTP
server: never more than its size open at once, kept alive, the last one freed used first."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from services.ingester.client import FeedClient
from shared.settings import AgentCredential
from tests.feed_server import FeedServer

AGENT = AgentCredential("agent-x", "key-x")


class SlowFeed(FeedServer):
    """An empty page after ``hold_s``; counts requests in flight and the connections they came on."""

    def __init__(self, hold_s: float) -> None:
        super().__init__()
        self.hold_s = hold_s
        self.in_flight = 0
        self.most_in_flight = 0
        self.peers: list[tuple[str, int]] = []  # the client's (address, port) of each request

    async def transactions(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.in_flight -= 1
        return web.Response(body=msgspec.json.encode({"transactions": []}), content_type="application/json")


async def test_a_feed_client_holds_at_most_its_size_of_connections_and_reuses_them() -> None:
    feed = SlowFeed(hold_s=0.1)
    async with feed.running() as url:
        client = FeedClient(url, timeout_s=10, max_connections=4)
        try:
            pages = await asyncio.gather(*(client.fetch(AGENT, None, 10) for _ in range(12)))
            assert all(page.items == [] for page in pages)
            assert feed.most_in_flight == 4, "twelve asked at once, four at a time"
            assert len(set(feed.peers)) == 4, "each of the four connections kept alive for the next"
            assert client.lanes.made == 4 and len(client.lanes.free) == 4
            # One TLS context for all (one each was ~24 ms of CPU and the CA bundle's memory).
            assert {id(lane._pool._ssl_context) for lane in client.lanes.free} == {id(client.lanes.tls)}

            # One at a time: always the connection freed last, the others left to expire.
            feed.peers.clear()
            for _ in range(5):
                await client.fetch(AGENT, None, 10)
            assert len(set(feed.peers)) == 1
        finally:
            await client.close()
    assert client.lanes.free == []


async def test_a_request_given_up_on_frees_its_connection_for_the_next() -> None:
    feed = SlowFeed(hold_s=30)
    async with feed.running() as url:
        client = FeedClient(url, timeout_s=0.2, max_connections=1)
        try:
            for _ in range(2):  # the second request finds the lane the first timed out on
                try:
                    await client.fetch(AGENT, None, 10)
                except Exception as exc:
                    assert "no complete answer within 0.2s" in str(exc)
                else:
                    raise AssertionError("a feed holding every answer 30 s gave a page")
            assert len(feed.peers) == 2 and client.lanes.made == 1 and len(client.lanes.free) == 1
        finally:
            await client.close()

"""The ingester's CPU per event: its parse path in this process, and the ingester process itself.

**Parse path.** Clean pages of ``PAGE`` simulator transactions (the casino feed, exactly the
bytes the simulator serves) go through what the poller does with a page between fetching and
publishing: split and decode it, validate every transaction into its envelope, cut the
envelopes into PFLEA_TX messages. Its limit, measured on the same bytes in the same run, is a
plain ``msgspec.json.decode`` of each page (to Python objects, nothing checked). Two figures:
the page's decode alone (the strict decode that tells the fast path from the byte-wise
fallback) as a ratio to that limit, and the whole path in µs of CPU per event. CPU time
(``time.process_time``), the best of ``ROUNDS`` rounds: the machine is shared.

**Process.** The simulator (its own process) holds ``ingest_agents`` × ``ingest_per_agent``
transactions; the ingester polls it with pages of ``PAGE`` and publishes into PFLEA_TX (no
writer: the stream keeps them). CPU seconds of the ingester process from its ``/readyz`` until
its published counter holds every transaction, per event.

**Fetch.** A feed request's CPU in the ingester with ``IN_FLIGHT`` requests in flight on one
feed client: a connection each (``Lanes``), against one httpx pool for all of them measured in
the same run, the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec

from bench.harness import Harness
from bench.pipeline import Pipeline
from bench.processes import BenchError, RssSampler, cpu_seconds
from bench.report import Figure, Target
from services.ingester.client import FeedClient
from services.ingester.pages import split_page
from services.simulator import Simulator, SimulatorConfig, rawjson
from shared.settings import AgentCredential
from shared.transactions import decode_item, parse_transaction
from shared.wire import tx_messages

PAGE = 200
ROUNDS = 15
FEED = "casino"
CPU_TARGET_US = 40.0  # per event, the whole ingester process (issue 17)
IN_FLIGHT = 16  # on one feed client: a busy feed's share of the 48 workers (PFLEA_INGEST_CONCURRENCY)
FETCHES = 2000
FETCH_ROUNDS = 3

Work = Callable[[str, bytes], object]


def clean_pages(agents: int = 10) -> list[tuple[str, bytes]]:
    """(agent, body) of full casino pages, as the simulator serves them (nothing malformed)."""
    sim = Simulator(SimulatorConfig(seed=3, agents=agents, backlog=2 * PAGE, rate=0, history=4 * PAGE))
    pages = []
    for agent_id in sim.feeds:
        items = sim.page(agent_id, None, PAGE, feed=FEED)
        pages.append((agent_id, rawjson.envelope("transactions", (tx.parts for tx in items))))
    return pages


def cpu_per_page(works: list[Work], pages: list[tuple[str, bytes]]) -> list[float]:
    """Each work's best CPU seconds per page over ``ROUNDS`` rounds, the works taking turns
    within a round so that a burst of load elsewhere weighs on all of them alike."""
    best = [float("inf")] * len(works)
    for _ in range(ROUNDS):
        for i, work in enumerate(works):
            started = time.process_time()
            for agent_id, body in pages:
                work(agent_id, body)
            best[i] = min(best[i], time.process_time() - started)
    return [seconds / len(pages) for seconds in best]


def plain_decode(agent_id: str, body: bytes) -> object:
    return msgspec.json.decode(body)


def page_decode(agent_id: str, body: bytes) -> object:
    """The page split and each item decoded strictly (what ``parse_transaction`` needs)."""
    page = split_page(body)
    if page.plain is None:
        return [decode_item(raw) for raw in page.items]
    return page.plain


def page_path(agent_id: str, body: bytes) -> object:
    """What the poller does with a fetched page before publishing it."""
    page = split_page(body)
    plain = page.plain or [None] * len(page.items)
    envelopes = [parse_transaction(raw, agent_id, FEED, p) for raw, p in zip(page.items, plain, strict=True)]
    return tx_messages(envelopes)


def parse_figures() -> list[Figure]:
    pages = clean_pages()
    events = [len(msgspec.json.decode(body)["transactions"]) for _, body in pages]
    if min(events) != PAGE:
        raise BenchError(f"pages of {min(events)} transactions, not {PAGE}")
    plain, decode, path = cpu_per_page([plain_decode, page_decode, page_path], pages)
    size = sum(len(body) for _, body in pages) // len(pages)
    return [
        Figure(
            "ingest",
            "plain msgspec.json.decode of a page",
            1e6 * plain,
            "µs/page",
            note=f"{PAGE} transactions, {size:,} bytes",
        ),
        Figure(
            "ingest",
            "page decode, strict",
            1e6 * decode,
            "µs/page",
            "plain msgspec.json.decode of a page",
            1e6 * plain,
            Target("max", 3, on="ratio"),
            note="clean pages of the simulator: the fast path; a page failing it is split byte-wise",
        ),
        Figure(
            "ingest",
            "parse path per event",
            1e6 * path / PAGE,
            "µs/event",
            note="decode, validate into envelopes, cut into PFLEA_TX messages (CPU, best of "
            f"{ROUNDS} rounds over {len(pages)} pages of {PAGE})",
        ),
    ]


async def process_figure(h: Harness) -> Figure:
    s = h.sizes
    expected_min = s.ingest_agents * s.ingest_per_agent
    p = Pipeline(h, "ingest", RssSampler())
    await p.prepare()
    try:
        await p.start_simulator(s.ingest_agents, s.ingest_per_agent, 0)
        started = await p.start_ingester(PFLEA_INGEST_PAGE_LIMIT=str(PAGE))
        proc = p.process("ingester")
        cpu_at_ready = cpu_seconds(proc.pid)
        deadline = started + max(120.0, expected_min / 200)
        published = 0.0
        while published < expected_min:
            if time.monotonic() > deadline:
                raise BenchError(f"the ingester published {published:.0f} of {expected_min}")
            if not proc.alive:
                raise BenchError(f"the ingester exited:\n{proc.log_tail()}")
            await asyncio.sleep(0.5)  # each scrape costs the ingester CPU too
            published = (await proc.metrics()).get("pflea_ingester_transactions_published_total", 0.0)
        cpu = cpu_seconds(proc.pid) - cpu_at_ready
        seconds = time.monotonic() - started
        sim = await p.simulator_stats()
    finally:
        p.stop()
        await p.cleanup()
    return Figure(
        "ingest",
        "ingester process CPU per event",
        1e6 * cpu / published,
        "µs/event",
        target=Target("max", CPU_TARGET_US, unit="µs/event"),
        note=f"{published:,.0f} transactions of {s.ingest_agents:,} agents published in {seconds:.1f} s "
        f"with pages of up to {PAGE} ({sim.get('requests', 0):,} feed requests); {cpu:.1f} CPU s "
        "of the ingester from its /readyz",
    )


class OnePool:
    """The limit of the fetch figure: one httpx pool of ``size`` connections for every request
    in flight, the feed client before its lanes (``services.ingester.client.Lanes``)."""

    def __init__(self, size: int) -> None:
        self.transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=size))

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[httpx.AsyncHTTPTransport]:
        yield self.transport

    async def close(self) -> None:
        await self.transport.aclose()


async def cpu_per_fetch(client: FeedClient, agents: list[AgentCredential]) -> float:
    """CPU seconds of this process per fetch, ``IN_FLIGHT`` fetches of small pages at a time."""

    async def polls(k: int) -> None:
        for i in range(FETCHES // IN_FLIGHT):
            await client.fetch(agents[(k + i) % len(agents)], None, 8)

    await asyncio.gather(*(polls(k) for k in range(IN_FLIGHT)))  # connections open, code warm
    started = time.process_time()
    await asyncio.gather(*(polls(k) for k in range(IN_FLIGHT)))
    return (time.process_time() - started) / FETCHES


async def fetch_figure(h: Harness) -> Figure:
    """A feed request's CPU in the ingester with ``IN_FLIGHT`` in flight on one feed client,
    against the same requests through one shared pool, in turns (the best of ``FETCH_ROUNDS``)."""
    p = Pipeline(h, "ingest-fetch", RssSampler())
    await p.prepare()
    try:
        await p.start_simulator(20, 50, 0)
        url = f"http://127.0.0.1:{p.sim_port}"
        lanes, pooled = FeedClient(url, 10, IN_FLIGHT), FeedClient(url, 10, IN_FLIGHT)
        await pooled.lanes.close()
        pooled.lanes = OnePool(IN_FLIGHT)  # type: ignore[assignment]
        try:
            agents = await lanes.simulator_agents()
            best = [float("inf"), float("inf")]
            for _ in range(FETCH_ROUNDS):
                for i, client in enumerate((lanes, pooled)):
                    best[i] = min(best[i], await cpu_per_fetch(client, agents))
        finally:
            await lanes.close()
            await pooled.close()
    finally:
        p.stop()
        await p.cleanup()
    return Figure(
        "ingest",
        f"feed request CPU, {IN_FLIGHT} in flight",
        1e6 * best[0],
        "µs/request",
        f"one shared httpx pool of {IN_FLIGHT}",
        1e6 * best[1],
        Target("max", 1, on="ratio"),
        note=f"a connection per request in flight (Lanes), pages of 8 from the simulator; CPU of "
        f"this process, best of {FETCH_ROUNDS} rounds of {FETCHES:,} requests each way, in turns",
    )


async def run(h: Harness) -> None:
    for figure in parse_figures():
        h.add(figure)
    h.add(await fetch_figure(h))
    h.add(await process_figure(h))

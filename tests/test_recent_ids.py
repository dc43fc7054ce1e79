"""The ingester's recent-id cache: bounded by configuration, and still skipping repeated pages.

No servers: the cache is pure, and the poller's page handling runs with publishing recorded.
"""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from services.ingester.poller import AgentPoller
from services.ingester.recent import RecentIds
from services.simulator.feed import MAX_OVERLAP, AgentFeed
from shared.envelope import TxEnvelope
from shared.ops import Lifecycle
from shared.settings import AgentCredential, Settings


def sizes(cache: RecentIds) -> dict[object, int]:
    return {key: len(ids) for key, ids in cache._keys.items()}


def test_the_cache_never_exceeds_its_budget_or_a_page_per_key_under_an_adversarial_sequence() -> None:
    rng = random.Random(19)
    cache = RecentIds(per_key=50, total=1_000)
    next_id = 0
    for step in range(60_000):
        # Phases: a few hot keys, then ever new keys (agents added), then a flood of one key.
        phase = step // 10_000
        if phase in (0, 3):
            key = ("casino", f"agent-{rng.randrange(8)}")
        elif phase in (1, 4):
            key = ("casino", f"agent-{step}")  # every add a key never seen before
        else:
            key = ("casino", "agent-hot")
        roll = rng.random()
        if roll < 0.01:
            cache.clear(key)
        elif roll < 0.05 and next_id:
            cache.add(key, f"tx-{rng.randrange(next_id)}")  # an id seen before, maybe elsewhere
        else:
            next_id += 1
            cache.add(key, f"tx-{next_id}")
        assert len(cache) <= 1_000 and len(cache._keys.get(key, ())) <= 50
        if step % 100 == 0:  # the whole picture agrees with the running count
            per_key = sizes(cache)
            assert len(cache) == sum(per_key.values()) and max(per_key.values(), default=0) <= 50
    assert len(cache) > 900, "the budget is used, not left empty"


def test_many_keys_share_the_budget_and_each_keeps_its_newest_ids() -> None:
    cache = RecentIds(per_key=500, total=1_000)
    for round_ in range(20):  # 300 keys polled in turn: the worst case for an LRU of keys
        for agent in range(300):
            cache.add(agent, f"{agent}-{round_}")
    assert len(cache) <= 1_000
    assert cache.share() == 3
    for agent in range(300):  # every key still knows its last three ids, not just recent keys
        assert all(cache.contains(agent, f"{agent}-{r}") for r in (17, 18, 19))
        assert not cache.contains(agent, f"{agent}-16")


def test_more_keys_than_ids_in_the_budget_forgets_the_least_recently_used_keys() -> None:
    cache = RecentIds(per_key=10, total=5)
    for agent in range(100):
        cache.add(agent, "x")
        assert len(cache) <= 5 and cache.keys() <= 5
    assert cache.contains(99, "x") and not cache.contains(0, "x")


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RecentIds(per_key=0, total=10)


class RecordingPoller(AgentPoller):
    """The real page handling; publishing only records what would have been sent."""

    def __init__(self, agent: AgentCredential, settings: Settings, recent: RecentIds) -> None:
        super().__init__(
            agent,
            feed=SimpleNamespace(name="casino"),  # type: ignore[arg-type]
            js=None,  # type: ignore[arg-type]
            pool=None,  # type: ignore[arg-type]
            quarantine=None,  # type: ignore[arg-type]
            topology=None,  # type: ignore[arg-type]
            settings=settings,
            lifecycle=Lifecycle(),
            gate=asyncio.Semaphore(1),
            recent=recent,
        )
        self.published: list[str] = []

    async def publish(self, envelopes: list[TxEnvelope]) -> None:
        self.published += [e.tx_id for e in envelopes]


async def test_overlapping_pages_are_published_once_with_many_agents_on_a_small_budget() -> None:
    limit, agents = 20, 40
    settings = Settings(ingest_page_limit=limit, ingest_recent_ids=agents * MAX_OVERLAP)
    recent = RecentIds(settings.ingest_page_limit, settings.ingest_recent_ids)
    rng = random.Random(7)
    feeds = [AgentFeed(3, f"agent-{i:04d}", i) for i in range(agents)]
    pollers = [RecordingPoller(AgentCredential(f.agent_id, "k"), settings, recent) for f in feeds]
    for _ in range(60):
        for feed, poller in zip(feeds, pollers, strict=True):
            for _ in range(rng.randrange(0, 8)):
                feed.generate(0.0, 0.1)
            overlap = rng.randint(1, MAX_OVERLAP) if rng.random() < 0.5 else 0
            page = feed.page("casino", poller.since, limit, overlap)
            await poller.handle([tx.raw for tx in page])
            assert len(recent) <= settings.ingest_recent_ids
    for feed, poller in zip(feeds, pollers, strict=True):
        casino = [tx.id for tx in feed.txs if tx.feed == "casino"]
        assert poller.published == casino[: len(poller.published)], "each once, in feed order"
        assert len(poller.published) > len(casino) - 8 * limit

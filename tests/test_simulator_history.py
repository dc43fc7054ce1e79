"""The simulator keeps a bounded window of each agent's history and refuses cursors before it."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from services.simulator import Simulator, SimulatorConfig, load_simulator_config, running_simulator
from services.simulator.config import HISTORY_BUDGET, HISTORY_PER_AGENT
from services.simulator.content import MAX_DOMAINS, MAX_OPEN_ESCROWS
from services.simulator.feed import FEEDS, AgentFeed, UnknownSince
from services.simulator.simulator import IDEMPOTENT_ANSWERS
from services.simulator.window import COMPACT_AFTER
from shared.settings import SettingsError


def test_the_window_never_exceeds_its_size_and_keeps_the_newest_transactions() -> None:
    feed = AgentFeed(5, "agent-0001", 1, history=100)
    for n in range(5_000):
        feed.generate(0.05, 0.1)
        if n % 7 == 0:
            feed.faucet()
        # Each feed's newest item is kept however old: at most one per feed beyond the window.
        assert len(feed.txs) <= 100 + len(FEEDS)
        for window in feed._feeds.values():
            # Dropped slots awaiting the shift: fewer than COMPACT_AFTER or than the items kept.
            assert len(window._items) <= max(COMPACT_AFTER, len(window)) + len(window)
    kept = feed.txs
    assert [tx.seq for tx in kept] == sorted(tx.seq for tx in kept)
    assert kept[-1].seq == feed.sequence
    assert sum(len(window._positions) for window in feed._feeds.values()) <= len(kept)
    assert feed.dropped > 4_000


def test_what_an_agent_holds_is_capped_however_long_it_trades() -> None:
    """More locks are drawn than releases and more purchases than sales: uncapped, each agent's
    open escrows and domains grew for as long as the simulator ran (about 20 MB an hour)."""
    feed = AgentFeed(11, "agent-0002", 2, history=50)
    most_escrows = most_domains = 0
    late: set[str | None] = set()
    for n in range(20_000):
        tx = feed.generate(0.0, 0.1)
        most_escrows = max(most_escrows, len(feed.wallet.escrows))
        most_domains = max(most_domains, len(feed.wallet.domains))
        if n >= 10_000:
            late.add(tx.type)
    assert (most_escrows, most_domains) == (MAX_OPEN_ESCROWS, MAX_DOMAINS), "the caps are reached"
    assert {"escrow", "escrow_release", "domain_purchase", "domain_sale"} <= late, "all still happen"


def test_a_transaction_is_the_same_text_with_or_without_a_window() -> None:
    whole, windowed = AgentFeed(9, "agent-0003", 3, history=10**6), AgentFeed(9, "agent-0003", 3, history=50)
    for _ in range(400):
        whole.generate(0.05, 0.1)
        windowed.generate(0.05, 0.1)
    assert windowed.txs[-50:] == whole.txs[-50:]


def test_a_cursor_inside_the_window_is_served_and_one_before_it_is_unknown() -> None:
    feed = AgentFeed(5, "agent-0001", 1, history=50)
    for _ in range(300):
        feed.generate(0.0, 0.1)
    casino = [tx for tx in feed.txs if tx.feed == "casino"]
    oldest = casino[0]
    assert feed.page("casino", None, 1000) == casino, "no cursor: from the oldest kept"
    assert feed.page("casino", oldest.id, 1000) == casino[1:], "the oldest kept is still a cursor"
    assert feed.page("casino", casino[5].id, 1000, overlap=3) == casino[3:]
    assert feed.page("casino", casino[1].id, 1000, overlap=3) == casino, "an overlap stops at the window"
    for _ in range(60):
        feed.generate(0.0, 0.1)
    assert oldest.id is not None
    with pytest.raises(UnknownSince, match="PFLEA_SIM_HISTORY"):
        feed.page("casino", oldest.id, 1000)


def test_what_is_dropped_before_any_page_served_it_is_counted_and_nothing_else() -> None:
    feed = AgentFeed(5, "agent-0001", 1, history=50)
    for _ in range(50):
        feed.generate(0.0, 0.1)
    served_up_to = feed.sequence
    for name in FEEDS:  # everything so far served once
        feed.page(name, None, 1000)
    for _ in range(250):  # then nobody reads
        feed.generate(0.0, 0.1)
    assert all(tx.seq > served_up_to for tx in feed.txs if tx.feed == "casino"), "the served are gone"
    never_served = feed.sequence - served_up_to
    assert feed.pruned_unread == never_served - sum(1 for tx in feed.txs if tx.seq > served_up_to)

    held = {tx.seq for tx in feed.page("casino", None, 3)}  # a page serves only what it holds
    dropped, pruned = feed.dropped, feed.pruned_unread
    for _ in range(100):
        feed.generate(0.0, 0.1)
    assert held.isdisjoint(tx.seq for tx in feed.txs)
    assert feed.pruned_unread - pruned == feed.dropped - dropped - len(held)


async def test_the_stats_count_transactions_pruned_unread() -> None:
    config = SimulatorConfig(port=0, seed=7, agents=2, backlog=0, rate=0.0, history=20)
    sim = Simulator(config)
    for agent_id in sim.feeds:
        for _ in range(30):
            sim.feed(agent_id).generate(0.0, 0.1)
    async with running_simulator(config, sim) as url, httpx.AsyncClient(base_url=url) as client:
        stats = (await client.get("/admin/stats")).json()
    assert stats["pruned_unread"] == sum(feed.pruned_unread for feed in sim.feeds.values()) > 0


async def test_a_stale_cursor_is_answered_400_unknown_since_over_http() -> None:
    config = SimulatorConfig(port=0, seed=7, agents=1, backlog=30, rate=0.0, history=20)
    sim = Simulator(config)
    stale = next(tx for tx in sim.truth("agent-0001") if tx.feed == "casino").id
    feed = sim.feed("agent-0001")
    for _ in range(40):
        feed.generate(0.0, 0.1)
    assert stale not in {tx.id for tx in sim.truth()}
    async with running_simulator(config, sim) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.get(
            "/transactions",
            params={"agent_id": "agent-0001", "since": stale},
            headers={"Authorization": f"Bearer {feed.api_key}"},
        )
        assert (response.status_code, response.json()["error"]) == (400, "unknown_since")
        fresh = await client.get(
            "/transactions",
            params={"agent_id": "agent-0001"},
            headers={"Authorization": f"Bearer {feed.api_key}"},
        )
        served = [item["id"] for item in fresh.json()["transactions"]]
        assert served == [tx.id for tx in sim.truth() if tx.feed == "casino"]


def test_idempotency_answers_are_bounded() -> None:
    sim = Simulator(SimulatorConfig(port=0, seed=1, agents=1, backlog=0, rate=0.0, history=10))
    for n in range(IDEMPOTENT_ANSWERS + 50):
        sim.claim_faucet("agent-0001", f"key-{n}")
    assert len(sim._faucets) == IDEMPOTENT_ANSWERS
    assert sim.claim_faucet("agent-0001", f"key-{IDEMPOTENT_ANSWERS + 49}") is not None
    assert sim.balances("agent-0001")[0]["PFLEA"] >= Decimal(10) * IDEMPOTENT_ANSWERS


def test_history_is_a_count_or_unset() -> None:
    with pytest.raises(SettingsError, match="PFLEA_SIM_HISTORY"):
        load_simulator_config({"PFLEA_SIM_HISTORY": "-1"})
    assert load_simulator_config({"PFLEA_SIM_HISTORY": "7"}).history_per_agent == 7


@pytest.mark.parametrize("agents", [1, 50, 500, 5_000, 50_000])
def test_unset_history_shares_one_budget_among_the_agents(agents: int) -> None:
    """Memory follows configuration, not agents x a per-agent window."""
    per_agent = load_simulator_config({"PFLEA_SIM_AGENTS": str(agents)}).history_per_agent
    low, high = HISTORY_PER_AGENT
    assert low <= per_agent <= high
    assert agents * per_agent <= max(HISTORY_BUDGET, agents * low)
    if low * agents <= HISTORY_BUDGET <= high * agents:
        assert agents * per_agent == HISTORY_BUDGET


def test_the_simulator_keeps_the_share_it_is_given() -> None:
    sim = Simulator(SimulatorConfig(port=0, seed=3, agents=400, backlog=300, rate=0.0))
    assert sim.config.history_per_agent == HISTORY_BUDGET // 400
    assert len(sim.truth()) <= HISTORY_BUDGET + 400 * len(FEEDS)

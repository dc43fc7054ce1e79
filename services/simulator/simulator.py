"""The simulated Purple Flea source: every agent's feed, the clock-driven growth, commands.

No I/O and no clock of its own: the HTTP app passes the elapsed time to :meth:`Simulator.advance`,
so the same calls give the same state in a test, a benchmark or the ``python -m`` process.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from decimal import Decimal
from typing import TypeVar

import msgspec

from shared.settings import AgentCredential

from .config import FaultKnobs, SimulatorConfig
from .faults import FaultDecision, FaultInjector
from .feed import AgentFeed, StoredTx, UnknownSince
from .wallet import InsufficientFunds

__all__ = ["BetOutcome", "InsufficientFunds", "Simulator", "UnknownAgent", "UnknownSince"]

# Answers kept for a repeated Idempotency-Key, per kind of command, newest first to stay: a
# retry comes within seconds, and an unbounded map would grow with every command ever sent.
IDEMPOTENT_ANSWERS = 10_000
V = TypeVar("V")


class UnknownAgent(LookupError):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent_id: {agent_id!r} is not an agent of this simulator")
        self.agent_id = agent_id


class BetOutcome(msgspec.Struct, frozen=True):
    bet_id: str
    bet_tx: StoredTx
    win_tx: StoredTx | None
    payout: Decimal  # 0 on a loss

    @property
    def won(self) -> bool:
        return self.win_tx is not None


class SimulatorStats(msgspec.Struct):
    generated: int = 0
    malformed: int = 0
    commands: int = 0
    requests: int = 0
    served_items: int = 0
    too_many_requests: int = 0
    server_errors: int = 0
    hangs: int = 0
    repeated_pages: int = 0
    # Transactions the bounded history dropped before any page had served them: no reader can
    # ever have them. Counted when the stats are read (see Simulator.count_pruned_unread).
    pruned_unread: int = 0


def agent_id_of(index: int) -> str:
    return f"agent-{index:04d}"


class Simulator:
    """All agents' feeds. ``backlog`` transactions per agent exist from the start; after that
    ``rate`` per second across all agents, round-robin, as :meth:`advance` is told time passes."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.faults = config.faults
        self.stats = SimulatorStats()
        self._injector = FaultInjector(config.seed)
        self.feeds: dict[str, AgentFeed] = {}
        for index in range(1, config.agents + 1):
            agent_id = agent_id_of(index)
            self.feeds[agent_id] = AgentFeed(config.seed, agent_id, index, config.history_per_agent)
        self._by_key = {feed.api_key: feed.agent_id for feed in self.feeds.values()}
        self._round_robin = list(self.feeds.values())
        self._cursor = 0
        self._live = 0  # transactions generated after the backlog
        # Answers by (agent, Idempotency-Key): a repeated request gets the first answer.
        self._bets: OrderedDict[tuple[str, str], BetOutcome] = OrderedDict()
        self._faucets: OrderedDict[tuple[str, str], StoredTx] = OrderedDict()
        for feed in self._round_robin:
            for _ in range(config.backlog):
                if self._capped(feed):
                    break
                self._generate(feed)

    @property
    def credentials(self) -> tuple[AgentCredential, ...]:
        return tuple(AgentCredential(f.agent_id, f.api_key) for f in self.feeds.values())

    def agent_for_key(self, api_key: str) -> str | None:
        return self._by_key.get(api_key)

    def feed(self, agent_id: str) -> AgentFeed:
        try:
            return self.feeds[agent_id]
        except KeyError:
            raise UnknownAgent(agent_id) from None

    def _capped(self, feed: AgentFeed) -> bool:
        return 0 < self.config.max_per_agent <= feed.generated

    def _generate(self, feed: AgentFeed) -> StoredTx:
        tx = feed.generate(self.faults.malformed_rate, self.config.numeric_amount_rate)
        self.stats.generated += 1
        self.stats.malformed += tx.malformed is not None
        return tx

    def _next_uncapped(self) -> AgentFeed | None:
        for _ in range(len(self._round_robin)):
            feed = self._round_robin[self._cursor]
            self._cursor = (self._cursor + 1) % len(self._round_robin)
            if not self._capped(feed):
                return feed
        return None

    def advance(self, elapsed_s: float) -> int:
        """Generate the transactions due ``elapsed_s`` seconds after start; returns how many."""
        target = int(self.config.rate * elapsed_s)
        made = 0
        while self._live < target:
            feed = self._next_uncapped()
            if feed is None:  # every agent reached max_per_agent: nothing more is ever due
                self._live = target
                break
            self._generate(feed)
            self._live += 1
            made += 1
        return made

    def set_faults(self, knobs: FaultKnobs) -> None:
        self.faults = knobs

    def decide_fault(self) -> FaultDecision:
        """The fault for the next feed request (counted in :attr:`stats`)."""
        decision = self._injector.decide(self.faults)
        stats = self.stats
        stats.requests += 1
        stats.too_many_requests += decision.throttle
        stats.server_errors += decision.server_error is not None
        stats.hangs += decision.hang_s > 0
        stats.repeated_pages += decision.overlap > 0
        return decision

    def page(
        self, agent_id: str, since: str | None, limit: int, overlap: int = 0, feed: str = "casino"
    ) -> list[StoredTx]:
        items = self.feed(agent_id).page(feed, since, limit, overlap)
        self.stats.served_items += len(items)
        return items

    def count_pruned_unread(self) -> SimulatorStats:
        """:attr:`stats` with ``pruned_unread`` brought up to date (a sum over the agents)."""
        self.stats.pruned_unread = sum(feed.pruned_unread for feed in self.feeds.values())
        return self.stats

    def truth(self, agent_id: str | None = None) -> list[StoredTx]:
        """Every transaction kept (each agent's newest ``history``), per agent in feed order."""
        feeds = [self.feed(agent_id)] if agent_id is not None else self.feeds.values()
        return [tx for feed in feeds for tx in feed.txs]

    def balances(self, agent_id: str) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        """(available, locked in escrow) per asset, as the well-formed transactions leave them."""
        wallet = self.feed(agent_id).wallet
        return wallet.balances(), wallet.locked()

    def _settled(self, agent_id: str) -> AgentFeed:
        """The agent's feed with any win owed to its last generated bet already appended, so a
        command's transactions never come between a bet and its win."""
        feed = self.feed(agent_id)
        while feed.activity.has_pending_win and not self._capped(feed):
            self._generate(feed)
        return feed

    def place_bet(
        self, agent_id: str, game: str, amount: Decimal, asset: str, idempotency_key: str | None = None
    ) -> BetOutcome:
        """Bet now; the same ``idempotency_key`` again returns the first outcome unchanged."""
        key = (agent_id, idempotency_key) if idempotency_key else None
        if key is not None and (known := self._bets.get(key)) is not None:
            return known
        feed = self._settled(agent_id)
        bet_id = f"bet-{uuid.uuid4().hex}"  # unique across simulator restarts too
        bet_tx, win_tx, payout = feed.bet(game, amount, asset, bet_id)
        self.stats.commands += 1
        outcome = BetOutcome(bet_id, bet_tx, win_tx, payout)
        if key is not None:
            _remember(self._bets, key, outcome)
        return outcome

    def claim_faucet(self, agent_id: str, idempotency_key: str | None = None) -> StoredTx | None:
        """A claim's transaction, or None when the agent has had ``faucet_limit`` claims."""
        key = (agent_id, idempotency_key) if idempotency_key else None
        if key is not None and (known := self._faucets.get(key)) is not None:
            return known
        feed = self._settled(agent_id)
        if 0 < self.config.faucet_limit <= feed.claims:
            return None
        tx = feed.faucet()
        self.stats.commands += 1
        if key is not None:
            _remember(self._faucets, key, tx)
        return tx


def _remember(answers: OrderedDict[tuple[str, str], V], key: tuple[str, str], answer: V) -> None:
    answers[key] = answer
    if len(answers) > IDEMPOTENT_ANSWERS:
        answers.popitem(last=False)

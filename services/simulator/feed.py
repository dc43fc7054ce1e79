"""One agent's transaction feed: its newest items, their raw JSON, and paging.

An agent keeps its newest ``history`` transactions (``PFLEA_SIM_HISTORY``) over all its feeds;
older ones are dropped, so memory follows configuration, not how long the simulator runs. A
cursor (``since``) is served while its item is kept; an older one is answered
:class:`UnknownSince` (HTTP 400 ``unknown_since``), as the real API answers a pruned cursor,
and the ingester reads that feed again from the oldest item kept. Each feed's newest item is
never dropped, so the cursor of a caught-up reader stays valid however quiet its feed.

Three random streams per agent, all seeded from (seed, agent) and stepped in order:
``content`` decides the economics (:mod:`.content`), ``wire`` decides how an item is written
(JSON number or string amount, malformed or not), ``commands`` decides the outcome of bets
placed through ``POST /bets``. So the well-formed economics of an agent do not change when the
malformed rate or the number format changes, and commands only append.
"""

from __future__ import annotations

import heapq
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec

from shared.money import MONEY_CONTEXT

from . import rawjson
from .content import WIN_MULTIPLIER, WIN_PROBABILITY, AgentActivity, Draft
from .malformed import KINDS, malformed_item
from .wallet import Wallet
from .window import FeedWindow

EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
# Which Purple Flea service's feed reports a transaction of each type (anything else: casino).
FEED_OF_TYPE = {
    "faucet": "faucet",
    "trade": "trading",
    "swap": "trading",
    "transfer_in": "wallet",
    "transfer_out": "wallet",
    "domain_purchase": "domains",
    "domain_renewal": "domains",
    "domain_sale": "domains",
    "escrow": "escrow",
    "escrow_release": "escrow",
}
FEEDS = ("casino", "trading", "wallet", "domains", "faucet", "escrow")
FAUCET_AMOUNT = Decimal("10.00")
# A repeated page starts up to this many items before ``since``.
MAX_OVERLAP = 3


class StoredTx(msgspec.Struct, frozen=True, gc=False):
    """One item of a feed: its raw JSON parts and what the ground truth says about it."""

    agent_id: str
    seq: int
    id: str | None
    type: str | None
    malformed: str | None
    parts: tuple[bytes, ...]
    feed: str = "casino"

    @property
    def raw(self) -> bytes:
        return b"".join(self.parts)


def feed_of(tx_type: str | None) -> str:
    return FEED_OF_TYPE.get(tx_type or "", "casino")


class UnknownSince(LookupError):
    def __init__(self, agent_id: str, since: str, feed: str = "casino") -> None:
        super().__init__(
            f"since: {since!r} is not a transaction id in the {feed} feed of {agent_id}, or an older one"
            " than this simulator keeps (PFLEA_SIM_HISTORY); read again without since"
        )
        self.since = since


DEFAULT_HISTORY = 5_000


class AgentFeed:
    """The feed of one agent; :meth:`generate` adds the next transaction, and the oldest beyond
    ``history`` is dropped."""

    def __init__(self, seed: int, agent_id: str, index: int, history: int = DEFAULT_HISTORY) -> None:
        self.seed = seed
        self.agent_id = agent_id
        self.api_key = f"key-{agent_id}"
        self.wallet = Wallet()
        self.activity = AgentActivity(random.Random(f"{seed}:{agent_id}"), self.wallet, f"{seed}-{agent_id}")
        self._wire = random.Random(f"{seed}:{agent_id}:wire")
        self._commands = random.Random(f"{seed}:{agent_id}:commands")
        # Agents tick at different paces so their timestamps interleave.
        self._interval = timedelta(seconds=30 + index % 30)
        self.history = history
        self._feeds: dict[str, FeedWindow[StoredTx]] = {name: FeedWindow() for name in FEEDS}
        self._kept = 0  # items in all windows
        self.sequence = 0  # transactions ever appended, dropped ones too
        self.dropped = 0
        self.generated = 0
        self.malformed = 0
        self.claims = 0  # through POST /claim

    @property
    def pruned_unread(self) -> int:
        """Transactions dropped from the history before any page had served them."""
        return sum(window.dropped_unserved for window in self._feeds.values())

    @property
    def txs(self) -> list[StoredTx]:
        """The transactions kept, every feed's, in the order they happened."""
        return list(heapq.merge(*self._feeds.values(), key=lambda tx: tx.seq))

    def _next_id(self) -> tuple[int, str, str]:
        seq = self.sequence + 1
        created_at = (EPOCH + seq * self._interval).strftime("%Y-%m-%dT%H:%M:%SZ")
        return seq, f"sim-{self.seed}-{self.agent_id}-{seq:08d}", created_at

    def _append(self, tx: StoredTx) -> StoredTx:
        self.sequence = tx.seq
        self._feeds[tx.feed].append(tx)
        self._kept += 1
        while self._kept > self.history and self._drop_oldest():
            pass
        return tx

    def _drop_oldest(self) -> bool:
        """Drop the agent's oldest transaction that is not its feed's newest; False if none."""
        droppable = [feed for feed in self._feeds.values() if len(feed) > 1]
        if not droppable:
            return False
        min(droppable, key=lambda feed: feed.first().seq).drop_first()
        self._kept -= 1
        self.dropped += 1
        return True

    def _append_draft(self, draft: Draft, *, numeric_amount: bool = False) -> StoredTx:
        seq, tx_id, created_at = self._next_id()
        pairs = rawjson.tx_pairs(tx_id, draft, created_at, numeric_amount=numeric_amount)
        parts = rawjson.render(pairs)
        return self._append(StoredTx(self.agent_id, seq, tx_id, draft.type, None, parts, feed_of(draft.type)))

    def generate(self, malformed_rate: float, numeric_amount_rate: float) -> StoredTx:
        """Append the next generated transaction (well-formed or, at ``malformed_rate``, not)."""
        self.generated += 1
        # Both draws happen for every item, so the wire stream stays aligned whatever the rates.
        spoil = self._wire.random() < malformed_rate
        numeric = self._wire.random() < numeric_amount_rate
        # The first item registers the agent, and a queued win belongs right after its bet.
        if spoil and self.generated > 1 and not self.activity.has_pending_win:
            return self._append_malformed()
        return self._append_draft(self.activity.next(), numeric_amount=numeric)

    def _append_malformed(self) -> StoredTx:
        kind = KINDS[self.malformed % len(KINDS)]
        self.malformed += 1
        seq, tx_id, created_at = self._next_id()
        item = malformed_item(kind, self._wire, tx_id, created_at)
        return self._append(StoredTx(self.agent_id, seq, item.id, item.type, kind, item.parts, "casino"))

    def bet(
        self, game: str, amount: Decimal, asset: str, bet_id: str
    ) -> tuple[StoredTx, StoredTx | None, Decimal]:
        """Bet now; raises :class:`InsufficientFunds`, appending nothing, if unaffordable. The
        casino feed reports the bet (and its win) carrying ``bet_id``."""
        self.wallet.debit(asset, amount)
        fields: tuple[tuple[str, str | Decimal], ...] = (("game", game), ("bet_id", bet_id))
        bet_tx = self._append_draft(Draft("bet", amount, asset, fields))
        if self._commands.random() >= WIN_PROBABILITY:
            return bet_tx, None, Decimal(0)
        payout = MONEY_CONTEXT.multiply(amount, WIN_MULTIPLIER)
        self.wallet.credit(asset, payout)
        return bet_tx, self._append_draft(Draft("win", payout, asset, fields)), payout

    def faucet(self) -> StoredTx:
        """A claim: the faucet feed reports it under the tx_id ``POST /claim`` answers."""
        self.claims += 1
        self.wallet.credit("PFLEA", FAUCET_AMOUNT)
        return self._append_draft(Draft("faucet", FAUCET_AMOUNT, "PFLEA", ()))

    def page(self, feed: str, since: str | None, limit: int, overlap: int = 0) -> list[StoredTx]:
        """Items of ``feed`` strictly after ``since`` (None: from the oldest kept), oldest first;
        ``overlap`` > 0 repeats that many items before it (a fault), always leaving room for at
        least one new item. Raises :class:`UnknownSince` if ``since`` is not in the window."""
        window = self._feeds[feed]
        position = None
        if since is not None:
            position = window.position(since)
            if position is None:
                raise UnknownSince(self.agent_id, since, feed)
        return window.after(position, limit, min(overlap, limit - 1))

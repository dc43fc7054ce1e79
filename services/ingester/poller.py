"""One polling loop per agent: fetch pages until caught up, publish, quarantine, repeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from nats.js import JetStreamContext
from prometheus_client import Counter

from services.ingester.backpressure import INCIDENT, Backpressure, no_room
from services.ingester.backpressure import wait_s as backpressure_wait_s
from services.ingester.client import AuthFailed, CursorRejected, FeedClient, RateLimited, Transient
from services.ingester.recent import RecentIds
from shared.envelope import TxEnvelope
from shared.faults import crash_point
from shared.jetstream import NATS_ERRORS, StreamSettings, Topology, ensure_streams, publish_acked
from shared.ops import Lifecycle
from shared.quarantine import Quarantine
from shared.settings import CASINO_FEED, AgentCredential, Settings
from shared.transactions import Rejected, parse_transaction
from shared.wire import HDR_MSG_ID, tx_messages

log = logging.getLogger(__name__)

# Labels stay bounded: feeds are few, agents may be 50,000 (a series each would be too many).
# Logged (once per incident) when the feed refused our cursor: what it pruned unread is gone.
CURSOR_RESET = "the feed no longer knows this cursor"
RECEIVED = Counter("pflea_ingester_transactions_received_total", "Transactions fetched", ["feed"])
PUBLISHED = Counter("pflea_ingester_transactions_published_total", "Transactions published to PFLEA_TX")
FEED_ERRORS = Counter("pflea_ingester_feed_errors_total", "Failed polls", ["kind"])
CURSOR_RESETS = Counter(
    "pflea_ingester_cursor_resets_total", "Feeds read again from the start because the cursor was refused"
)

MAX_BACKOFF_S = 30.0
AUTH_RETRY_S = 60.0
# How far back a feed's rate of new items is averaged (an exponential window): long enough that
# a quiet feed's odd burst does not make it "busy", short enough to follow an agent that wakes.
RATE_WINDOW_S = 60.0


def fair_interval(rate: float, base_s: float, max_s: float) -> float:
    """Seconds until the next poll of a feed bringing ``rate`` new items a second.

    ``base_s`` for a feed with at least an item per ``base_s``; quieter ones wait longer as
    1/sqrt(rate), up to ``max_s``. The square-root rule: with a number of polls a second to
    share (the ingester's CPU, the source's rate limit), polling each feed in proportion to
    the square root of its rate makes the items of all feeds wait least, on average. The poll
    schedule keeps these proportions when its workers are saturated (:mod:`.schedule`).
    """
    items = rate * base_s  # new items one poll interval brings
    if items >= 1.0:
        return base_s
    return min(base_s / math.sqrt(items), max_s) if items > 0 else max_s


async def committed_cursor(pool: asyncpg.Pool, agent_id: str, feed: str = CASINO_FEED) -> str | None:
    """The newest transaction id of ``feed`` Postgres has committed for ``agent_id``.

    The resume point is what the database holds, never what NATS acknowledged: anything
    published but not yet written is polled again and deduplicated by its event id.
    Transactions the writer recorded from a command's own call to Purple Flea (PlaceBet,
    ClaimFaucet) say nothing about how far the feed was read (they may be ahead of it), so
    they are not a resume point; the poll reaches them later and finds them stored. Events
    ingested before feeds had names carry no ``feed``: they came from the casino's.
    """
    return (await committed_cursors(pool, [agent_id], [feed])).get((agent_id, feed))


async def committed_cursors(
    pool: asyncpg.Pool, agent_ids: Sequence[str], feeds: Sequence[str]
) -> dict[tuple[str, str], str]:
    """:func:`committed_cursor` of every (agent, feed) pair in one round trip (a slot's agents
    when the slot is taken); pairs with nothing committed are left out."""
    rows = await pool.fetch(
        """SELECT a.agent_id, f.feed,
                  (SELECT data->>'tx_id' FROM events
                   WHERE stream_id = a.agent_id AND data ? 'tx_id' AND NOT metadata ? 'command_id'
                     AND coalesce(metadata->>'feed', $3) = f.feed
                   ORDER BY version DESC LIMIT 1) AS tx_id
           FROM unnest($1::text[]) AS a(agent_id) CROSS JOIN unnest($2::text[]) AS f(feed)""",
        list(agent_ids),
        list(feeds),
        CASINO_FEED,
    )
    return {(r["agent_id"], r["feed"]): str(r["tx_id"]) for r in rows if r["tx_id"] is not None}


class AgentPoller:
    backpressure: Backpressure = INCIDENT  # a full PFLEA_TX: one incident for all pollers
    # One per (agent, feed) of the held slots: 120,000 with 20,000 agents on 6 feeds, so no
    # __dict__ and nothing per poller that is not needed (an asyncio.Event was 760 bytes).
    __slots__ = (
        "agent",
        "feed",
        "js",
        "pool",
        "quarantine",
        "topology",
        "settings",
        "lifecycle",
        "gate",
        "may_publish",
        "since",
        "cursor_known",
        "recent",
        "backoff",
        "idle_polls",
        "rate",
        "polled_at",
        "resets_in_a_row",
        "reconnects",
        "seen_reconnects",
        "__dict__",  # subclasses in tests add attributes
    )

    def __init__(
        self,
        agent: AgentCredential,
        *,
        feed: FeedClient,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        quarantine: Quarantine,
        topology: Topology,
        settings: Settings,
        lifecycle: Lifecycle,
        gate: asyncio.Semaphore,
        reconnects: Callable[[], int] = lambda: 0,
        recent: RecentIds | None = None,
        may_publish: Callable[[], bool] = lambda: True,
    ) -> None:
        self.agent = agent
        self.feed = feed
        self.js = js
        self.pool = pool
        self.quarantine = quarantine
        self.topology = topology
        self.settings = settings
        self.lifecycle = lifecycle
        self.gate = gate
        self.may_publish = may_publish
        self.since: str | None = None
        self.cursor_known = False  # since is what Postgres committed (or read on from it)
        # Shared by every poller of the service (one budget); a poller of its own in tests.
        if recent is None:
            recent = RecentIds(settings.ingest_page_limit, settings.ingest_recent_ids)
        self.recent = recent.window((feed.name, agent.agent_id))
        self.backoff = 0.5
        self.idle_polls = 0  # polls in a row that brought nothing new
        self.rate = 1.0 / settings.ingest_poll_interval_s  # new items/s, averaged; busy until seen
        self.polled_at: float | None = None  # when the last successful poll started (loop time)
        self.resets_in_a_row = 0  # cursor refusals since a poll with a cursor last succeeded
        self.reconnects = reconnects
        self.seen_reconnects = reconnects()

    async def run(self) -> None:
        """Poll this agent's feed until the service stops (a loop of its own: tests)."""
        while not self.lifecycle.stopping.is_set():
            delay = await self.step()
            if delay and await self.lifecycle.sleep(delay):
                return

    async def step(self) -> float:
        """One turn: read the committed cursor first if not yet known, else poll a page; how
        long until the next turn. Failures are retried with back-off, never raised: a Postgres
        restart or a bug must not end this agent's polling."""
        if not self.cursor_known:
            try:
                self.since = await committed_cursor(self.pool, self.agent.agent_id, self.feed.name)
            except (asyncpg.PostgresError, OSError) as exc:
                return self._next_backoff(f"reading the cursor: {exc!r}")
            self.cursor_known = True
            log.debug(
                "polling", extra={"agent": self.agent.agent_id, "feed": self.feed.name, "since": self.since}
            )
        try:
            await self._resync_after_nats_restart()
            return await self.poll_once()
        except (asyncpg.PostgresError, OSError) as exc:
            # Quarantine writes need Postgres; the cursor has not moved, so just retry.
            return self._next_backoff(f"database: {exc!r}")
        except Exception as exc:
            if self.lifecycle.stopping.is_set():
                return 0.0  # e.g. a publish given up because we are stopping
            # A bug must not end this agent's polling silently: say so loudly and retry from
            # the same cursor.
            log.exception("poll crashed", extra={"agent": self.agent.agent_id})
            return self._next_backoff(f"unexpected {exc!r}")

    def resume_from(self, since: str | None) -> None:
        """Start from ``since``, the committed cursor read for the whole slot at once."""
        self.since = since
        self.cursor_known = True

    def forget(self) -> None:
        """Another replica polls this agent now: drop the cursor and the recent ids, so that a
        return of the slot starts again from what Postgres committed."""
        self.cursor_known = False
        self.since = None
        self.recent.clear()

    async def _resync_after_nats_restart(self) -> None:
        """After a NATS reconnect, poll again from what Postgres committed.

        The server may have come back without its newest PFLEA_TX messages (they are fsynced
        on an interval, or its store is gone); they were never written, so they must be fetched
        from the source again. Re-polling what did survive costs only duplicates that the
        database's unique event ids absorb.
        """
        if self.reconnects() == self.seen_reconnects:
            return
        await ensure_streams(
            self.js, self.topology, self.settings.duplicate_window_s, StreamSettings.of(self.settings)
        )
        self.seen_reconnects = self.reconnects()
        self.since = await committed_cursor(self.pool, self.agent.agent_id, self.feed.name)
        self.recent.clear()
        log.info(
            "NATS reconnected: polling again from the committed cursor",
            extra={"agent": self.agent.agent_id, "since": self.since},
        )

    async def poll_once(self) -> float:
        """Fetch and handle one page; return how long to wait before the next poll."""
        agent_id = self.agent.agent_id
        limit = self.settings.ingest_page_limit
        started = asyncio.get_running_loop().time()
        try:
            async with self.gate:
                page = await self.feed.fetch(self.agent, self.since, limit)
        except RateLimited as exc:
            FEED_ERRORS.labels("rate_limited").inc()
            return exc.retry_after + random.uniform(0, 0.1)
        except AuthFailed as exc:
            FEED_ERRORS.labels("auth").inc()
            log.error("%s; retrying in %ss, other agents go on", exc, AUTH_RETRY_S, extra={"agent": agent_id})
            return AUTH_RETRY_S
        except Transient as exc:
            FEED_ERRORS.labels(exc.kind).inc()
            return self._next_backoff(str(exc))
        except CursorRejected as exc:
            return self._read_again_from_the_start(exc)
        self.backoff = 0.5
        if self.since is not None:
            self.resets_in_a_row = 0
        RECEIVED.labels(self.feed.name).inc(len(page.items))
        if not self.may_publish():
            return 0.0  # the slot's lease is gone: the schedule drops this poller
        new = await self.handle(page.items, page.plain)
        self._count(new, started)
        if len(page.items) < limit:
            return self._next_interval(new)
        return 0.0

    def _count(self, new: int, started: float) -> None:
        """Fold a poll's ``new`` items into the feed's rate (over the time since the last poll)."""
        if self.polled_at is not None and (elapsed := started - self.polled_at) > 0:
            weight = 1.0 - math.exp(-elapsed / RATE_WINDOW_S)
            self.rate += weight * (new / elapsed - self.rate)
        self.polled_at = started

    def _next_interval(self, new: int) -> float:
        """When to poll a caught-up feed again: by its rate (:func:`fair_interval`), and one
        that keeps bringing nothing new less and less often (doubling up to
        PFLEA_INGEST_IDLE_POLL_MAX_S): with a thousand agents, polls of idle ones were most of
        the ingester's CPU."""
        base = self.settings.ingest_poll_interval_s
        ceiling = max(base, self.settings.ingest_idle_poll_max_s)
        fair = fair_interval(self.rate, base, ceiling)
        self.idle_polls = 0 if new else min(self.idle_polls + 1, 16)
        if not self.idle_polls:
            return fair
        return max(fair, min(base * 2 ** (self.idle_polls - 1), ceiling) * random.uniform(0.9, 1.1))

    def _read_again_from_the_start(self, exc: CursorRejected) -> float:
        """The feed refused our cursor (pruned, or the feed was reset): read it from the start.

        Nothing is lost, and nothing doubled: what is stored already has the same event ids,
        which JetStream's duplicate window or else the writer skips. The recent-id cache is
        cleared because the cursor only moves past ids not in it. Logged once per incident; a
        feed that refuses even the cursors it gave after a reset is retried with back-off.

        A pruned cursor means new items came that this poller did not see while the feed still
        kept them, so it polls the feed as a busy one for a while (its rate is raised to an item
        per interval and decays from there over about a minute): with the pollers saturated, a
        quiet feed's longer interval stretched past what the feed keeps, and a second refusal
        in a row was the error below.
        """
        CURSOR_RESETS.inc()
        self.resets_in_a_row += 1
        self.since = None
        self.recent.clear()
        self.rate = max(self.rate, 1.0 / self.settings.ingest_poll_interval_s)
        self.idle_polls = 0
        agent_id = self.agent.agent_id
        if self.resets_in_a_row == 1:
            log.warning(
                "%s: " + CURSOR_RESET + "; reading %s's feed again from the start "
                "(what is stored already is skipped by event id)",
                exc,
                agent_id,
                extra={"agent": agent_id},
            )
            return 0.0
        if self.resets_in_a_row == 2:
            log.error(
                "%s: the feed refuses the cursors it gave after a reset too: it keeps its items "
                "for less time than this ingester takes to poll it again (add ingesters: what it "
                "drops unread is lost), or it does not keep cursors at all; reading from the start "
                "with back-off up to %ss, logged once (pflea_ingester_cursor_resets_total counts)",
                exc,
                MAX_BACKOFF_S,
                extra={"agent": agent_id},
            )
        return min(0.5 * 2 ** (self.resets_in_a_row - 2), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)

    def _next_backoff(self, why: str) -> float:
        delay = self.backoff * random.uniform(0.5, 1.5)  # jitter: pollers don't retry in lockstep
        self.backoff = min(self.backoff * 2, MAX_BACKOFF_S)
        log.warning("poll failed: %s; retrying in %.2fs", why, delay, extra={"agent": self.agent.agent_id})
        return delay

    async def handle(self, items: list[bytes], plain: list[dict[str, Any]] | None = None) -> int:
        """Publish what is new in ``items`` (quarantine what is bad); how many were new.
        ``plain``: the items already decoded (:attr:`Page.plain`)."""
        valid: list[TxEnvelope] = []
        last_new_id: str | None = None
        new = 0
        for i, raw in enumerate(items):
            try:
                envelope = parse_transaction(
                    raw, self.agent.agent_id, self.feed.name, None if plain is None else plain[i]
                )
            except Rejected as exc:
                key = None if exc.tx_id is None else f"{self.feed.name}:{exc.tx_id}"
                await self.quarantine.put(raw, exc.reason, agent_id=self.agent.agent_id, key=key)
                if exc.tx_id is not None and exc.tx_id not in self.recent:
                    last_new_id = exc.tx_id
                    self._remember(exc.tx_id)
                    new += 1
                continue
            if envelope.tx_id in self.recent:
                continue  # an overlapping or repeated page
            valid.append(envelope)
            last_new_id = envelope.tx_id
        await self.publish(valid)
        for envelope in valid:
            self._remember(envelope.tx_id)
        if last_new_id is not None:
            self.since = last_new_id
        return new + len(valid)

    def _remember(self, tx_id: str) -> None:
        self.recent.add(tx_id)

    async def publish(self, envelopes: list[TxEnvelope]) -> None:
        """Publish in feed order, each message acked before the next; retry until JetStream
        has them all. A full PFLEA_TX is waited out (:mod:`.backpressure`): the page is held,
        the cursor does not move, nothing is skipped."""
        if not envelopes:
            return
        messages = [
            (self.topology.tx_subject(m.agent_id), m.payload, {HDR_MSG_ID: m.msg_id})
            for m in tx_messages(envelopes)
        ]
        acked = attempt = refusals = 0  # acked: messages of this page JetStream has
        while True:
            try:
                for subject, payload, headers in messages[acked:]:
                    await publish_acked(self.js, subject, payload, headers, timeout=10)
                    acked += 1
                self.backpressure.accepted(self, self.topology.tx_stream)
                PUBLISHED.inc(len(envelopes))
                crash_point("ingester.after_publish")  # in PFLEA_TX, maybe nothing committed yet
                return
            except NATS_ERRORS as exc:  # the cursor has not moved, so retry
                if reason := no_room(exc):
                    refusals += 1
                    self.backpressure.refused(self, reason, self.topology.tx_stream)
                    delay = backpressure_wait_s(refusals)
                else:
                    attempt += 1
                    delay = min(0.2 * 2**attempt, 5.0)
                    log.warning(
                        "publish failed (%r); retry %d in %.1fs",
                        exc,
                        attempt,
                        delay,
                        extra={"agent": self.agent.agent_id},
                    )
                if await self.lifecycle.sleep(delay):
                    raise
                if self.reconnects() != self.seen_reconnects:
                    # The server may have come back without the streams, or without what it
                    # acked: declare them again and publish the whole page again.
                    acked = 0
                    with contextlib.suppress(*NATS_ERRORS):
                        await ensure_streams(
                            self.js,
                            self.topology,
                            self.settings.duplicate_window_s,
                            StreamSettings.of(self.settings),
                        )

"""The agents of each slot, polled while this replica holds the slot's lease.

Agents hash to ``PFLEA_INGEST_SLOTS`` slots (:func:`shared.partitions.partition`); replicas lease
slots in the bucket ``<NAMESPACE>_INGEST`` (:mod:`shared.membership`). Taking a slot schedules
its agents' pollers, one per feed; losing or giving it up takes them out of the schedule before
the lease goes, so one agent is polled by one replica at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import asyncpg
from prometheus_client import Counter

from services.ingester.client import FeedClient
from services.ingester.poller import AgentPoller, committed_cursors
from services.ingester.schedule import PollSchedule
from shared.partitions import partition
from shared.settings import AgentCredential

log = logging.getLogger(__name__)

OVERLAPS = Counter(
    "pflea_ingester_overlapping_polls_total",
    "Polls of a slot this replica found leased to another replica (both may have polled its agents)",
)

MakePoller = Callable[[AgentCredential, FeedClient, int], AgentPoller]
CURSORS_TIMEOUT_S = 30.0


class AgentShards:
    """A :class:`shared.membership.SlotOwner`: starts and stops the pollers of a slot's agents."""

    def __init__(
        self,
        agents: Sequence[AgentCredential],
        feeds: Sequence[FeedClient],
        slots: int,
        schedule: PollSchedule,
        make_poller: MakePoller,
        *,
        spread_s: float = 1.0,
        pool: asyncpg.Pool | None = None,
    ) -> None:
        self.pool = pool
        self.feeds = list(feeds)
        self.schedule = schedule
        self.make_poller = make_poller
        self.spread_s = spread_s
        self.agents: dict[int, list[AgentCredential]] = defaultdict(list)
        for agent in agents:
            self.agents[partition(agent.agent_id, slots)].append(agent)

    async def slot_started(self, slot: int) -> None:
        agents = self.agents.get(slot, [])
        pollers = [self.make_poller(agent, feed, slot) for agent in agents for feed in self.feeds]
        await self._resume(slot, agents, pollers)
        self.schedule.add(slot, pollers, self.spread_s)
        log.info("polling slot %d: %d agents", slot, len(agents), extra={"slot": slot})

    async def _resume(self, slot: int, agents: list[AgentCredential], pollers: list[AgentPoller]) -> None:
        """Read the slot's cursors in one query; if Postgres does not answer, each poller reads
        its own on its first turn (with back-off), as before."""
        if self.pool is None or not pollers:
            return
        try:
            async with asyncio.timeout(CURSORS_TIMEOUT_S):
                cursors = await committed_cursors(
                    self.pool, [a.agent_id for a in agents], [f.name for f in self.feeds]
                )
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            log.warning("slot %d: cursors not read at once (%r); each poller reads its own", slot, exc)
            return
        for poller in pollers:
            poller.resume_from(cursors.get((poller.agent.agent_id, poller.feed.name)))

    async def slot_stopped(self, slot: int) -> None:
        await self.schedule.stop_slot(slot)
        log.info("stopped polling slot %d", slot, extra={"slot": slot})

    def overlap(self, slot: int) -> None:
        OVERLAPS.inc()
        log.error(
            "slot %d is leased to another replica while we held it: both may have polled its agents",
            slot,
            extra={"slot": slot},
        )

"""The agents of each slot, polled while this replica holds the slot's lease.

Agents hash to ``PFLEA_INGEST_SLOTS`` slots (:func:`shared.partitions.partition`); replicas lease
slots in the bucket ``<NAMESPACE>_INGEST`` (:mod:`shared.membership`). Taking a slot schedules
its agents' pollers, one per feed; losing or giving it up takes them out of the schedule before
the lease goes, so one agent is polled by one replica at a time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from prometheus_client import Counter

from services.ingester.client import FeedClient
from services.ingester.schedule import Pollable, PollSchedule
from shared.partitions import partition
from shared.settings import AgentCredential

log = logging.getLogger(__name__)

OVERLAPS = Counter(
    "pflea_ingester_overlapping_polls_total",
    "Polls of a slot this replica found leased to another replica (both may have polled its agents)",
)

MakePoller = Callable[[AgentCredential, FeedClient, int], Pollable]


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
    ) -> None:
        self.feeds = list(feeds)
        self.schedule = schedule
        self.make_poller = make_poller
        self.spread_s = spread_s
        self.agents: dict[int, list[AgentCredential]] = defaultdict(list)
        for agent in agents:
            self.agents[partition(agent.agent_id, slots)].append(agent)

    async def slot_started(self, slot: int) -> None:
        pollers = [
            self.make_poller(agent, feed, slot) for agent in self.agents.get(slot, ()) for feed in self.feeds
        ]
        self.schedule.add(slot, pollers, self.spread_s)
        log.info("polling slot %d: %d agents", slot, len(self.agents.get(slot, ())), extra={"slot": slot})

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

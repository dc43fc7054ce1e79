"""When each (agent, feed) is polled next: a heap of due times and a bounded set of workers.

A task per (agent, feed) costs a coroutine, its frame and a timer each, polling or not: with
20,000 agents on 6 feeds that is 120,000 tasks, nearly all asleep. Here a poller is a plain
object in a heap ordered by when it is due; ``PFLEA_INGEST_CONCURRENCY`` workers take the
most overdue one, run one turn of it (:meth:`Pollable.step`) and put it back at the time the
turn asked for. Memory follows the pollers of the slots this replica holds; CPU, the polls made.

Due times are kept on the schedule's own clock (:meth:`PollSchedule.clock`): real time while
the workers keep up, the due time of the most overdue poller when they do not. A turn that asks
for ``d`` seconds is due ``d`` after that clock, so when the workers are saturated pollers still
come round in proportion to 1 / ``d`` (a busy feed that asks for 1 s is polled four times as
often as a quiet one that asks for 4 s); on real time every poller would wait the same queue
and the delays would hardly count. No poller is polled before its ``d`` has passed in real time.

Pollers come and go by slot (:mod:`shared.membership`): :meth:`PollSchedule.stop_slot` takes a
slot's pollers out and returns once none of their turns runs any more, so the lease can be given
up without two replicas ever polling one agent at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import Gauge

from shared.ops import Lifecycle

log = logging.getLogger(__name__)

POLLERS = Gauge("pflea_ingester_pollers", "(agent, feed) pairs this replica polls")
POLL_LAG = Gauge(
    "pflea_ingester_poll_lag_seconds",
    "How much later than it asked the last poll started (the workers keep up when ~0)",
)


class Pollable(Protocol):
    async def step(self) -> float:
        """One turn; seconds until the next."""

    def forget(self) -> None:
        """Its slot moved away: drop what it keeps (cursor, recent ids)."""


@dataclass(eq=False, slots=True)
class _Entry:
    poller: Pollable
    slot: int
    active: bool = True
    ready: float = 0.0  # real time before which it is not polled: its last turn's delay


@dataclass
class _Slot:
    entries: list[_Entry] = field(default_factory=list)
    running: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class PollSchedule:
    """Pollers by due time, run by ``workers`` tasks until the service stops.

    ``may_poll(slot)`` is asked before every turn (the slot's lease is still ours); a poller of
    a slot no longer held is dropped on the spot (the membership stops the rest of the slot).
    """

    def __init__(self, workers: int, lifecycle: Lifecycle, may_poll: Callable[[int], bool] = lambda _: True):
        self.workers = workers
        self.lifecycle = lifecycle
        self.may_poll = may_poll
        self._heap: list[tuple[float, int, _Entry]] = []
        self._order = itertools.count()  # ties in due time: first in, first out
        self._slots: dict[int, _Slot] = {}
        self._wakeup = asyncio.Event()
        self.polls = 0  # turns run, for the tests and the bench

    def __len__(self) -> int:
        return sum(len(s.entries) for s in self._slots.values())

    def add(self, slot: int, pollers: Sequence[Pollable], spread_s: float = 0.0) -> None:
        """Schedule ``pollers`` of ``slot``, due now or spread over ``spread_s`` seconds."""
        now = asyncio.get_running_loop().time()
        state = self._slots.setdefault(slot, _Slot())
        if not state.running:
            state.idle.set()
        for poller in pollers:
            entry = _Entry(poller, slot, ready=now)
            state.entries.append(entry)
            self._push(random.uniform(0, spread_s), entry)
        POLLERS.inc(len(pollers))

    async def stop_slot(self, slot: int) -> None:
        """Take ``slot``'s pollers out; return once none of their turns is running."""
        state = self._slots.pop(slot, None)
        if state is None:
            return
        for entry in state.entries:
            entry.active = False  # left in the heap, skipped when it comes up
        POLLERS.dec(len(state.entries))
        await state.idle.wait()
        for entry in state.entries:
            entry.poller.forget()
        if len(self._heap) > 2 * len(self) + 1024:  # drop what stopped slots left behind
            self._heap = [item for item in self._heap if item[2].active]
            heapq.heapify(self._heap)

    def slots(self) -> list[int]:
        return sorted(self._slots)

    async def run(self) -> None:
        """The workers, until the service stops (each finishes its turn)."""
        await asyncio.gather(*(self._work() for _ in range(self.workers)))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while (entry := await self._next_due()) is not None:
            state = self._slots.get(entry.slot)
            if state is None or not entry.active:
                continue
            if not self.may_poll(entry.slot):
                entry.active = False  # the lease is gone; its owner is told and stops the slot
                continue
            state.running += 1
            state.idle.clear()
            try:
                delay = await entry.poller.step()
            finally:
                state.running -= 1
                if not state.running:
                    state.idle.set()
            self.polls += 1
            if entry.active and not self.lifecycle.stopping.is_set():
                entry.ready = loop.time() + delay
                self._push(delay, entry)

    def clock(self) -> float:
        """Now on the schedule's clock: real time when no poller is overdue, else the due time
        of the most overdue one (how far the workers have come)."""
        now = asyncio.get_running_loop().time()
        while self._heap and not self._heap[0][2].active:
            heapq.heappop(self._heap)
        return min(now, self._heap[0][0]) if self._heap else now

    def _push(self, delay: float, entry: _Entry) -> None:
        due = self.clock() + delay
        # Waiting workers sleep until the earliest due time: wake them only if this is earlier.
        if not self._heap or due < self._heap[0][0]:
            self._wakeup.set()
        heapq.heappush(self._heap, (due, next(self._order), entry))

    async def _next_due(self) -> _Entry | None:
        loop = asyncio.get_running_loop()
        stopping = self.lifecycle.stopping
        while not stopping.is_set():
            wait: float | None = None
            while self._heap:
                due, _, entry = self._heap[0]
                if not entry.active:
                    heapq.heappop(self._heap)
                    continue
                now = loop.time()
                wait = due - now
                if wait <= 0:
                    heapq.heappop(self._heap)
                    if now < entry.ready:  # the clock ran ahead of real time (load just fell)
                        self._push(entry.ready - now, entry)
                        continue
                    POLL_LAG.set(now - entry.ready)
                    return entry
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await _first(self._wakeup, stopping)
        return None


async def _first(*events: asyncio.Event) -> None:
    """Until any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()

"""The poll schedule (services/ingester/schedule.py): due order, bounded workers, slots that
stop only once their running turn has ended."""

from __future__ import annotations

import asyncio
import statistics

from devstack.processes import wait_until
from services.ingester.schedule import PollSchedule
from shared.ops import Lifecycle


class Turns:
    """A poller that records its turns; ``hold`` keeps a turn running until released."""

    running = 0
    most = 0

    def __init__(self, name: str, log: list[str], delay: float = 0.01) -> None:
        self.name = name
        self.log = log
        self.delay = delay
        self.hold: asyncio.Event | None = None
        self.forgotten = False

    async def step(self) -> float:
        Turns.running += 1
        Turns.most = max(Turns.most, Turns.running)
        try:
            self.log.append(self.name)
            if self.hold is not None:
                await self.hold.wait()
            else:
                await asyncio.sleep(0.002)
        finally:
            Turns.running -= 1
        return self.delay

    def forget(self) -> None:
        self.forgotten = True


async def test_no_more_turns_run_at_once_than_there_are_workers_and_every_poller_gets_turns() -> None:
    lifecycle, log = Lifecycle(), []
    schedule = PollSchedule(3, lifecycle)
    Turns.running = Turns.most = 0
    pollers = [Turns(f"p{i}", log) for i in range(40)]
    schedule.add(0, pollers[:20])
    schedule.add(1, pollers[20:])
    task = asyncio.create_task(schedule.run())
    await wait_until(lambda: all(log.count(p.name) >= 3 for p in pollers), 10, "three turns each")
    lifecycle.stop()
    await task
    assert Turns.most == 3
    assert len(schedule) == 40


async def test_stopping_a_slot_waits_for_its_running_turn_and_its_pollers_never_run_again() -> None:
    lifecycle, log = Lifecycle(), []
    schedule = PollSchedule(4, lifecycle)
    slow, other = Turns("slow", log), Turns("other", log)
    slow.hold = asyncio.Event()
    schedule.add(7, [slow])
    schedule.add(8, [other])
    task = asyncio.create_task(schedule.run())
    await wait_until(lambda: "slow" in log and "other" in log, 5, "both polled")
    stopping = asyncio.create_task(schedule.stop_slot(7))
    await asyncio.sleep(0.1)
    assert not stopping.done(), "the slot's turn is still running"
    slow.hold.set()
    await asyncio.wait_for(stopping, 5)
    assert slow.forgotten and not other.forgotten
    turns = log.count("slow")
    await wait_until(lambda: log.count("other") > 10, 5, "the other slot going on")
    assert log.count("slow") == turns
    assert schedule.slots() == [8]
    lifecycle.stop()
    await task


async def test_a_slot_whose_lease_is_not_held_is_not_polled() -> None:
    lifecycle, log = Lifecycle(), []
    held = {1}
    schedule = PollSchedule(2, lifecycle, may_poll=lambda slot: slot in held)
    schedule.add(1, [Turns("mine", log)])
    schedule.add(2, [Turns("theirs", log)])
    task = asyncio.create_task(schedule.run())
    await wait_until(lambda: log.count("mine") > 5, 5, "the held slot polled")
    lifecycle.stop()
    await task
    assert "theirs" not in log


class Timed(Turns):
    """A poller whose turns take ``busy`` seconds, recording when each started and ended."""

    def __init__(self, name: str, delay: float, busy: float) -> None:
        super().__init__(name, [], delay)
        self.busy = busy
        self.turns: list[tuple[float, float]] = []

    async def step(self) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(self.busy)
        self.turns.append((start, loop.time()))
        return self.delay


async def test_saturated_workers_still_poll_each_poller_in_proportion_to_the_delay_it_asks() -> None:
    # One worker, turns of 5 ms (at most ~200 a second), 40 pollers asking for ~500 a second:
    # on real time every poller would wait the same queue and the delays would hardly count.
    lifecycle = Lifecycle()
    schedule = PollSchedule(1, lifecycle)
    busy = [Timed(f"busy{i}", delay=0.05, busy=0.005) for i in range(20)]
    quiet = [Timed(f"quiet{i}", delay=0.2, busy=0.005) for i in range(20)]
    schedule.add(0, busy + quiet)
    task = asyncio.create_task(schedule.run())
    await wait_until(lambda: all(len(p.turns) >= 5 for p in quiet), 30, "five turns of every quiet poller")
    lifecycle.stop()
    await task

    def gap(pollers: list[Timed]) -> float:
        """Mean time between a poller's turns, after the first two (all started at once)."""
        gaps = [b[0] - a[0] for p in pollers for a, b in zip(p.turns[2:], p.turns[3:], strict=False)]
        return statistics.mean(gaps)

    ratio = gap(quiet) / gap(busy)
    assert 3.0 <= ratio <= 5.0, f"busy pollers came round {ratio:.2f}x as often as quiet ones, not ~4x"
    for poller in busy + quiet:  # and none came round before the delay it asked had passed
        for (_, ended), (started, _) in zip(poller.turns, poller.turns[1:], strict=False):
            assert started - ended >= poller.delay, poller.name

"""The poll schedule (services/ingester/schedule.py): due order, bounded workers, slots that
stop only once their running turn has ended."""

from __future__ import annotations

import asyncio

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

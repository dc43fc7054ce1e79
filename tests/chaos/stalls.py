"""How long each stage of a running pipeline stood still while work was waiting for it.

Every ``interval_s`` the watcher reads each stage's own progress counter from its ``/metrics``
(never through NATS, which is what the faults take away) and its upstream's: the source's
transactions for the ingester, what the ingester published for the writer, what the writer
committed for the relay, what the relay published for each projector. A stage is waiting when
its upstream has moved since the stage last did; its stall is the time since a sample first saw
that (to within ``interval_s``), until the stage moves again.
The worst stall of each stage is a measurement to report, never a tight assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from devstack.processes import ServiceProcess
from tests.chaos.checker import PROJECTIONS

# stage -> (its service, its counter, its upstream stage); None: the source itself.
STAGES: dict[str, tuple[str, str, str | None]] = {
    "ingester": ("ingester", "pflea_ingester_transactions_published_total", None),
    "writer": ("writer", "pflea_writer_events_appended_total", "ingester"),
    "relay": ("relay", "pflea_relay_events_published_total", "writer"),
    **{
        f"projector-{p}": (
            f"projector-{p}",
            f"pflea_projector_events_applied_total{{projection={p}}}",
            "relay",
        )
        for p in PROJECTIONS
    },
}


@dataclass
class StageWatch:
    count: float = 0.0
    moved_at: float = field(default_factory=time.monotonic)
    upstream_then: float = 0.0  # the upstream's count when this stage last moved
    waiting_since: float | None = None  # when its upstream was first seen moved since then
    worst_s: float = 0.0


class StallWatch:
    """Samples the stages of ``procs`` until stopped; :attr:`worst` per stage, in seconds."""

    def __init__(
        self, procs: dict[str, ServiceProcess], source: Callable[[], int], interval_s: float = 0.2
    ) -> None:
        self.procs = procs
        self.source = source
        self.interval_s = interval_s
        self.stages = {name: StageWatch() for name in STAGES}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.worst

    @property
    def worst(self) -> dict[str, float]:
        return {name: round(w.worst_s, 2) for name, w in self.stages.items()}

    def reset(self) -> None:
        """Start measuring afresh from now (e.g. when the faults begin)."""
        now = time.monotonic()
        for w in self.stages.values():
            w.moved_at, w.waiting_since, w.worst_s = now, None, 0.0

    async def _run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def sample(self) -> None:
        metrics = await asyncio.gather(*(p.metrics() for p in self.procs.values()))
        samples = dict(zip(self.procs, metrics, strict=True))
        counts: dict[str | None, float] = {None: float(self.source())}
        for name, (service, counter, _) in STAGES.items():
            counts[name] = samples.get(service, {}).get(counter, self.stages[name].count)
        now = time.monotonic()
        for name, (_, _, upstream) in STAGES.items():
            w = self.stages[name]
            if counts[name] > w.count:
                w.count, w.moved_at, w.upstream_then = counts[name], now, counts[upstream]
                w.waiting_since = None
            elif counts[upstream] > w.upstream_then:
                # Idle until work came is no stall: count from the sample that first saw it.
                w.waiting_since = w.waiting_since or now
                w.worst_s = max(w.worst_s, now - max(w.moved_at, w.waiting_since))

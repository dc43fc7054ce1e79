"""Run the services as child processes: restart the ones that crash, stop all on request."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from devstack.processes import DeadlineExceeded, ServiceProcess

log = logging.getLogger(__name__)

MAX_RESTARTS_PER_MINUTE = 5


class GaveUp(RuntimeError):
    pass


class Supervisor:
    def __init__(self) -> None:
        self.children: list[ServiceProcess] = []
        self.crashes: dict[str, list[float]] = {}
        self.stopping = False

    def start(self, child: ServiceProcess) -> None:
        self.children.append(child)
        child.start()
        log.info("started %s", child.name)

    async def watch(self) -> None:
        """Restart children that exit while we are not stopping; give up on a crash loop."""
        while not self.stopping:
            for child in self.children:
                if child.returncode is not None and not self.stopping:
                    await self._restart(child)
            await asyncio.sleep(0.5)

    async def _restart(self, child: ServiceProcess) -> None:
        now = time.monotonic()
        crashes = self.crashes[child.name] = [t for t in self.crashes.get(child.name, []) if now - t < 60]
        crashes.append(now)
        if len(crashes) > MAX_RESTARTS_PER_MINUTE:
            raise GaveUp(f"{child.name} exited {len(crashes)} times in a minute; see {child.log_path}")
        print(
            f"\n{child.name} exited with {child.returncode}; restarting (log: {child.log_path})", flush=True
        )
        await asyncio.sleep(min(0.5 * len(crashes), 5))
        child.start()

    async def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every child (each drains and acks its in-flight batch), then wait."""
        self.stopping = True
        for child in self.children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for child in self.children:
            try:
                codes[child.name] = await child.wait_exit(max(0.1, deadline - time.monotonic()))
            except DeadlineExceeded:
                child.kill()
                codes[child.name] = child.returncode
        return codes

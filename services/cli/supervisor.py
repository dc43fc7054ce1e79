"""Run the services as child processes: restart the ones that crash, stop all on request."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.embedded import die_with_parent

log = logging.getLogger(__name__)

MAX_RESTARTS_PER_MINUTE = 5


class GaveUp(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    crashes: list[float] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                *self.args,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop the children in order
                preexec_fn=die_with_parent,
            )


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stopping = False

    def add(self, child: Child) -> None:
        self.children.append(child)

    async def start(self, child: Child) -> None:
        await child.start()
        log.info("started %s", child.name)

    async def watch(self) -> None:
        """Restart children that exit while we are not stopping; give up on a crash loop."""
        while not self.stopping:
            for child in self.children:
                if child.proc is not None and child.proc.returncode is not None and not self.stopping:
                    await self._restart(child)
            await asyncio.sleep(0.5)

    async def _restart(self, child: Child) -> None:
        now = time.monotonic()
        child.crashes = [t for t in child.crashes if now - t < 60] + [now]
        code = child.proc.returncode if child.proc else None
        if len(child.crashes) > MAX_RESTARTS_PER_MINUTE:
            raise GaveUp(f"{child.name} exited {len(child.crashes)} times in a minute; see {child.log_path}")
        print(f"\n{child.name} exited with {code}; restarting (log: {child.log_path})", flush=True)
        await asyncio.sleep(min(0.5 * len(child.crashes), 5))
        await child.start()

    async def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every child (each drains and acks its in-flight batch), then wait."""
        self.stopping = True
        for child in self.children:
            if child.running:
                assert child.proc is not None
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for child in self.children:
            if child.proc is None:
                continue
            try:
                codes[child.name] = await asyncio.wait_for(
                    child.proc.wait(), max(0.1, deadline - time.monotonic())
                )
            except TimeoutError:
                child.proc.kill()
                codes[child.name] = await child.proc.wait()
        return codes

"""Services as real processes (devstack's, with py-spy attached on request), their memory, their CPU."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from devstack.processes import ServiceProcess


class BenchError(RuntimeError):
    pass


class ProfiledProcess(ServiceProcess):
    """A service process sampled by py-spy while it runs, when ``profile_dir`` is set."""

    def __init__(self, *args: Any, profile_dir: Path | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.profile_dir = profile_dir
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> ProfiledProcess:
        super().start(**extra_env)
        if self.profile_dir is not None:
            self.spy = attach_py_spy(self.pid, self.profile_dir / f"{self.name}.collapsed.txt")
        return self

    async def wait_ready(self, timeout: float = 60.0, interval: float = 0.02) -> float:
        return await super().wait_ready(timeout, interval)

    def stop(self, timeout: float = 30.0) -> int | None:
        code = super().stop(timeout)
        if self.spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.spy.wait(15)
        return code


def attach_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` until it exits, in collapsed-stack form (speedscope and flamegraph.pl
    read it). Needs ``pip install py-spy``; without it, profiling is skipped with a note."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print(f"  (py-spy not installed: no profile for pid {pid}; pip install py-spy)", file=sys.stderr)
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "50", "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class RssSampler:
    """Peak resident memory of each watched process, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.watched: dict[str, psutil.Process] = {}
        self.peak: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, name: str, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            self.watched[name] = psutil.Process(pid)

    def sample(self) -> None:
        for name, proc in list(self.watched.items()):
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self.peak[name] = max(self.peak.get(name, 0), rss)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()


class ForeignLoad:
    """How much of the machine other processes used while the bench ran: system-wide busy CPU
    minus this process tree's (services, servers, and every child they reaped)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.busy = self._busy()
        self.ours = self._ours()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0))

    @staticmethod
    def _ours() -> float:
        me = psutil.Process()
        total = 0.0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total

    def share(self) -> float:
        """Other processes' CPU as a share of the whole machine over the run (0 to 1)."""
        wall = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        foreign = (self._busy() - self.busy) - (self._ours() - self.ours)
        return max(0.0, foreign / wall) if wall else 0.0


def stop_all(processes: list[ProfiledProcess]) -> None:
    for proc in processes:
        proc.stop()


def cpu_seconds(pid: int, *, tree: bool = False) -> float:
    """User + system CPU seconds of ``pid`` so far (with ``tree``, of its live children too:
    Postgres runs a process per connection); 0.0 if it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if tree else [root]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total

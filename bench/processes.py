"""Services as real processes (``python -m services.<name>``), their memory, and their profiles."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import SERVICE_PASSWORD
from shared.embedded import free_port

REPO = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    pass


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def service_env(database_url: str, nats_url: str, namespace: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.update(
        PFLEA_METRICS_PORT=str(free_port()),
        DATABASE_URL=database_url,
        NATS_URL=nats_url,
        PFLEA_NAMESPACE=namespace,
        PFLEA_DB_SERVICE_PASSWORD=SERVICE_PASSWORD,
        PFLEA_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class ServiceProcess:
    """One service process, its log in ``log_dir``; py-spy attached when ``profile_dir`` is set.

    Its ``/metrics`` listens on ``metrics_port`` (when the environment sets ``PFLEA_METRICS_PORT``)
    so a scenario can read the service's own counters, e.g. time spent per batch.
    """

    def __init__(
        self,
        name: str,
        module: str,
        env: dict[str, str],
        log_dir: Path,
        *args: str,
        ready_marker: bytes = b'"msg":"ready"',
        profile_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.env = env
        self.args = args
        self.ready_marker = ready_marker
        self.log_path = log_dir / f"{name}.log"
        self.profile_dir = profile_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.spy: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if self.profile_dir is not None:
            self.spy = attach_py_spy(self.pid, self.profile_dir / f"{self.name}.collapsed.txt")
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Until the service logs that it is ready; returns ``time.monotonic()`` of that moment."""

        async def ready() -> float | None:
            if not self.alive:
                raise BenchError(f"{self.name} exited:\n{self.log_tail()}")
            if self.ready_marker in self.log_path.read_bytes():
                return time.monotonic()
            return None

        return float(await wait_until(ready, timeout, f"{self.name} ready", interval=0.02))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (the services drain and exit 0); SIGKILL if that takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.spy.wait(15)

    async def metrics(self) -> dict[str, float]:
        """The service's Prometheus samples by name (labels joined in), or {} if unreachable."""
        port = self.env.get("PFLEA_METRICS_PORT")
        if not port or not self.alive:
            return {}
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        except httpx.HTTPError:
            return {}
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
                if "le" not in s.labels:
                    samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return samples

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


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


def stop_all(processes: list[ServiceProcess]) -> None:
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

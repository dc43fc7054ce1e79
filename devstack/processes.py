"""Services as real subprocesses: started with a log file, ready when ``/readyz`` says so.

``pflea up``, the tests, the chaos suite and the benchmark all run ``python -m services.<name>``
through :class:`ServiceProcess`. Every service serves ``/readyz`` on ``PFLEA_METRICS_PORT``
(shared/ops.py); each start gets a free port for it unless the environment names one.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from devstack.pg_identity import die_with_parent
from devstack.ports import free_port
from shared.db import INGESTER_ROLE, PROJECTOR_ROLE, WRITER_ROLE, role_dsn

# Where `python -m services.…` finds this checkout's code first (tests and bench run from it).
SOURCE_ROOT = Path(__file__).resolve().parent.parent


class DeadlineExceeded(AssertionError):
    """A wait ran out of time: to a test, an expectation that did not hold."""


class ServiceExited(AssertionError):
    """A service exited while something waited for it."""


async def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` (a function, or one returning an awaitable) until its result is truthy,
    and return that result; at the deadline raise :class:`DeadlineExceeded` naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise DeadlineExceeded(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# The role each service logs in as (shared/bootstrap.py); other modules (the CLI, the
# simulator) get DATABASE_URL as given.
SERVICE_ROLES = {
    "services.writer": WRITER_ROLE,
    "services.relay": WRITER_ROLE,
    "services.ingester": INGESTER_ROLE,
    "services.projectors": PROJECTOR_ROLE,
}
# Carries the service roles' password from service_env to ServiceProcess.start, never further.
_ROLE_PASSWORD = "DEVSTACK_DB_ROLE_PASSWORD"


def service_env(
    database_url: str, nats_url: str, namespace: str, service_password: str, **extra: str
) -> dict[str, str]:
    """A service's environment for a test or bench run: ours without any ``PFLEA_*`` or
    ``PURPLEFLEA_*`` setting (they would leak into the run), pointed at the given servers.

    ``database_url`` is an administrator's; :meth:`ServiceProcess.start` gives each service its
    own role's URL instead (with ``service_password``), as a deployment does. Those servers have
    no NATS accounts, so no command carries its sender: the writer's check of it is off
    (``PFLEA_COMMAND_AUTH``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.update(
        DATABASE_URL=database_url,
        NATS_URL=nats_url,
        PFLEA_NAMESPACE=namespace,
        PFLEA_LOG_LEVEL="INFO",
        PFLEA_COMMAND_AUTH="off",
        PYTHONUNBUFFERED="1",
    )
    env[_ROLE_PASSWORD] = service_password
    env.update(extra)
    return env


def _as_service(module: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with DATABASE_URL switched to ``module``'s own role (see :func:`service_env`)."""
    env = dict(env)
    password = env.pop(_ROLE_PASSWORD, None)
    role = SERVICE_ROLES.get(module)
    if password is not None and role is not None and env.get("DATABASE_URL"):
        env["DATABASE_URL"] = role_dsn(env["DATABASE_URL"], role, password)
    return env


class ServiceProcess:
    """``python -m <module> <args>``, its output appended to ``<log_dir>/<name>.log``.

    ``ready_url`` replaces the service's ``/readyz`` for a process that has none (the simulator).
    ``detach`` gives the process its own session (a Ctrl-C in the terminal reaches only us, and we
    stop the children in order) and SIGTERM should we die: what ``pflea up`` wants.
    """

    def __init__(
        self,
        module: str,
        env: dict[str, str],
        log_dir: Path,
        *args: str,
        name: str | None = None,
        ready_url: str | None = None,
        detach: bool = False,
        cwd: Path | None = SOURCE_ROOT,
    ) -> None:
        self.module = module
        self.env = env
        self.args = args
        self.name = name or module.replace(".", "_")
        self.log_path = log_dir / f"{self.name}.log"
        self.ready_url = ready_url
        self.detach = detach
        self.cwd = cwd
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> ServiceProcess:
        env = _as_service(self.module, dict(self.env, **extra_env))
        env.setdefault("PFLEA_METRICS_PORT", str(free_port()))
        self.metrics_port = int(env["PFLEA_METRICS_PORT"])
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.detach,
                preexec_fn=die_with_parent if self.detach else None,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and the exit code (a service drains, then exits 0)."""
        assert self.proc is not None, f"{self.name} was never started"
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM; SIGKILL if draining takes longer than ``timeout``. The exit code."""
        if self.proc is None:
            return None
        self.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        deadline = time.monotonic() + timeout
        while (code := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"{self.name} did not exit in {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return code

    @property
    def readiness_url(self) -> str:
        if self.ready_url:
            return self.ready_url
        if not self.metrics_port:
            raise ValueError(f"{self.name} runs with PFLEA_METRICS_PORT=0: it has no /readyz to wait for")
        return f"http://127.0.0.1:{self.metrics_port}/readyz"

    async def wait_ready(self, timeout: float = 30.0, interval: float = 0.05) -> float:
        """Until the service answers its readiness URL with a 2xx; ``time.monotonic()`` then."""
        url = self.readiness_url
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:

            async def ready() -> float | None:
                if not self.alive:
                    raise ServiceExited(f"{self.name} exited with {self.returncode}:\n{self.log_tail()}")
                try:
                    answer = await http.get(url)
                except httpx.HTTPError:
                    return None  # not listening yet
                return time.monotonic() if answer.is_success else None

            return float(await wait_until(ready, timeout, f"{self.name} ready ({url})", interval))

    async def metrics(self) -> dict[str, float]:
        """The service's Prometheus samples by name (labels joined in), or {} if unreachable."""
        if not self.metrics_port or not self.alive:
            return {}
        try:
            async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
                text = (await http.get(f"http://127.0.0.1:{self.metrics_port}/metrics")).text
        except httpx.HTTPError:
            return {}
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if "le" in s.labels:
                    continue
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
        return samples

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

"""What the pipeline tests share: services as real subprocesses, and deadline-based waiting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.simulator.api import feed_paths
from services.simulator.feed import StoredTx
from shared.envelope import bet_event_id, ingested_event_id
from shared.settings import CASINO_FEED, Settings
from tests.conftest import SERVICE_PASSWORD

REPO = Path(__file__).resolve().parent.parent


def simulator_feeds(url: str) -> str:
    """``PURPLEFLEA_FEEDS`` for every feed the simulator at ``url`` serves."""
    return ",".join(f"{name}={url}{path}" for name, path in feed_paths().items())


def truth_event_id(tx: StoredTx) -> uuid.UUID:
    """The event id a well-formed simulator transaction must be stored under, written from the
    README's identity rule: a casino bet/win carrying ``bet_id`` by it, else (feed, agent, id)."""
    assert tx.id is not None and tx.malformed is None
    item = json.loads(tx.raw)
    if tx.feed == CASINO_FEED and tx.type in ("bet", "win") and "bet_id" in item:
        return bet_event_id(tx.agent_id, item["bet_id"], won=tx.type == "win")
    return ingested_event_id(tx.feed, tx.agent_id, tx.id)


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFLEA_", "PURPLEFLEA_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        NATS_URL=settings.nats_url,
        PFLEA_NAMESPACE=settings.namespace,
        PFLEA_DB_SERVICE_PASSWORD=SERVICE_PASSWORD,
        PFLEA_LOG_LEVEL="INFO",
        # Redelivery after a SIGKILL waits for the ack deadline; keep it short in tests.
        PFLEA_ACK_WAIT_S="3",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class ServiceProcess:
    """``python -m services.<module>`` with its log in a file; killed at test end if alive."""

    def __init__(self, module: str, env: dict[str, str], log_dir: Path, *args: str) -> None:
        self.module = module
        self.env = env
        self.args = args
        self.log_path = log_dir / f"{module.replace('.', '_')}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> ServiceProcess:
        env = dict(self.env, **extra_env)
        self._started_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    async def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.module} did not exit in {timeout}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the service logs that it is ready (its signal handlers are in place)."""
        start = self.log_path.stat().st_size if self.log_path.exists() else 0

        async def ready() -> bool:
            if not self.alive:
                raise AssertionError(f"{self.module} exited:\n{self.log_tail()}")
            with open(self.log_path, "rb") as log:
                log.seek(self._started_at)
                return b'"msg":"ready"' in log.read()

        self._started_at = getattr(self, "_started_at", start)
        await wait_until(ready, timeout, f"{self.module} ready")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def stream_messages(
    js: JetStreamContext, stream: str, subjects: str, *, headers_only: bool = False
) -> list[Msg]:
    """Every message ``stream`` holds now, in order, read with an ephemeral consumer."""
    total = int((await js.stream_info(stream)).state.messages)
    if total == 0:
        return []
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        headers_only=headers_only,
        inactive_threshold=30,
    )
    sub = await js.pull_subscribe(subjects, stream=stream, config=config)
    msgs: list[Msg] = []
    try:
        while len(msgs) < total:
            msgs += await sub.fetch(min(5000, total - len(msgs)), timeout=10)
    finally:
        await sub.unsubscribe()
    return msgs

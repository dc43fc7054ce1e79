"""A server unreachable at start: one short line naming it and the retry interval, not a
traceback per attempt; and SIGTERM still stops the service while it waits."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from devstack.ports import free_port
from devstack.processes import ServiceProcess, wait_until
from shared.ops import Lifecycle
from shared.service import start_when_reachable
from shared.settings import Settings
from shared.unreachable import RepeatedWarnings, ServerUnreachable, redacted_url
from tests.support import service_env

SERVICES = ["services.ingester", "services.writer", "services.relay"]


def closed_url(server: str, port: int) -> dict[str, str]:
    """An address where nothing listens, with a secret that must never be logged."""
    if server == "nats":
        return {"NATS_URL": f"nats://pflea:s3cret-pw@127.0.0.1:{port}"}
    return {"DATABASE_URL": f"postgresql://owner:s3cret-pw@127.0.0.1:{port}/pflea"}


@pytest.mark.parametrize("server", ["nats", "postgres"])
@pytest.mark.parametrize("module", SERVICES)
async def test_a_server_unreachable_at_start_is_one_short_line_not_a_traceback_per_attempt(
    settings: Settings, tmp_path: Path, module: str, server: str
) -> None:
    port = free_port()
    env = service_env(
        settings,
        PURPLEFLEA_API_URL="http://127.0.0.1:9",
        PURPLEFLEA_AGENTS="agent-1:key-1",
        **closed_url(server, port),
    )
    proc = ServiceProcess(module, env, tmp_path).start()
    try:
        await wait_until(lambda: _at_least(proc, server, 6), 30, "six failed attempts to connect")
        log = proc.log_path.read_text()
        assert proc.terminate(10) == 0, "SIGTERM must stop a service still waiting for a server"
    finally:
        proc.kill()
    assert f"127.0.0.1:{port}" in log and "retrying every" in log, log
    assert "Traceback" not in log, log
    assert "s3cret-pw" not in log, "a password was logged"
    assert len(log.encode()) < 2048, f"{len(log.encode())} bytes for six attempts:\n{log}"


async def _at_least(proc: ServiceProcess, server: str, n: int) -> bool:
    assert proc.alive, f"{proc.module} exited:\n{proc.log_tail()}"
    metrics = await proc.metrics()  # {} while not serving yet
    return metrics.get(f"pflea_connect_failures_total{{server={server}}}", 0.0) >= n


def test_passwords_and_tokens_are_cut_out_of_urls() -> None:
    assert (
        redacted_url("postgresql://pflea_writer:pw@db:5432/pflea")
        == "postgresql://pflea_writer:***@db:5432/pflea"
    )
    assert redacted_url("nats://s3cret@nats:4222") == "nats://***@nats:4222"
    assert redacted_url("nats://a:1@n1:4222, nats://n2:4222") == "nats://a:***@n1:4222,nats://n2:4222"


def test_a_repeated_warning_is_logged_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warnings = RepeatedWarnings(logging.getLogger("test.repeats"), every_s=0.0)
    quiet = RepeatedWarnings(logging.getLogger("test.repeats"), every_s=3600.0)
    with caplog.at_level(logging.WARNING, "test.repeats"):
        for _ in range(50):
            quiet.warning("down")
        warnings.warning("down")
        warnings.warning("down")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, "49 repeats within the interval were not held back"
    assert messages[:2] == ["down", "down"]
    assert messages[2].startswith("down (repeated 1 times in the last")


async def test_a_service_starts_again_once_the_server_answers(caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[int] = []

    async def main(settings: Settings, lifecycle: Lifecycle) -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise ServerUnreachable(
                "Postgres", "postgresql://u:pw@db/x", ConnectionRefusedError(111, "refused")
            )
        lifecycle.ready = True

    lifecycle = Lifecycle()
    with caplog.at_level(logging.WARNING, "shared.service"):
        await asyncio.wait_for(start_when_reachable(main, Settings(), lifecycle), 30)
    assert len(attempts) == 3 and lifecycle.started
    assert [r.getMessage() for r in caplog.records] == [
        "Postgres at postgresql://u:***@db/x is unreachable (ConnectionRefusedError: [Errno 111] refused); "
        "retrying every 1.0s"
    ]

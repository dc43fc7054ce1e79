"""Every service: /metrics, /healthz, /readyz, JSON logs without secrets, and a clean SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
from nats.js.api import ConsumerInfo
from prometheus_client import REGISTRY

from devstack.ports import free_port
from devstack.processes import ServiceProcess, wait_until
from shared.jetstream import Topology
from shared.lag import REPORT_EVERY_S, report_tailer_lag
from shared.ops import Lifecycle, OpsServer
from shared.settings import Settings
from shared.store import EventStore
from tests.conftest import SERVICE_PASSWORD
from tests.reference import generate
from tests.support import service_env
from tests.test_writer_relay import publish_transactions


async def test_readyz_turns_503_while_draining_and_healthz_stays_up() -> None:
    lifecycle = Lifecycle()
    port = free_port()
    ops = OpsServer(lifecycle, port, host="127.0.0.1")
    await ops.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/readyz")).status_code == 503  # not ready before start-up ends
            lifecycle.ready = True
            assert (await http.get("/readyz")).status_code == 200
            lifecycle.stop()
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await ops.stop()


def _listening_on(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if width == 8:
                    found.add(".".join(str(b) for b in reversed(raw)))
                else:
                    found.add(raw.hex())
    return found


@pytest.mark.parametrize(
    ("module", "args", "metrics"),
    [
        ("services.writer", (), ("pflea_writer_events_appended_total", "pflea_quarantine_total")),
        ("services.relay", (), ("pflea_relay_events_published_total", "pflea_writer_snapshots_saved_total")),
        (
            "services.projectors",
            ("balance",),
            ("pflea_projector_events_applied_total", "pflea_quarantine_total"),
        ),
    ],
)
async def test_services_serve_metrics_and_health(
    settings: Settings,
    js_streams: nats.NATS,
    tmp_path: Path,
    module: str,
    args: tuple[str, ...],
    metrics: tuple[str, ...],
) -> None:
    port = free_port()
    proc = ServiceProcess(
        module, service_env(settings, PFLEA_METRICS_PORT=str(port)), tmp_path, *args
    ).start()
    try:
        await proc.wait_ready()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).json() == {"ok": True}
            assert (await http.get("/readyz")).status_code == 200
            body = (await http.get("/metrics")).text
        assert all(metric in body for metric in metrics), body
        assert _listening_on(port) == {"127.0.0.1"}, "/metrics listens beyond this machine"
        assert proc.terminate() == 0
        lines = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "service", "msg"} <= set(line) for line in lines)
        assert SERVICE_PASSWORD not in proc.log_path.read_text(), "a password was logged"
    finally:
        proc.kill()


async def test_sigterm_finishes_the_batch_in_hand_and_acks_exactly_what_is_committed(
    settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    expected = await publish_transactions(js_streams, topology, agents=50, per_agent=400)
    writer = ServiceProcess("services.writer", service_env(settings, PFLEA_WRITER_BATCH_SIZE="500"), tmp_path)
    writer.start()
    conn = await asyncpg.connect(settings.database_url)
    try:

        async def some_written() -> bool:
            return await conn.fetchval("SELECT count(*) FROM events") > 2000

        await wait_until(some_written, 60, "writing under way", 0.01)
        assert writer.terminate() == 0, writer.log_tail()

        async def acks_applied() -> ConsumerInfo | None:
            # The server applies acks after the writer is gone (PFLEA_TX is a work queue: each
            # ack also deletes the message). A batch left unacknowledged stays ack-pending: no
            # one pulls, so nothing redelivers it.
            info = await js_streams.jetstream().consumer_info(topology.tx_stream, topology.writer_durable)
            return info if info.num_ack_pending == 0 else None

        info = await wait_until(acks_applied, 15, "no fetched batch left unacknowledged", 0.2)
        written = await conn.fetchval("SELECT count(*) FROM events")
        assert written == len(expected) - info.num_pending, "acked and committed disagree"
        assert written < len(expected), "the writer did not stop early; the test proved nothing"
    finally:
        await conn.close()
        writer.kill()


async def test_lag_seconds_is_the_age_of_the_oldest_unapplied_event(
    writer_pool: asyncpg.Pool, store: EventStore
) -> None:
    """pflea_lag_seconds{reader}: what an operator alarms on (README, Operations)."""
    await writer_pool.execute("INSERT INTO relay_checkpoints (name, position) VALUES ('lag-test', 0)")
    await store.append_batch(generate(5, agents=1, events=3))
    reporter = asyncio.create_task(report_tailer_lag(writer_pool))
    try:

        def relay_lag() -> float | None:
            return REGISTRY.get_sample_value("pflea_lag_seconds", {"reader": "relay"})

        first = await wait_until(relay_lag, 10, "a lag sample")
        assert first > 0
        head = await writer_pool.fetchval("SELECT max(position) FROM events")
        await writer_pool.execute("UPDATE relay_checkpoints SET position = $1 WHERE name = 'lag-test'", head)
        await wait_until(lambda: relay_lag() == 0.0, 2 * REPORT_EVERY_S + 5, "no lag at the head")
    finally:
        reporter.cancel()

"""A projector stopped while a tiny PFLEA_EVENTS drops events it never saw catches up from
Postgres, loudly; the relay, whose stream drops its oldest, skips nothing. Real processes."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.projectors.catch_up import CatchUp
from shared.jetstream import StreamSettings, Topology, declare_streams
from shared.settings import Settings
from shared.store import EventStore
from tests.reference import assert_read_models_match_fold, generate
from tests.support import service_env
from tests.test_projector_services import caught_up, consumer_drained

HELD = 50  # PFLEA_EVENTS_MAX_MSGS while the projector is away


@pytest.fixture
def processes() -> list[ServiceProcess]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


async def _relayed_through(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        head = await conn.fetchval("SELECT max(position) FROM events")
        relayed = await conn.fetchval("SELECT max(position) FROM relay_checkpoints")
        return int(relayed or 0) if relayed == head else 0
    finally:
        await conn.close()


async def _streams_left_behind(url: str, horizon: int) -> int:
    """Streams with events the stopped projector never applied, none of them still held."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                """SELECT count(*)
                   FROM (SELECT stream_id, max(position) AS last FROM events GROUP BY stream_id) s
                   LEFT JOIN projection_checkpoints c
                          ON c.projection = 'balance' AND c.stream_id = s.stream_id
                   JOIN events e ON e.stream_id = s.stream_id AND e.version = coalesce(c.version, 0) + 1
                   WHERE s.last < $1""",
                horizon,
            )
        )
    finally:
        await conn.close()


async def test_a_projector_catches_up_from_postgres_on_events_the_stream_dropped_unseen(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    store: EventStore,
    tmp_path: Path,
    processes: list[ServiceProcess],
) -> None:
    js = js_streams.jetstream()
    env = service_env(settings, PFLEA_PROJECTOR_BATCH_SIZE="25")
    relay = ServiceProcess("services.relay", env, tmp_path).start()
    processes.append(relay)
    projector = ServiceProcess("services.projectors", env, tmp_path, "balance")
    processes.append(projector)
    await store.append_batch(generate(21, agents=20, events=400))
    projector.start()
    await wait_until(lambda: consumer_drained(js_streams, topology, "balance"), 60, "balance drained", 0.3)
    assert projector.terminate() == 0, projector.log_tail()

    # Away: PFLEA_EVENTS now holds only HELD messages; 300 more events, 10 of them new agents.
    tiny = StreamSettings(tx_max_msgs=-1, tx_max_bytes=-1, events_max_msgs=HELD, events_max_bytes=-1)
    await declare_streams(js, topology, settings.duplicate_window_s, tiny)
    await store.append_batch(generate(22, agents=30, events=300))
    await wait_until(lambda: _relayed_through(settings.database_url), 60, "the relay through the log")
    state = (await js.stream_info(topology.events_stream)).state
    assert (state.messages, state.last_seq) == (HELD, 700), "the relay skipped or was refused something"
    horizon = await CatchUp(None, None, js, topology.events_stream, None).horizon()  # type: ignore[arg-type]
    assert horizon is not None
    left_behind = await _streams_left_behind(settings.database_url, horizon)
    assert left_behind > 0, "every stream still has a held event: the gap fill alone would mend them"

    projector.start()
    await wait_until(
        lambda: caught_up(settings.database_url, "balance"), 60, "balance at every stream's head"
    )
    samples = await projector.metrics()
    assert samples.get("pflea_projector_caught_up_from_log_total{projection=balance}", 0) > 0
    conn = await asyncpg.connect(settings.database_url)
    try:
        await assert_read_models_match_fold(conn, ["balances"])
    finally:
        await conn.close()
    said = re.search(
        r"caught up (\d+) streams, (\d+) events, from the events table", projector.log_path.read_text()
    )
    assert said, projector.log_tail()
    assert (
        int(said[1]) >= left_behind
        and int(said[2]) == samples["pflea_projector_caught_up_from_log_total{projection=balance}"]
    )
    assert projector.terminate() == 0, projector.log_tail()

"""An OS crash with JetStream fsyncing on an interval: the streams come back without their
newest writes while the consumers' state, written later, survives - each consumer's ack floor
ahead of its stream's last message. Both streams are recoverable from Postgres: PFLEA_TX (the
ingester polls again from what Postgres committed) and PFLEA_EVENTS (derived: the relay goes on
from the stream's actual end). Nothing may be lost or doubled, and the read models stay exact.

The state is built as such a crash leaves it: each stream's ``msgs/`` directory is copied at T1
(the server paused, so the copy is what it had written), the pipeline runs on, and at T2 the
server is SIGKILLed and restarted with ``msgs/`` from T1 and everything else (consumers' ``obs/``
state, stream config) from T2.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from devstack.embedded import EmbeddedNats
from devstack.processes import wait_until
from services.simulator import Simulator, load_simulator_config, running_simulator
from shared.jetstream import Topology
from shared.settings import Settings
from tests.test_ingest_pipeline import accounted
from tests.test_nats_loss import assert_ledger_exact, pipeline
from tests.test_projector_services import caught_up


@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    base = Path(tempfile.mkdtemp(prefix="pflea-nats-tail-"))
    server = EmbeddedNats(base / "nats")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def stream_dirs(server: EmbeddedNats) -> dict[str, Path]:
    """Each stream's directory in the server's store, by stream name."""
    streams = sorted((server.data_dir / "jetstream").glob("jetstream/*/streams/*"))
    return {path.name: path for path in streams if path.is_dir()}


async def positions(url: str) -> dict[str, tuple[int, int]]:
    """Per stream: (its last sequence, the highest ack floor of its consumers)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        found: dict[str, tuple[int, int]] = {}
        for stream in await js.streams_info():
            name = stream.config.name
            assert name is not None
            floors = [c.ack_floor.stream_seq or 0 for c in await js.consumers_info(name) if c.ack_floor]
            found[name] = (int(stream.state.last_seq), max(floors, default=0))
        return found
    finally:
        await nc.close()


async def test_streams_that_lose_their_tail_under_surviving_consumers_lose_and_double_nothing(
    settings: Settings, own_nats: EmbeddedNats, tmp_path: Path
) -> None:
    sim = Simulator(load_simulator_config({}, port=0, seed=8, agents=10, backlog=300, rate=0))
    async with running_simulator(sim.config, sim) as url:
        procs = pipeline(settings, own_nats.url, sim, url, tmp_path, page_limit=10)
        saved = tmp_path / "msgs-at-t1"
        try:
            for proc in procs:
                proc.start()
            total = len(sim.truth())

            async def progress(at_least: int) -> bool:
                return (await accounted(settings.database_url, sim))[0] >= at_least

            await wait_until(lambda: progress(total // 4), 60, "a quarter ingested")
            at_t1 = await positions(own_nats.url)
            own_nats.pause()  # T1: what the disk holds now is all the crash will leave of msgs/
            try:
                streams = stream_dirs(own_nats)
                for name, path in streams.items():
                    shutil.copytree(path / "msgs", saved / name)
            finally:
                own_nats.resume()
            topology = Topology(settings.namespace)
            assert {topology.tx_stream, topology.events_stream} <= set(streams)
            await wait_until(lambda: progress(total // 2), 60, "half ingested")
            at_t2 = await positions(own_nats.url)
            own_nats.stop(sig=9)  # T2: consumers' state as it is now, beyond the streams of T1
            for name, path in stream_dirs(own_nats).items():
                if (saved / name).exists():
                    shutil.rmtree(path / "msgs")
                    shutil.copytree(saved / name, path / "msgs")
            own_nats.start()
            await wait_until(lambda: progress(total), 120, "every transaction after the crash", 0.3)
            await wait_until(
                lambda: caught_up(settings.database_url, "balance"), 60, "balance caught up", 0.3
            )
            for proc in procs:
                assert proc.terminate() == 0, proc.log_tail()
        finally:
            for proc in procs:
                proc.kill()
    for stream in (topology.tx_stream, topology.events_stream):
        (t1_last, _), (_, t2_floor) = at_t1[stream], at_t2[stream]
        assert t2_floor > t1_last, f"{stream}: the case was built, its consumers' floor ahead of the stream"
    await assert_ledger_exact(settings, sim)

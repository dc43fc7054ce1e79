"""Partitioned writers: agents map to P partitions by one hash, nats-server places each agent's
transactions where that hash says, each partition has one appending writer with standbys, and
changing P on a running system loses and doubles nothing."""

from __future__ import annotations

import re
from pathlib import Path

import nats
import pytest

from devstack.processes import ServiceProcess, wait_until
from services.writer.partitions import PartitionedAppends
from shared.jetstream import StreamSettings, Topology, declare_streams
from shared.ops import Lifecycle
from shared.partitions import fnv1a_32, partition
from shared.settings import Settings
from tests.support import service_env
from tests.test_writer_relay import (
    _at_least,
    assert_log_is_clean,
    assert_source_order,
    count_events,
    publish_transactions,
)

LEADING = re.compile(r"(appending|yielding|the lock of) partition (\d+) of (\d+)")


def test_the_partition_hash_is_fnv1a_32_modulo_the_count() -> None:
    # FNV-1a test vectors (Fowler/Noll/Vo), then the partitions they give.
    assert (fnv1a_32(b""), fnv1a_32(b"a"), fnv1a_32(b"foobar")) == (0x811C9DC5, 0xE40C292C, 0xBF9CF968)
    assert partition("foobar", 7) == 0xBF9CF968 % 7
    assert {partition(f"agent-{n}", 1) for n in range(50)} == {0}
    with pytest.raises(ValueError):
        partition("agent-1", 0)


async def test_nats_server_stores_each_agent_in_the_partition_the_hash_names(
    js_streams: nats.NATS, topology: Topology
) -> None:
    js = js_streams.jetstream()
    await declare_streams(js, topology, duplicate_window_s=60, shape=StreamSettings(partitions=3))
    agents = [f"agent-{n}" for n in range(60)] + ["x", "Z_9", "a-b"]
    for agent in agents:
        await js.publish(topology.tx_subject(agent), b"{}")
    info = await js.stream_info(topology.tx_stream, subjects_filter=">")
    stored = set(info.state.subjects or {})
    assert stored == {f"{topology.namespace}.tx.3.{partition(a, 3)}.{a}" for a in agents}
    assert {len({s for s in stored if s.split(".")[3] == str(p)}) > 0 for p in range(3)} == {True}
    for subject in stored:
        assert topology.tx_agent(subject) == subject.rsplit(".", 1)[1]
    # A subject naming another partition than the agent's is no agent's subject.
    wrong = (partition("agent-1", 3) + 1) % 3
    assert topology.tx_agent(f"{topology.namespace}.tx.3.{wrong}.agent-1") is None
    assert topology.tx_agent(f"{topology.namespace}.tx.03.{partition('agent-1', 3)}.agent-1") is None
    assert topology.tx_partitions((await js.stream_info(topology.tx_stream)).config) == 3


def _writers(n: int, env: dict[str, str], tmp_path: Path) -> list[ServiceProcess]:
    """``n`` writer processes (not started), each logging in a folder of its own."""
    writers = []
    for i in range(n):
        (tmp_path / f"w{i}").mkdir()
        writers.append(ServiceProcess("services.writer", env, tmp_path / f"w{i}"))
    return writers


def _leading(proc: ServiceProcess) -> set[int]:
    """The partitions of three that ``proc`` appends now, by its log."""
    held: set[int] = set()
    for m in LEADING.finditer(proc.log_tail(1000)):
        if m[3] == "3":
            (held.add if m[1] == "appending" else held.discard)(int(m[2]))
    return held


async def test_three_writers_share_three_partitions_and_a_standby_takes_over_a_killed_ones(
    settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    await declare_streams(
        js_streams.jetstream(), topology, duplicate_window_s=60, shape=StreamSettings(partitions=3)
    )
    env = service_env(settings, PFLEA_WRITER_BATCH_SIZE="50", PFLEA_DELAY_AT="writer.append:0.1")
    writers = _writers(3, env, tmp_path)
    url = settings.database_url
    try:
        for proc in writers:
            proc.start()

        async def spread() -> bool:
            return all(len(_leading(p)) == 1 for p in writers)

        # Each writer ends up leading exactly one partition (a writer that took more when it
        # was alone yields them as the others join).
        try:
            await wait_until(spread, 60, "each writer appending one partition")
        except Exception:
            print("\n\n".join(p.log_tail(60) for p in writers))
            raise
        expected = await publish_transactions(js_streams, topology, agents=30, per_agent=100)
        victim = writers[0]
        [lost] = _leading(victim)
        await wait_until(lambda: _at_least(url, 600), 60, "writing under way")
        victim.kill()
        assert await count_events(url) < len(expected), "all written before the kill: proves nothing"
        await wait_until(lambda: _at_least(url, len(expected)), 120, "the survivors finished")
        takers = [p for p in writers[1:] if lost in _leading(p)]
        assert takers, "no standby took over the killed writer's partition"
        for proc in writers[1:]:
            assert proc.terminate() == 0, proc.log_tail()
    finally:
        for proc in writers:
            proc.kill()
    await assert_log_is_clean(url, expected)
    await assert_source_order(url)


async def test_changing_the_partition_count_while_writing_loses_and_doubles_nothing(
    settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    """P goes 1 → 3 → 2 under two running writers, with transactions stored under each count
    still waiting: each agent keeps its order across the changes, nothing lost or doubled."""
    js = js_streams.jetstream()
    env = service_env(settings, PFLEA_WRITER_BATCH_SIZE="50", PFLEA_DELAY_AT="writer.append:0.02")
    writers = _writers(2, env, tmp_path)
    url = settings.database_url
    expected: set = set()
    try:
        for proc in writers:
            proc.start()
        for count, first in ((1, 0), (3, 40), (2, 80)):
            await declare_streams(js, topology, duplicate_window_s=60, shape=StreamSettings(partitions=count))
            expected |= await publish_transactions(js_streams, topology, agents=20, per_agent=40, first=first)
            half = len(expected) // 2
            await wait_until(lambda n=half: _at_least(url, n), 60, "writing under way")
        await wait_until(lambda: _at_least(url, len(expected)), 120, "every transaction written")
        logs = "".join(p.log_tail(600) for p in writers)
        assert "drained" in logs and "following" in logs, logs[-3000:]
        for proc in writers:
            assert proc.terminate() == 0, proc.log_tail()
    finally:
        for proc in writers:
            proc.kill()
    await assert_log_is_clean(url, expected)
    await assert_source_order(url)
    consumers = {c.name for c in await js.consumers_info(topology.tx_stream)}
    assert {"writer", "writer-3-0", "writer-3-1", "writer-3-2", "writer-2-0", "writer-2-1"} <= consumers


async def test_a_writer_reads_the_partition_count_off_the_stream(
    js_streams: nats.NATS, topology: Topology, settings: Settings
) -> None:
    appends = PartitionedAppends(js_streams.jetstream(), topology, Lifecycle(), "", consumer=None)  # type: ignore[arg-type]
    assert await appends.partitions() == 1
    await declare_streams(
        js_streams.jetstream(), topology, duplicate_window_s=60, shape=StreamSettings(partitions=4)
    )
    assert await appends.partitions() == 4

"""The writer and relay as real processes: batches survive SIGKILL, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from devstack.processes import ServiceProcess, wait_until
from shared.atomic_batch import HDR_BATCH_ID
from shared.envelope import TxEnvelope, ingested_event_id
from shared.events import FundsDeposited, encode_data
from shared.jetstream import StreamSettings, Topology, delivery, pull_consumer_config
from shared.settings import Settings
from shared.store import EventStore, NewEvent
from shared.wire import HDR_EVENT_ID, HDR_MSG_ID, HDR_POSITION, HDR_VERSION, tx_messages
from tests.support import service_env, stream_messages


def envelope(agent: str, n: int) -> TxEnvelope:
    tx_id = f"tx-{agent}-{n}"
    return TxEnvelope(
        event_id=ingested_event_id("test", agent, tx_id),
        agent_id=agent,
        event_type="FundsDeposited",
        schema_version=1,
        data=msgspec.Raw(encode_data(FundsDeposited(amount=Decimal(n) / 100, asset="PFLEA", tx_id=tx_id))),
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=n),
        feed="test",
        tx_id=tx_id,
    )


async def publish_transactions(
    nc: nats.NATS, topology: Topology, agents: int, per_agent: int, first: int = 0
) -> set[uuid.UUID]:
    """Transactions ``first`` .. ``first + per_agent - 1`` of each agent (their order is their
    tx number), published round-robin over the agents."""
    js = nc.jetstream()
    ids = set()
    for n in range(first, first + per_agent):
        for a in range(agents):
            env = envelope(f"agent-{a}", n)
            ids.add(env.event_id)
            [message] = tx_messages([env])
            await js.publish_async(
                topology.tx_subject(env.agent_id), message.payload, headers={HDR_MSG_ID: message.msg_id}
            )
    await js.publish_async_completed()
    return ids


async def count_events(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def relayed(nc: nats.NATS, topology: Topology) -> list[nats.aio.msg.Msg]:
    """Every message on this test's PFLEA_EVENTS."""
    return await stream_messages(nc.jetstream(), topology.events_stream, topology.events_filter)


async def assert_log_is_clean(database_url: str, expected: set[uuid.UUID]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT event_id FROM events")
        assert {r["event_id"] for r in rows} == expected
        assert len(rows) == len(expected)
        gaps = await conn.fetchval(
            """SELECT count(*) FROM (SELECT stream_id, max(version) AS v, count(*) AS n
               FROM events GROUP BY stream_id) s WHERE v <> n"""
        )
        assert gaps == 0, "some stream's versions are not 1..n"
    finally:
        await conn.close()


async def assert_source_order(database_url: str) -> None:
    """Every agent's events are stored in the order its transactions were published."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT stream_id, data->>'tx_id' AS tx_id FROM events ORDER BY stream_id, version"
        )
    finally:
        await conn.close()
    by_stream: dict[str, list[int]] = {}
    for row in rows:
        by_stream.setdefault(row["stream_id"], []).append(int(row["tx_id"].rsplit("-", 1)[1]))
    out_of_order = {s: ns for s, ns in by_stream.items() if ns != sorted(ns)}
    assert not out_of_order, f"stored out of source order: {list(out_of_order.items())[:2]}"


async def assert_all_relayed_in_order(nc: nats.NATS, topology: Topology, expected: set[uuid.UUID]) -> None:
    msgs = await relayed(nc, topology)
    ids = {uuid.UUID(m.headers[HDR_EVENT_ID]) for m in msgs}
    assert ids == expected, f"{len(expected - ids)} committed events never reached PFLEA_EVENTS"
    last_version: dict[str, int] = {}
    for m in msgs:
        stream = m.subject.split(".")[2]
        version = int(m.headers[HDR_VERSION])
        # A repeated suffix after a crash may go back; a first sighting never skips ahead.
        if version > last_version.get(stream, 0):
            assert version == last_version.get(stream, 0) + 1, f"{stream} jumped to v{version}"
            last_version[stream] = version
        assert int(m.headers[HDR_POSITION]) > 0


@pytest.fixture
def writer(settings: Settings, tmp_path: Path) -> ServiceProcess:
    proc = ServiceProcess("services.writer", service_env(settings, PFLEA_WRITER_BATCH_SIZE="200"), tmp_path)
    yield proc
    proc.kill()


@pytest.fixture
def relay(settings: Settings, tmp_path: Path) -> ServiceProcess:
    proc = ServiceProcess("services.relay", service_env(settings), tmp_path)
    yield proc
    proc.kill()


async def test_writer_killed_mid_batch_loses_and_doubles_nothing(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    writer: ServiceProcess,
    relay: ServiceProcess,
) -> None:
    expected = await publish_transactions(js_streams, topology, agents=40, per_agent=100)
    url = settings.database_url
    for round_ in range(3):
        writer.start()
        relay.start()
        floor = 800 * (round_ + 1)
        await wait_until(lambda f=floor: _at_least(url, f), 60, f"{floor} events written")
        writer.kill()
        relay.kill()
    writer.start()
    relay.start()
    await writer.wait_ready()
    await wait_until(lambda: _at_least(url, len(expected)), 60, "every transaction written")
    await wait_until(lambda: _relayed_all(js_streams, topology, len(expected)), 60, "relay caught up")
    assert writer.terminate() == 0, writer.log_tail()
    assert relay.terminate() == 0, relay.log_tail()
    await assert_log_is_clean(url, expected)
    await assert_source_order(url)
    await assert_all_relayed_in_order(js_streams, topology, expected)


async def test_a_standby_writer_takes_over_when_the_appending_one_is_killed(
    settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    """Replicas: one appends (it holds the append lock), the other stands by; SIGKILL the
    appender mid-stream and the standby finishes, in every agent's order, nothing doubled."""
    expected = await publish_transactions(js_streams, topology, agents=30, per_agent=100)
    env = service_env(settings, PFLEA_WRITER_BATCH_SIZE="100", PFLEA_DELAY_AT="writer.append:0.05")
    for i in range(2):
        (tmp_path / f"w{i}").mkdir()
    replicas = [ServiceProcess("services.writer", env, tmp_path / f"w{i}") for i in range(2)]
    url = settings.database_url
    try:
        for replica in replicas:
            replica.start()

        def appender() -> ServiceProcess | None:
            holding = [r for r in replicas if "holds the append lock" in r.log_tail(200)]
            return holding[0] if len(holding) == 1 else None

        await wait_until(lambda: _some(appender() is not None), 30, "one replica appending")
        active = appender()
        assert active is not None
        await wait_until(lambda: _at_least(url, 600), 60, "writing under way")
        active.kill()
        assert await count_events(url) < len(expected), "all written before the kill: proves nothing"
        standby = next(r for r in replicas if r is not active)
        await wait_until(lambda: _at_least(url, len(expected)), 90, "the standby finished")
        assert "holds the append lock" in standby.log_tail(200)
        assert standby.terminate() == 0, standby.log_tail()
    finally:
        for replica in replicas:
            replica.kill()
    await assert_log_is_clean(url, expected)
    await assert_source_order(url)


async def _some(value: bool) -> bool:
    return value


async def test_messages_a_dead_writer_held_are_stored_ahead_of_newer_ones(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    """A SIGKILLed writer's batch stays unacked until the ack wait; the next writer must not
    store the same agents' newer transactions first (it reads the held ones from the stream)."""
    expected = await publish_transactions(js_streams, topology, agents=5, per_agent=60)
    ack_wait = 600.0  # far beyond the test: the held messages are never redelivered in it
    config = pull_consumer_config(
        topology.writer_durable, topology.tx_filter, ack_wait_s=ack_wait, max_deliver=10
    )
    js = js_streams.jetstream()
    dead = await js.pull_subscribe(
        topology.tx_filter, durable=topology.writer_durable, stream=topology.tx_stream, config=config
    )
    held = await dead.fetch(120, timeout=5)  # the dead writer's batch: never acked
    assert len(held) == 120
    await dead.unsubscribe()
    writer.start(PFLEA_ACK_WAIT_S=str(ack_wait))
    await writer.wait_ready()
    url = settings.database_url
    await wait_until(lambda: _at_least(url, len(expected)), 60, "every transaction written")
    assert writer.terminate() == 0, writer.log_tail()
    await assert_log_is_clean(url, expected)
    await assert_source_order(url)


@pytest.mark.parametrize(
    "crash_at", ["writer.after_commit:2", "relay.after_publish:2", "relay.before_publish:2"]
)
async def test_crash_between_commit_and_relay_loses_nothing(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    writer: ServiceProcess,
    relay: ServiceProcess,
    crash_at: str,
) -> None:
    # More than one relay batch (1,000) whatever the timing, so the second one is reached.
    expected = await publish_transactions(js_streams, topology, agents=10, per_agent=250)
    crashing, other = (writer, relay) if crash_at.startswith("writer.") else (relay, writer)
    other.start()
    crashing.start(PFLEA_CRASH_AT=crash_at)
    assert await crashing.wait_exit(60) == 137, crashing.log_tail()
    crashing.start()
    await writer.wait_ready()
    await relay.wait_ready()
    await wait_until(lambda: _at_least(settings.database_url, len(expected)), 60, "all written")
    await wait_until(lambda: _relayed_all(js_streams, topology, len(expected)), 60, "all relayed")
    assert writer.terminate() == 0
    assert relay.terminate() == 0
    await assert_log_is_clean(settings.database_url, expected)
    await assert_all_relayed_in_order(js_streams, topology, expected)


@pytest.mark.parametrize(
    "crash_at", ["atomic_batch.before_commit:2", "relay.after_publish:2", "relay.after_publish:3"]
)
async def test_a_relay_killed_mid_batch_or_before_its_checkpoint_loses_and_doubles_nothing(
    settings: Settings,
    topology: Topology,
    js_streams: nats.NATS,
    writer: ServiceProcess,
    relay: ServiceProcess,
    crash_at: str,
) -> None:
    """Killed with its second batch staged but not committed (nats-server drops it), or with the
    second or the last committed but the checkpoint not moved (the next relay finds it at the
    stream's end and goes on after it): PFLEA_EVENTS ends up with every event exactly once, in
    position order, and the checkpoint at the end of the log."""
    expected = await publish_transactions(js_streams, topology, agents=10, per_agent=250)
    writer.start()
    await wait_until(lambda: _at_least(settings.database_url, len(expected)), 60, "all written")
    relay.start(PFLEA_CRASH_AT=crash_at)  # every batch a full 1,000: the log is there already
    assert await relay.wait_exit(60) == 137, relay.log_tail()
    held = (await js_streams.jetstream().stream_info(topology.events_stream)).state.messages
    assert held == {"atomic_batch.before_commit:2": 1000, "relay.after_publish:2": 2000}.get(crash_at, 2500)
    relay.start()
    await wait_until(lambda: _relayed_all(js_streams, topology, len(expected)), 60, "all relayed")
    await wait_until(
        lambda: _checkpoint_at(settings.database_url, len(expected)), 30, "checkpoint at the end"
    )
    assert relay.terminate() == 0, relay.log_tail()
    assert writer.terminate() == 0, writer.log_tail()
    msgs = await relayed(js_streams, topology)
    positions = [int(m.headers[HDR_POSITION]) for m in msgs]
    assert len(positions) == len(expected), f"{len(positions) - len(expected)} events doubled"
    assert positions == sorted(set(positions))
    assert {uuid.UUID(m.headers[HDR_EVENT_ID]) for m in msgs} == expected
    if crash_at.startswith("relay."):
        assert "PFLEA_EVENTS already holds events up to position" in relay.log_tail(200)


async def test_an_events_stream_from_before_atomic_batches_gets_each_event_with_its_msg_id(
    settings: Settings, topology: Topology, js_streams: nats.NATS, relay: ServiceProcess, store: EventStore
) -> None:
    """Until `pflea migrate` lets PFLEA_EVENTS take atomic batches, the relay publishes one
    message per event, deduplicated by event id, and says what to run."""
    js = js_streams.jetstream()
    await js.delete_stream(topology.events_stream)
    [_, events_config] = topology.stream_configs(60, StreamSettings())
    await js.add_stream(dataclasses.replace(events_config, allow_atomic=None))
    events = [NewEvent.of(FundsDeposited(amount=Decimal("1.5"), asset="USDC")) for _ in range(5)]
    await store.append("solo", "agent", events, expected_version=0)
    relay.start()
    await wait_until(lambda: _relayed_all(js_streams, topology, 5), 30, "relay one message at a time")
    assert relay.terminate() == 0
    msgs = await relayed(js_streams, topology)
    assert [m.headers[HDR_MSG_ID] for m in msgs] == [str(e.event_id) for e in events]
    assert not any(HDR_BATCH_ID in m.headers for m in msgs)
    assert "does not allow atomic batches" in relay.log_tail(200)


async def test_a_batch_the_stream_refuses_is_published_again_once_it_takes_it(
    settings: Settings, topology: Topology, js_streams: nats.NATS, relay: ServiceProcess, store: EventStore
) -> None:
    js = js_streams.jetstream()
    [_, events_config] = topology.stream_configs(60, StreamSettings())
    await js.update_stream(dataclasses.replace(events_config, max_msg_size=8))  # smaller than an event
    events = [NewEvent.of(FundsDeposited(amount=Decimal("1.5"), asset="USDC")) for _ in range(5)]
    await store.append("solo", "agent", events, expected_version=0)
    relay.start()
    await wait_until(
        lambda: _some("publish failed (BatchRefused(10054" in relay.log_tail(200)), 30, "a refused batch"
    )
    assert (await js.stream_info(topology.events_stream)).state.messages == 0
    await js.update_stream(events_config)
    await wait_until(lambda: _relayed_all(js_streams, topology, 5), 30, "the batch published again")
    assert relay.terminate() == 0, relay.log_tail()
    await assert_all_relayed_in_order(js_streams, topology, {e.event_id for e in events})
    assert len(await relayed(js_streams, topology)) == 5


async def test_events_committed_by_others_are_relayed(
    settings: Settings, topology: Topology, js_streams: nats.NATS, relay: ServiceProcess, store: EventStore
) -> None:
    """The table is the outbox: an event appended while no relay ran still gets published."""
    events = [NewEvent.of(FundsDeposited(amount=Decimal("1.5"), asset="USDC")) for _ in range(5)]
    await store.append("solo", "agent", events, expected_version=0)
    relay.start()
    await relay.wait_ready()
    await wait_until(lambda: _relayed_all(js_streams, topology, 5), 30, "relay of direct appends")
    assert relay.terminate() == 0
    await assert_all_relayed_in_order(js_streams, topology, {e.event_id for e in events})


async def test_a_writer_told_to_relay_still_relays_this_release_and_says_where_it_moved(
    settings: Settings, topology: Topology, js_streams: nats.NATS, store: EventStore, tmp_path: Path
) -> None:
    events = [NewEvent.of(FundsDeposited(amount=Decimal("1.5"), asset="USDC")) for _ in range(5)]
    await store.append("solo", "agent", events, expected_version=0)
    env = service_env(settings, PFLEA_WRITER_PARTS="append,commands,relay,snapshots")
    writer = ServiceProcess("services.writer", env, tmp_path).start()
    try:
        await writer.wait_ready()
        await wait_until(lambda: _relayed_all(js_streams, topology, 5), 30, "the writer relaying")
        assert writer.terminate() == 0, writer.log_tail()
    finally:
        writer.kill()
    log = writer.log_path.read_text()
    assert "PFLEA_WRITER_PARTS names relay, snapshots, which moved to `python -m services.relay`" in log
    await assert_all_relayed_in_order(js_streams, topology, {e.event_id for e in events})


async def test_a_standby_relay_takes_over_when_the_leading_one_is_killed(
    settings: Settings, topology: Topology, js_streams: nats.NATS, store: EventStore, tmp_path: Path
) -> None:
    """Relay replicas: one publishes (it holds the relay lease), the other stands by; SIGKILL
    the leader and the standby publishes what is committed after, in order."""
    env = service_env(settings, PFLEA_RELAY_POLL_S="0.1")
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
    replicas = [ServiceProcess("services.relay", env, tmp_path / f"r{i}") for i in range(2)]
    before = [NewEvent.of(FundsDeposited(amount=Decimal("1"), asset="USDC")) for _ in range(5)]
    after = [NewEvent.of(FundsDeposited(amount=Decimal("2"), asset="USDC")) for _ in range(5)]
    try:
        await store.append("before", "agent", before, expected_version=0)
        for replica in replicas:
            replica.start()
        for replica in replicas:
            await replica.wait_ready()
        await wait_until(lambda: _relayed_all(js_streams, topology, 5), 30, "the leader relaying")
        leaders = [r for r in replicas if '"msg":"relaying"' in r.log_tail(200)]
        assert len(leaders) == 1, "two relays lead at once"
        leaders[0].kill()
        await store.append("after", "agent", after, expected_version=0)
        await wait_until(lambda: _relayed_all(js_streams, topology, 10), 30, "the standby relaying")
        standby = next(r for r in replicas if r is not leaders[0])
        assert '"msg":"relaying"' in standby.log_tail(200)
        assert standby.terminate() == 0, standby.log_tail()
    finally:
        for replica in replicas:
            replica.kill()
    await assert_all_relayed_in_order(js_streams, topology, {e.event_id for e in before + after})


async def test_an_undecodable_message_is_quarantined_and_the_rest_flow(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    expected = await publish_transactions(js_streams, topology, agents=2, per_agent=5)
    await js_streams.jetstream().publish(topology.tx_subject("agent-0"), b"\xff not an envelope")
    more = await publish_transactions(js_streams, topology, agents=3, per_agent=7)
    writer.start()
    await writer.wait_ready()
    url = settings.database_url
    await wait_until(lambda: _at_least(url, len(expected | more)), 30, "good messages written")
    conn = await asyncpg.connect(url)
    try:
        row = await wait_until(lambda: conn.fetchrow("SELECT * FROM quarantine"), 10, "quarantine")
        assert row["source"] == "writer" and row["raw"] == b"\xff not an envelope"
        assert "envelope" in row["reason"]
    finally:
        await conn.close()
    assert writer.terminate() == 0
    await assert_log_is_clean(url, expected | more)


async def _at_least(url: str, n: int) -> bool:
    return await count_events(url) >= n


async def _checkpoint_at(url: str, position: int) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT position FROM relay_checkpoints WHERE name = 'events'") == position
    finally:
        await conn.close()


async def _relayed_all(nc: nats.NATS, topology: Topology, n: int) -> bool:
    info = await nc.jetstream().stream_info(topology.events_stream)
    return info.state.messages >= n


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.PFLEA_TX.writer.3.17.5.1700000000000000000.2",
        "$JS.ACK._.ACCHASH.PFLEA_TX.writer.3.17.5.1700000000000000000.2.tok",  # domain + account
    ],
)
def test_the_ack_subject_tells_sequence_and_deliveries_as_nats_py_reads_them(reply: str) -> None:
    msg = Msg(_client=None, subject="pflea.tx.a", reply=reply, data=b"")  # type: ignore[arg-type]
    assert delivery(msg) == (msg.metadata.sequence.stream, msg.metadata.num_delivered) == (17, 3)


async def test_a_batch_message_with_one_transaction_that_cannot_be_stored_keeps_the_others(
    settings: Settings, topology: Topology, js_streams: nats.NATS, writer: ServiceProcess
) -> None:
    """The ingester sends an agent's page as one message; a row that cannot be stored (here,
    data that is not an object: the writer's decode refuses it before the database would; the
    append's own isolation is in test_writer_stages.py) is quarantined alone and its neighbours
    are stored in order."""
    envelopes = [envelope("agent-b", n) for n in range(5)]
    envelopes[2] = msgspec.structs.replace(envelopes[2], data=msgspec.Raw(b"[1]"))
    [message] = tx_messages(envelopes)
    await js_streams.jetstream().publish(
        topology.tx_subject(message.agent_id), message.payload, headers={HDR_MSG_ID: message.msg_id}
    )
    writer.start()
    url = settings.database_url
    await wait_until(lambda: _at_least(url, 4), 30, "the good transactions written")
    conn = await asyncpg.connect(url)
    try:
        row = await wait_until(lambda: conn.fetchrow("SELECT * FROM quarantine"), 10, "quarantine")
        assert row["source"] == "writer" and row["reason"] == "data: expected a JSON object, got list"
        assert msgspec.json.decode(row["raw"])["tx_id"] == "tx-agent-b-2"
        assert await conn.fetchval("SELECT count(*) FROM quarantine") == 1
    finally:
        await conn.close()
    assert writer.terminate() == 0, writer.log_tail()
    good = {e.event_id for i, e in enumerate(envelopes) if i != 2}
    await assert_log_is_clean(url, good)
    await assert_source_order(url)


async def test_a_transaction_that_kills_the_writer_is_quarantined_and_the_rest_flow(
    settings: Settings, topology: Topology, js_streams: nats.NATS, tmp_path: Path
) -> None:
    """A message that crashes the writer whenever it is appended (a crash loop) must neither
    stall the pipeline for good nor take innocent neighbours to the delivery limit with it."""
    expected = await publish_transactions(js_streams, topology, agents=3, per_agent=20)
    culprit = envelope("agent-1", 5)
    env = service_env(
        settings,
        PFLEA_CRASH_AT=f"writer.tx.{culprit.tx_id}:1",
        PFLEA_WRITER_MAX_DELIVER="4",
        PFLEA_ACK_WAIT_S="2",
    )
    writer = ServiceProcess("services.writer", env, tmp_path)
    url = settings.database_url
    good = expected - {culprit.event_id}
    crashes = 0
    try:
        for _ in range(40):
            writer.start()
            exited = None
            for _ in range(100):
                if await _at_least(url, len(good)):
                    break
                if writer.proc is not None and writer.proc.poll() is not None:
                    exited = writer.proc.returncode
                    break
                await asyncio.sleep(0.1)
            if exited is None:
                break
            assert exited == 137, writer.log_tail()  # the crash point, nothing else
            crashes += 1
        else:
            pytest.fail("still crash-looping after 40 restarts")
        await wait_until(lambda: _at_least(url, len(good)), 30, "the innocent transactions written")
        assert writer.terminate() == 0, writer.log_tail()
    finally:
        writer.kill()
    assert crashes >= 2, "the culprit never crashed the writer: the test proved nothing"
    await assert_log_is_clean(url, good)
    await assert_source_order(url)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT reason, raw FROM quarantine")
    finally:
        await conn.close()
    assert len(rows) == 1 and "times without commit" in rows[0]["reason"]
    assert culprit.tx_id.encode() in rows[0]["raw"]

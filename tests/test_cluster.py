"""The ledger on a 3-node JetStream cluster: R3 streams, clients that fail over between nodes,
and the whole pipeline under load while a node, then the stream leader's node, is SIGKILLed.

The cluster is three ``nats-server`` processes from the wheel, routed together
(devstack/cluster.py); NATS_URL names all three, as a deployment's services get them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from devstack.cluster import NatsCluster, stream_leader
from devstack.embedded import EmbeddedNats
from devstack.processes import wait_until
from devstack.servers import new_root, running
from shared.consumer import PullLoop
from shared.jetstream import (
    NATS_ERRORS,
    AcksLost,
    StreamSettings,
    Topology,
    ack_all,
    declare_streams,
    publish_in_order,
    pull_consumer_config,
)
from shared.nats_conn import connect_nats
from shared.ops import Lifecycle
from tests.chaos.fixtures import chaos_run, simulator
from tests.chaos.harness import PIPELINE, ChaosRun
from tests.chaos.schedule import Schedule
from tests.chaos.servers import ClusterChaosServers
from tests.chaos.stalls import StallWatch

# A sanity bound only: the figure itself is printed (and recorded with PFLEA_CHAOS_REPORT).
STALL_BOUND_S = 60.0


@pytest.fixture(scope="module")
async def cluster_servers() -> AsyncIterator[ClusterChaosServers]:
    async with running(ClusterChaosServers(new_root("cluster"))) as servers:
        yield servers


def node_of(cluster: NatsCluster, nc: Client) -> str:
    """The node a client is connected to now."""
    assert nc.connected_url is not None
    port = nc.connected_url.port
    return next(node.name for node in cluster.nodes if node.port == port)


async def publish(js: JetStreamContext, topology: Topology, ids: range) -> None:
    """Publish ``ids`` until every one is acked, retrying (same Nats-Msg-Id) through failover."""
    messages = [(topology.tx_subject("agent-a"), str(i).encode(), {"Nats-Msg-Id": f"m{i}"}) for i in ids]
    while True:
        try:
            return await publish_in_order(js, messages, timeout=5)
        except NATS_ERRORS:
            await asyncio.sleep(0.1)


class Reader:
    """The services' consume loop (``PullLoop``) on a durable consumer, acking what it gets."""

    def __init__(self, js: JetStreamContext, topology: Topology) -> None:
        config = pull_consumer_config("reader", topology.tx_filter, ack_wait_s=5, max_deliver=10)
        self.loop = PullLoop(js, topology.tx_stream, config, Lifecycle(), batch=100)
        self.got: list[int] = []
        self.task = asyncio.create_task(self.loop.run(self.handle))

    async def handle(self, msgs: list[Msg]) -> None:
        self.got += [int(msg.data) for msg in msgs]
        await ack_all(msgs)

    async def until_got(self, ids: range) -> None:
        """Every one of ``ids`` came (an ack lost with a dead node is a redelivery: at least once)."""
        await wait_until(lambda: set(ids) <= set(self.got), 60, f"messages {ids} through the consumer")

    async def stop(self) -> None:
        self.loop.lifecycle.stop()
        await self.task


async def test_a_client_of_the_cluster_keeps_publishing_and_consuming_when_its_node_is_killed(
    cluster_servers: ClusterChaosServers,
) -> None:
    cluster = cluster_servers.cluster
    topology = Topology(f"f{uuid.uuid4().hex[:8]}")
    nc = await connect_nats(cluster.url, "pflea-failover-test")
    try:
        js = nc.jetstream()
        await declare_streams(js, topology, 60.0, StreamSettings(replicas=3))
        info = await js.stream_info(topology.tx_stream)
        assert info.config.num_replicas == 3 and info.cluster is not None
        assert len(info.cluster.replicas or []) == 2, "the stream is not kept on three nodes"
        reader = Reader(js, topology)
        await publish(js, topology, range(200))
        await reader.until_got(range(200))

        killed = node_of(cluster, nc)
        cluster.kill(killed)
        began = time.monotonic()
        await publish(js, topology, range(200, 400))
        print(f"200 publishes acked {time.monotonic() - began:.2f}s after the client's node {killed} died")
        await reader.until_got(range(200, 400))
        await reader.stop()

        assert node_of(cluster, nc) != killed, "the client never left the dead node"
        assert nc.stats["reconnects"] >= 1
        assert set(reader.got) == set(range(400))
        # PFLEA_TX is a work queue (acked messages go), so count what it ever stored.
        assert (await js.stream_info(topology.tx_stream)).state.last_seq == 400, "a publish was doubled"
    finally:
        cluster.ensure_up()
        await cluster.wait_healthy(60)
        await nc.close()


async def test_publish_acks_that_stop_coming_are_given_up_long_before_the_timeout(tmp_path: Path) -> None:
    """A stream leader that dies takes the acks of what it had not replicated with it, and a
    client connected to another node hears nothing: silence, not a reconnect. A paused server
    is the same silence, on a connection that stays up."""
    server = EmbeddedNats(tmp_path / "nats", durable=False)
    server.start()
    nc = await connect_nats(server.url, "pflea-silence-test")
    topology = Topology(f"q{uuid.uuid4().hex[:8]}")
    try:
        js = nc.jetstream()
        await declare_streams(js, topology, 60.0)
        messages = [(topology.tx_subject("agent-a"), b"x", {"Nats-Msg-Id": f"s{i}"}) for i in range(50)]
        server.pause()
        with pytest.raises(AcksLost, match="no publish ack"):
            await publish_in_order(js, messages, timeout=600)
        assert nc.stats["reconnects"] == 0, "a reconnect, not the silence, ended the wait"
    finally:
        server.resume()
        await nc.close()
        server.stop()


async def test_streams_declared_again_with_more_replicas_are_scaled_with_their_consumers(
    cluster_servers: ClusterChaosServers,
) -> None:
    """`pflea migrate` / `pflea up` apply PFLEA_STREAM_REPLICAS to a stream that exists."""
    topology = Topology(f"s{uuid.uuid4().hex[:8]}")
    nc = await connect_nats(cluster_servers.nats_url, "pflea-scale-test")
    try:
        js = nc.jetstream()
        await declare_streams(js, topology, 60.0, StreamSettings(replicas=1))
        config = pull_consumer_config("writer", topology.tx_filter, ack_wait_s=5, max_deliver=10)
        await js.add_consumer(topology.tx_stream, config)
        await publish(js, topology, range(10))
        await declare_streams(js, topology, 60.0, StreamSettings(replicas=3))

        async def scaled() -> bool:
            stream = await js.stream_info(topology.tx_stream)
            consumer = await js.consumer_info(topology.tx_stream, "writer")
            return (
                stream.config.num_replicas == 3
                and len((stream.cluster and stream.cluster.replicas) or []) == 2
                and len((consumer.cluster and consumer.cluster.replicas) or []) == 2
            )

        await wait_until(scaled, 30, "the stream and its consumer on three nodes")
        assert (await js.stream_info(topology.tx_stream)).state.messages == 10
    finally:
        await nc.close()


async def test_a_stream_create_that_outlasts_its_request_is_asked_again_until_made(
    cluster_servers: ClusterChaosServers, caplog: pytest.LogCaptureFixture
) -> None:
    """An R3 create is answered once the stream's group has a leader. With the other two nodes
    hung (SIGSTOP), the request times out; `pflea migrate` asks again until they are back."""
    cluster = cluster_servers.cluster
    topology = Topology(f"c{uuid.uuid4().hex[:8]}")
    # On the meta leader's node, which answers that the stream does not exist yet by itself.
    leader = cluster.node(await wait_until(cluster.meta_leader, 30, "a meta leader"))
    nc = await connect_nats(leader.url, "pflea-create-test")
    others = [node for node in cluster.nodes if node is not leader]
    try:
        js = nc.jetstream(timeout=1)
        for node in others:
            node.pause()
        declaring = asyncio.create_task(declare_streams(js, topology, 60.0, StreamSettings(replicas=3)))
        await wait_until(lambda: "asking again" in caplog.text or declaring.done(), 30, "a create timing out")
        assert not declaring.done(), declaring.exception()
        for node in others:
            node.resume()
        assert await asyncio.wait_for(declaring, 60) == []
        for stream in (topology.tx_stream, topology.events_stream):
            info = await nc.jetstream().stream_info(stream)
            assert info.config.num_replicas == 3
    finally:
        for node in others:
            node.resume()
        await cluster.wait_healthy(60)
        await nc.close()


async def leader(js: JetStreamContext, stream: str) -> str | None:
    """The node leading ``stream``, or None while it is being elected."""
    try:
        return await stream_leader(js, stream)
    except (LookupError, *NATS_ERRORS):
        return None


async def wait_for_stored(run: ChaosRun, more: int, watch: StallWatch) -> None:
    """Until the writer has committed ``more`` events beyond now (the pipeline moves on)."""
    target = watch.stages["writer"].count + more
    await wait_until(lambda: watch.stages["writer"].count >= target, 60, f"{more} more events stored")


async def kill_and_restore(run: ChaosRun, node: str, watch: StallWatch, notes: list[str]) -> None:
    """SIGKILL ``node`` under load, let the pipeline go on without it, bring it back."""
    assert isinstance(run.servers, ClusterChaosServers)
    cluster = run.servers.cluster
    cluster.kill(node)
    await wait_for_stored(run, 200, watch)
    cluster.restart(node)
    caught_up = await cluster.wait_healthy(60, [cluster.node(node)])
    notes.append(f"{node} killed and back (caught up in {caught_up:.1f}s)")


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_the_pipeline_on_r3_streams_survives_losing_a_node_and_the_stream_leaders_node(
    cluster_servers: ClusterChaosServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sim = simulator(7, agents=8, backlog=100, rate=150.0)
    schedule = Schedule("cluster-node-loss", 7, request.node.nodeid)
    env = {"PFLEA_STREAM_REPLICAS": "3"}
    async with chaos_run(cluster_servers, schedule, tmp_path, sim=sim, env=env) as run:
        await run.start_services(PIPELINE)
        js = await run.js()
        for stream in (run.topology.tx_stream, run.topology.events_stream):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, f"{stream} is not R3"
        watch = StallWatch(run.procs, lambda: len(sim.truth()))
        watch.start()
        await wait_for_stored(run, 300, watch)
        watch.reset()  # the stalls measured are those the faults cause

        notes: list[str] = []
        tx, events = run.topology.tx_stream, run.topology.events_stream
        leaders = {await leader(js, tx), await leader(js, events)}
        bystander = next(n.name for n in cluster_servers.cluster.nodes if n.name not in leaders)
        await kill_and_restore(run, bystander, watch, notes)
        tx_leader = await wait_until(lambda: leader(js, tx), 30, "a PFLEA_TX leader")
        await kill_and_restore(run, tx_leader, watch, notes)
        events_leader = await wait_until(lambda: leader(js, events), 30, "a PFLEA_EVENTS leader")
        if events_leader != tx_leader:
            await kill_and_restore(run, events_leader, watch, notes)
        await wait_for_stored(run, 200, watch)
        worst = await watch.stop()

        run.notes["worst_stall_s"] = max(worst.values())
        run.notes["worst_stall_stage"] = max(worst, key=lambda stage: worst[stage])
        print(f"cluster faults: {'; '.join(notes)}")
        print(f"worst stall per stage (s): {worst}")
        verdict = await run.finish(converge_s=90)
    assert verdict.ok, verdict.explain()
    assert len(notes) >= 2, "the faults did not happen"
    assert max(worst.values()) < STALL_BOUND_S, f"a stage stood still too long: {worst}"

"""JetStream streams, subjects and consumers: defined once here, created idempotently at start.

Subjects are per agent so streams (and later the events table) can be partitioned by agent.
A namespace prefixes everything, so tests and several deployments can share one server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    SubjectTransform,
)
from nats.js.errors import NotFoundError

from shared.js_adapter import connection
from shared.partitions import partition
from shared.settings import AGENT_ID_PATTERN, Settings, load_settings

log = logging.getLogger(__name__)

MAX_TX_BYTES = 256 * 1024

# What a publish can fail with when NATS is away or slow: retry these, let bugs surface.
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)
DAY = 86400.0


class StreamSettings(msgspec.Struct, frozen=True):
    """How the two streams are shaped, from the settings of one name each: how much each may
    hold (-1: no limit; PFLEA_TX_MAX_MSGS, PFLEA_TX_MAX_BYTES, PFLEA_EVENTS_MAX_MSGS,
    PFLEA_EVENTS_MAX_BYTES), their copies in a cluster (PFLEA_STREAM_REPLICAS) and PFLEA_TX's
    partitions (PFLEA_WRITER_PARTITIONS)."""

    tx_max_msgs: int = -1
    tx_max_bytes: int = -1
    events_max_msgs: int = -1
    events_max_bytes: int = -1
    replicas: int = 1
    partitions: int = 1

    @classmethod
    def of(cls, settings: Settings | None = None) -> StreamSettings:
        """What ``settings`` say; by default this process's environment's."""
        s = settings or load_settings()
        return cls(
            s.tx_max_msgs,
            s.tx_max_bytes,
            s.events_max_msgs,
            s.events_max_bytes,
            replicas=s.stream_replicas,
            partitions=s.writer_partitions,
        )


class Topology(msgspec.Struct, frozen=True):
    namespace: str = "pflea"

    @property
    def tx_stream(self) -> str:
        return f"{self.namespace.upper()}_TX"

    @property
    def events_stream(self) -> str:
        return f"{self.namespace.upper()}_EVENTS"

    def tx_subject(self, agent_id: str) -> str:
        return f"{self.namespace}.tx.{agent_id}"

    def tx_agent(self, subject: str) -> str | None:
        """The agent of a PFLEA_TX subject as stored: ``<ns>.tx.<agent>``, or with P partitions
        ``<ns>.tx.<P>.<partition>.<agent>`` where the partition is the agent's own; None if
        ``subject`` is neither (a forged partition token is not the agent's subject)."""
        prefix = f"{self.namespace}.tx."
        if not subject.startswith(prefix):
            return None
        tokens = subject[len(prefix) :].split(".")
        agent = tokens[-1]
        if not AGENT_ID_PATTERN.fullmatch(agent):
            return None
        if len(tokens) == 1:
            return agent
        if len(tokens) == 3 and all(t.isdigit() and t == str(int(t)) for t in tokens[:2]):
            count, part = int(tokens[0]), int(tokens[1])
            if count > 1 and part == partition(agent, count):
                return agent
        return None

    def tx_partition_filter(self, partitions: int, part: int) -> str:
        """The stored PFLEA_TX subjects of one partition: ``<ns>.tx.*`` when there is one."""
        if partitions == 1:
            return f"{self.namespace}.tx.*"
        return f"{self.namespace}.tx.{partitions}.{part}.*"

    def tx_transform(self, partitions: int) -> SubjectTransform | None:
        """How PFLEA_TX stores what the ingester publishes on ``<ns>.tx.<agent>`` when there are
        P > 1 partitions: ``<ns>.tx.<P>.<partition>.<agent>``, the partition computed by
        nats-server's ``partition()`` (the hash of :mod:`shared.partitions`). P is in the
        subject, so the subjects of two partition counts never overlap."""
        if partitions == 1:
            return None
        dest = f"{self.namespace}.tx.{partitions}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}"
        return SubjectTransform(src=f"{self.namespace}.tx.*", dest=dest)

    def tx_partitions(self, config: StreamConfig) -> int:
        """The number of partitions a PFLEA_TX config stores under (its transform says)."""
        transform = config.subject_transform
        if transform is None or not transform.dest:
            return 1
        count = transform.dest.removeprefix(f"{self.namespace}.tx.").split(".", 1)[0]
        if not count.isdigit():
            raise ValueError(f"PFLEA_TX's subject transform {transform.dest!r} is not one of ours")
        return int(count)

    def writer_partition_durable(self, partitions: int, part: int) -> str:
        """The writer's durable consumer of one partition: ``writer`` when there is one."""
        return self.writer_durable if partitions == 1 else f"writer-{partitions}-{part}"

    def event_subject(self, agent_id: str, event_type: str) -> str:
        return f"{self.namespace}.events.{agent_id}.{event_type}"

    def command_subject(self, agent_id: str, command: str) -> str:
        return f"{self.namespace}.cmd.{agent_id}.{command}"

    @property
    def tx_filter(self) -> str:
        return f"{self.namespace}.tx.>"

    @property
    def events_filter(self) -> str:
        return f"{self.namespace}.events.>"

    @property
    def command_filter(self) -> str:
        return f"{self.namespace}.cmd.>"

    @property
    def writer_durable(self) -> str:
        return "writer"

    def projector_durable(self, projection: str) -> str:
        return f"projector-{projection}"

    def stream_configs(
        self, duplicate_window_s: float, shape: StreamSettings | None = None
    ) -> list[StreamConfig]:
        """PFLEA_TX is the queue of transactions not yet stored: work-queue retention (the
        writer's ack, after its commit, removes a message), nothing expires, and a full stream
        refuses new publishes (the ingester waits) instead of dropping the oldest. PFLEA_EVENTS
        is derived from Postgres: limits retention, the oldest dropped when full; a projector
        that never got them catches up from the events table (services/projectors/catch_up.py);
        it takes atomic batches (the relay's).
        Each keeps ``shape.replicas`` copies in a cluster (consumers leave ``num_replicas``
        unset and follow their stream's); PFLEA_TX stores ``shape.partitions`` partitions.
        """
        limits = shape or StreamSettings.of()
        common = dict(
            storage=StorageType.FILE, duplicate_window=duplicate_window_s, num_replicas=limits.replicas
        )
        return [
            StreamConfig(
                name=self.tx_stream,
                description="Purple Flea transactions as polled, until the writer has stored them",
                subjects=[self.tx_filter],
                subject_transform=self.tx_transform(limits.partitions),
                retention=RetentionPolicy.WORK_QUEUE,
                discard=DiscardPolicy.NEW,
                max_age=0,
                max_msgs=limits.tx_max_msgs,
                max_bytes=limits.tx_max_bytes,
                max_msg_size=MAX_TX_BYTES + 4096,
                **common,  # type: ignore[arg-type]
            ),
            StreamConfig(
                name=self.events_stream,
                description="Every committed event, relayed from Postgres in position order",
                subjects=[self.events_filter],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=30 * DAY,
                max_msgs=limits.events_max_msgs,
                max_bytes=limits.events_max_bytes,
                # The relay publishes atomic batches (shared/atomic_batch.py): one fsync each.
                allow_atomic=True,
                **common,  # type: ignore[arg-type]
            ),
        ]


# A healthy server acks a pipelined publish within milliseconds. Silence this long with acks
# outstanding means they are lost: in a cluster, the stream's leader died with the proposals it
# had not replicated, and the client, connected to another node, never hears of it.
ACK_SILENCE_S = 3.0


class AcksLost(ConnectionError):
    """Publish acks outstanding will never arrive: the client reconnected, or no ack came for
    ACK_SILENCE_S (a stream leader lost in a cluster)."""


async def publish_in_order(
    js: JetStreamContext, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout: float
) -> None:
    """Publish ``(subject, payload, headers)`` in order on one connection; wait for every ack.

    Raises ``TimeoutError`` after ``timeout``, and :class:`AcksLost` as soon as the client has
    reconnected, or no ack came for ACK_SILENCE_S: an ack for a message that died with the old
    connection (or with a stream leader) never comes, so waiting out the timeout would only stall
    the caller. Retrying at once is safe (``Nats-Msg-Id``).
    """
    nc = connection(js)
    reconnects = nc.stats["reconnects"]
    futures = [await js.publish_async(subject, data, headers=headers) for subject, data, headers in messages]
    loop = asyncio.get_running_loop()
    deadline = heard = loop.time()
    deadline += timeout
    pending: set[asyncio.Future[PubAck]] = set(futures)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=min(0.25, max(deadline - loop.time(), 0)))
            refused = [exc for exc in (f.exception() for f in done if not f.cancelled()) if exc is not None]
            if refused:
                raise refused[0]  # each retrieved, so none is logged as never retrieved
            if done:
                heard = loop.time()
            if pending and nc.stats["reconnects"] != reconnects:
                raise AcksLost(f"reconnected with {len(pending)} publish acks outstanding")
            if pending and loop.time() - heard > ACK_SILENCE_S:
                raise AcksLost(f"no publish ack for {ACK_SILENCE_S}s with {len(pending)} outstanding")
            if pending and loop.time() >= deadline:
                raise TimeoutError(f"{len(pending)} publish acks missing after {timeout}s")
    finally:
        for future in pending:
            future.cancel()  # frees its slot in the client's pending-publish limit


async def publish_acked(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str], timeout: float
) -> PubAck:
    """Publish one message and wait for its ack; raise what the server answers instead.

    For a stream that refuses publishes when full (PFLEA_TX): a caller that publishes a page's
    messages one at a time, each acked before the next, never has a later message accepted
    after an earlier one was refused. (nats-py 2.16's ``publish_async`` cannot report a refusal
    anyway: its reply handler raises the server's error instead of setting it on the future,
    which then waits out its timeout.) Raises :class:`AcksLost` as soon as the client has
    reconnected, as :func:`publish_in_order` does.
    """
    nc = connection(js)
    reconnects = nc.stats["reconnects"]
    ack = asyncio.ensure_future(js.publish(subject, payload, timeout=timeout, headers=headers))
    try:
        while not (await asyncio.wait({ack}, timeout=0.25))[0]:
            if nc.stats["reconnects"] != reconnects:
                raise AcksLost("reconnected while a publish ack was outstanding")
        return ack.result()
    finally:
        ack.cancel()


class StreamMissing(RuntimeError):
    """A stream this service needs does not exist, and its NATS user may not create it."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} is missing: run `pflea migrate`")
        self.stream = stream


async def ensure_streams(
    js: JetStreamContext, topology: Topology, duplicate_window_s: float, shape: StreamSettings | None = None
) -> None:
    """What a service does at start: create a missing stream, never change an existing one.

    Only ``pflea migrate`` and ``pflea up`` (:func:`declare_streams`, as the admin user) change a
    stream's config; a service's NATS user may not even create one, and then a missing stream
    raises :class:`StreamMissing`. (A server without accounts, as in the tests, lets it.)
    """
    for config in topology.stream_configs(duplicate_window_s, shape):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            await _create(js, config, patience_s=0)  # the service's own loop asks again


async def declare_streams(
    js: JetStreamContext,
    topology: Topology,
    duplicate_window_s: float,
    shape: StreamSettings | None = None,
    *,
    drain_wait_s: float = 60.0,
) -> list[str]:
    """Create the streams, or bring an existing one's config up to date (the admin's job).

    A stream whose retention must change (a PFLEA_TX from before work-queue retention) is
    re-created once its consumers have stored everything (:mod:`shared.retention_change`).
    Returns what could not be done yet, each a sentence saying what to do.
    """
    from shared.retention_change import change_retention

    shape = shape or StreamSettings.of()
    deferred: list[str] = []
    for config in topology.stream_configs(duplicate_window_s, shape):
        try:
            info = await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            try:
                await _create(js, config)
            except StreamMissing:
                raise PermissionError(f"this NATS user may not create stream {config.name}") from None
            continue
        if info.config.retention != config.retention:
            if note := await change_retention(js, info, config, drain_wait_s=drain_wait_s):
                deferred.append(note)
            continue
        if config.name == topology.tx_stream:
            await _keep_partitions_consumed(js, topology, shape.partitions)
        await js.update_stream(config)
        log.info("declared stream %s", config.name)
    return deferred


async def _keep_partitions_consumed(js: JetStreamContext, topology: Topology, partitions: int) -> None:
    """Before PFLEA_TX's partition count changes, every partition of the count it has now gets
    its writer consumer (filtering only that partition's subjects), so what it holds is drained
    by the writers (services/writer/partitions.py) before they append under the new count."""
    info = await js.stream_info(topology.tx_stream)
    current = topology.tx_partitions(info.config)
    if current == partitions:
        return
    for part in range(current):
        config = writer_consumer_config(topology, current, part, ack_wait_s=30.0)
        try:
            existing = await js.consumer_info(topology.tx_stream, config.durable_name)  # type: ignore[arg-type]
        except NotFoundError:
            existing = None
        if existing is None or existing.config.filter_subject != config.filter_subject:
            await js.add_consumer(topology.tx_stream, config)
    log.info("PFLEA_TX: %d partitions become %d", current, partitions)


CREATE_PATIENCE_S = 60.0
"""How long a stream create is asked again while it times out (see :func:`_create`)."""


async def _create(
    js: JetStreamContext, config: StreamConfig, *, patience_s: float = CREATE_PATIENCE_S
) -> None:
    """Create the stream, asking again while the request times out.

    A replicated stream's create is answered once its Raft group has elected a leader; on a
    cluster that has just formed, or a busy machine, that can outlast the request's timeout
    while the create goes through. A cluster between meta leaders answers 503. Asking again
    with the same config is safe: the server takes an equal create of a stream it has (or is
    making) as the same one, and answers when it is ready."""
    assert config.name is not None
    nc = connection(js)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while True:
        try:
            await js.add_stream(config)
            break
        except TimeoutError:
            # A refused publish only sends -ERR (to the error callback): the request times out.
            refused = nc.last_error is not None and "permissions violation" in str(nc.last_error).lower()
            if refused and "STREAM.CREATE" in str(nc.last_error).upper():
                raise StreamMissing(config.name) from None
            if loop.time() >= deadline:
                raise
            log.warning("creating stream %s timed out; asking again", config.name)
        except nats.js.errors.ServiceUnavailableError as exc:
            # 503 with an error code: the cluster has no meta leader for now. Without one, no
            # JetStream answered at all (not enabled): asking again would not help.
            if exc.err_code is None or loop.time() >= deadline:
                raise
            log.warning("creating stream %s: %s; asking again", config.name, exc.description)
            await asyncio.sleep(0.5)
    log.info("created stream %s", config.name)


def pull_consumer_config(
    durable: str,
    filter_subject: str,
    *,
    ack_wait_s: float,
    max_deliver: int,
    max_ack_pending: int = 20000,
) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=durable,
        filter_subject=filter_subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=max_ack_pending,
        max_waiting=512,
    )


def writer_consumer_config(
    topology: Topology, partitions: int, part: int, *, ack_wait_s: float
) -> ConsumerConfig:
    """The writer's durable consumer of one partition of PFLEA_TX."""
    return pull_consumer_config(
        topology.writer_partition_durable(partitions, part),
        topology.tx_partition_filter(partitions, part),
        ack_wait_s=ack_wait_s,
        # JetStream never gives up on a message (it would sit unacked, unseen): the writer
        # counts its own attempts and quarantines at PFLEA_WRITER_MAX_DELIVER.
        max_deliver=-1,
    )


def delivery(msg: Msg) -> tuple[int, int]:
    """(stream sequence, times delivered) of a JetStream message, read off its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``):
    the two numbers the hot paths need, without building nats-py's Metadata for each message."""
    stream_seq, delivered, _ = delivery_numbers(msg)
    return stream_seq, delivered


def delivery_numbers(msg: Msg) -> tuple[int, int, int]:
    """(stream sequence, times delivered, consumer sequence): the consumer numbers every
    delivery, a redelivery too, so a puller that sees consecutive numbers was handed all."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[4]), int(tokens[6])
    meta = msg.metadata  # the longer form, with a domain and an account hash
    return meta.sequence.stream, meta.num_delivered, meta.sequence.consumer


async def ack_all(msgs: list[Msg]) -> None:
    """Ack each message in turn: an ack is a buffered publish, so a plain loop is far cheaper
    than a task per message. A failed ack only means a redelivery, which consumers absorb."""
    for msg in msgs:
        try:  # noqa: SIM105 -- the hot path: try/except is ~20x cheaper than contextlib.suppress
            await msg.ack()
        except NATS_ERRORS:
            pass


# --- the ingesters' membership bucket (shared/membership.py) -------------------------------------


def ingest_bucket(topology: Topology) -> str:
    """The KV bucket where ingester replicas lease their slots: ``<NAMESPACE>_INGEST``."""
    return f"{topology.namespace.upper()}_INGEST"


def ingest_bucket_config(topology: Topology, lease_ttl_s: float, replicas: int = 1) -> StreamConfig:
    """The bucket's stream, as nats-py's ``create_key_value`` makes one, with ``max_age`` = the
    lease TTL and subject delete markers, so that a watcher sees a lease or a member expire;
    ``replicas`` copies in a cluster, as the streams (PFLEA_STREAM_REPLICAS)."""
    bucket = ingest_bucket(topology)
    return StreamConfig(
        name=f"KV_{bucket}",
        description="Ingester replicas: member heartbeats and slot leases (expire after max_age)",
        subjects=[f"$KV.{bucket}.>"],
        allow_direct=True,
        allow_rollup_hdrs=True,
        allow_msg_ttl=True,
        deny_delete=True,
        discard=DiscardPolicy.NEW,
        duplicate_window=min(lease_ttl_s, 120.0),
        max_age=lease_ttl_s,
        max_msgs_per_subject=1,
        max_msgs=-1,
        max_consumers=-1,
        storage=StorageType.FILE,
        num_replicas=replicas,
        subject_delete_marker_ttl=max(1.0, lease_ttl_s),
    )


async def ensure_ingest_bucket(
    js: JetStreamContext, topology: Topology, lease_ttl_s: float, replicas: int = 1
) -> None:
    """Create the bucket when it is missing, never change it (as :func:`ensure_streams`)."""
    config = ingest_bucket_config(topology, lease_ttl_s, replicas)
    try:
        await js.stream_info(config.name)  # type: ignore[arg-type]
    except NotFoundError:
        await _create(js, config)


async def declare_ingest_bucket(
    js: JetStreamContext, topology: Topology, lease_ttl_s: float, replicas: int = 1
) -> str:
    """Create the bucket or bring its config up to date (the admin's job); its stream's name."""
    config = ingest_bucket_config(topology, lease_ttl_s, replicas)
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await _create(js, config)
        except StreamMissing:
            raise PermissionError(f"this NATS user may not create stream {config.name}") from None
    else:
        await js.update_stream(config)
        log.info("declared stream %s", config.name)
    return config.name

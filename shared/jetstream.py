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
)
from nats.js.errors import NotFoundError

from shared.js_adapter import connection
from shared.settings import AGENT_ID_PATTERN

log = logging.getLogger(__name__)

MAX_TX_BYTES = 256 * 1024

# What a publish can fail with when NATS is away or slow: retry these, let bugs surface.
NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, TimeoutError, ConnectionError)
DAY = 86400.0


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
        """The agent of a PFLEA_TX subject, ``<ns>.tx.<agent>``; None if ``subject`` is none."""
        prefix = f"{self.namespace}.tx."
        agent = subject.removeprefix(prefix)
        return agent if subject.startswith(prefix) and AGENT_ID_PATTERN.fullmatch(agent) else None

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

    def stream_configs(self, duplicate_window_s: float) -> list[StreamConfig]:
        common = dict(
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            duplicate_window=duplicate_window_s,
            num_replicas=1,
        )
        return [
            StreamConfig(
                name=self.tx_stream,
                description="Purple Flea transactions as polled, before they are events",
                subjects=[self.tx_filter],
                max_age=7 * DAY,
                max_msg_size=MAX_TX_BYTES + 4096,
                **common,  # type: ignore[arg-type]
            ),
            StreamConfig(
                name=self.events_stream,
                description="Every committed event, relayed from Postgres in position order",
                subjects=[self.events_filter],
                max_age=30 * DAY,
                **common,  # type: ignore[arg-type]
            ),
        ]


class AcksLost(ConnectionError):
    """The client reconnected while publish acks were outstanding; some will never arrive."""


async def publish_in_order(
    js: JetStreamContext, messages: Sequence[tuple[str, bytes, dict[str, str]]], timeout: float
) -> None:
    """Publish ``(subject, payload, headers)`` in order on one connection; wait for every ack.

    Raises ``TimeoutError`` after ``timeout``, and :class:`AcksLost` as soon as the client has
    reconnected: an ack for a message that died with the old connection never comes, so waiting
    out the timeout would only stall the caller. Retrying at once is safe (``Nats-Msg-Id``).
    """
    nc = connection(js)
    reconnects = nc.stats["reconnects"]
    futures = [await js.publish_async(subject, data, headers=headers) for subject, data, headers in messages]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending: set[asyncio.Future[PubAck]] = set(futures)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=min(0.25, max(deadline - loop.time(), 0)))
            for future in done:
                future.result()  # a refused publish raises here
            if pending and nc.stats["reconnects"] != reconnects:
                raise AcksLost(f"reconnected with {len(pending)} publish acks outstanding")
            if pending and loop.time() >= deadline:
                raise TimeoutError(f"{len(pending)} publish acks missing after {timeout}s")
    finally:
        for future in pending:
            future.cancel()  # frees its slot in the client's pending-publish limit


class StreamMissing(RuntimeError):
    """A stream this service needs does not exist, and its NATS user may not create it."""

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} is missing: run `pflea migrate`")
        self.stream = stream


async def ensure_streams(js: JetStreamContext, topology: Topology, duplicate_window_s: float) -> None:
    """What a service does at start: create a missing stream, never change an existing one.

    Only ``pflea migrate`` and ``pflea up`` (:func:`declare_streams`, as the admin user) change a
    stream's config; a service's NATS user may not even create one, and then a missing stream
    raises :class:`StreamMissing`. (A server without accounts, as in the tests, lets it.)
    """
    for config in topology.stream_configs(duplicate_window_s):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            await _create(js, config)


async def declare_streams(js: JetStreamContext, topology: Topology, duplicate_window_s: float) -> None:
    """Create the streams, or bring an existing one's config up to date (the admin's job)."""
    for config in topology.stream_configs(duplicate_window_s):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except NotFoundError:
            try:
                await _create(js, config)
            except StreamMissing:
                raise PermissionError(f"this NATS user may not create stream {config.name}") from None
        else:
            await js.update_stream(config)
            log.info("declared stream %s", config.name)


async def _create(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    nc = connection(js)
    try:
        await js.add_stream(config)
    except TimeoutError:
        # A refused publish only sends -ERR (to the error callback): the request times out.
        refused = nc.last_error is not None and "permissions violation" in str(nc.last_error).lower()
        if refused and "STREAM.CREATE" in str(nc.last_error).upper():
            raise StreamMissing(config.name) from None
        raise
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


def delivery(msg: Msg) -> tuple[int, int]:
    """(stream sequence, times delivered) of a JetStream message, read off its ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``):
    the two numbers the hot paths need, without building nats-py's Metadata for each message."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[1] == "ACK":
        return int(tokens[5]), int(tokens[4])
    meta = msg.metadata  # the longer form, with a domain and an account hash
    return meta.sequence.stream, meta.num_delivered


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


def ingest_bucket_config(topology: Topology, lease_ttl_s: float) -> StreamConfig:
    """The bucket's stream, as nats-py's ``create_key_value`` makes one, with ``max_age`` = the
    lease TTL and subject delete markers, so that a watcher sees a lease or a member expire."""
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
        num_replicas=1,
        subject_delete_marker_ttl=max(1.0, lease_ttl_s),
    )


async def ensure_ingest_bucket(js: JetStreamContext, topology: Topology, lease_ttl_s: float) -> None:
    """Create the bucket when it is missing, never change it (as :func:`ensure_streams`)."""
    config = ingest_bucket_config(topology, lease_ttl_s)
    try:
        await js.stream_info(config.name)  # type: ignore[arg-type]
    except NotFoundError:
        await _create(js, config)


async def declare_ingest_bucket(js: JetStreamContext, topology: Topology, lease_ttl_s: float) -> str:
    """Create the bucket or bring its config up to date (the admin's job); its stream's name."""
    config = ingest_bucket_config(topology, lease_ttl_s)
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

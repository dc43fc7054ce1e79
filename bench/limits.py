"""The machine's limits, measured in the same run as the figures compared to them.

- **raw COPY**: ``copy_records_to_table`` of the writer's own rows (the same transactions, the
  same JSON) into a plain table with the columns, constraints and indexes of ``events`` but no
  triggers, one transaction per ``PFLEA_WRITER_BATCH_SIZE`` rows on one connection, as the
  writer commits: what Postgres can absorb with nothing of ours in the way.
- **JetStream publish**: ``limit_messages`` messages of one transaction each (subject per
  agent, ``Nats-Msg-Id``; the size of what the relay publishes per event), published with
  ``publish_async`` (pipelined, up to 4,000 in flight), every ack awaited.
- **JetStream atomic batch publish**: the same messages on PFLEA_EVENTS subjects as atomic
  batches of 1,000 (``shared.atomic_batch.publish_atomic``, as the relay publishes), each
  committed before the next is sent.
- **JetStream consume**: a durable pull consumer configured as the writer's, read the way the
  services read it (``shared.consumer.PullStream``: one pull request always open, batches of
  ``Settings.messages_per_writer_pull()`` taken from its buffer) and an ack per message, until
  every message is acked; nothing is done with the messages. (nats-py's own ``fetch(1000)``
  loop is slower: it spends a task, a uuid4 and a ``wait_for`` per message.)
"""

from __future__ import annotations

import time

import nats
from nats.aio.client import Client

from bench.harness import Harness, delete_streams
from bench.report import Figure
from bench.servers import nats_with_default_sync
from bench.workload import publish_tx
from shared.atomic_batch import MAX_BATCH, publish_atomic
from shared.consumer import PullStream
from shared.db import connect
from shared.jetstream import StreamSettings, Topology, ack_all, ensure_streams, pull_consumer_config
from shared.js_adapter import api_prefix
from shared.nats_url import parse_nats_url
from shared.settings import Settings
from shared.store import EVENT_COLUMNS

BATCH = Settings().writer_batch_size  # rows per transaction, as the writer commits
PULL_BATCH = Settings().messages_per_writer_pull()  # as the writer pulls


async def raw_copy(h: Harness) -> Figure:
    records = h.workload().copy_records()
    url = await h.servers.new_database("limits")
    conn = await connect(url)
    try:
        await conn.execute("CREATE TABLE raw_events (LIKE events INCLUDING ALL)")  # no triggers
        # ... so nothing computes the hash chain: what Postgres does without that work.
        await conn.execute("ALTER TABLE raw_events ALTER COLUMN hash DROP NOT NULL")
        started = time.perf_counter()
        for i in range(0, len(records), BATCH):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "raw_events", records=records[i : i + BATCH], columns=EVENT_COLUMNS
                )
        seconds = time.perf_counter() - started
    finally:
        await conn.close()
        await h.servers.drop_database(url)
    return Figure(
        "limits",
        "raw COPY",
        len(records) / seconds,
        "events/s",
        note=f"{len(records):,} rows in {BATCH}-row transactions into a trigger-free copy of events",
    )


async def publish_and_consume(
    url: str, h: Harness, consume: bool, replicas: int = 1
) -> tuple[float, float | None]:
    """(msgs/s published, msgs/s consumed) on the server(s) at ``url``, in a namespace of its own,
    on streams of ``replicas`` copies."""
    topology = Topology(h.namespace("lim"))
    messages = h.workload().single_messages()[: h.sizes.limit_messages]
    nc = await nats.connect(**parse_nats_url(url).connect_options())
    try:
        js = nc.jetstream()
        await ensure_streams(js, topology, 120, StreamSettings(replicas=replicas))
        published = len(messages) / await publish_tx(js, topology, messages)
        consumed = None
        if consume:
            seconds = await consume_seconds(nc, topology.tx_stream, topology.tx_filter, len(messages))
            consumed = len(messages) / seconds
        await delete_streams(nc, topology)
    finally:
        await nc.close()
    return published, consumed


async def atomic_batch_publish(h: Harness) -> float:
    """Messages/s published as atomic batches on PFLEA_EVENTS, in a namespace of its own."""
    topology = Topology(h.namespace("lim"))
    messages = h.workload().single_messages()[: h.sizes.limit_messages]
    nc = await nats.connect(**parse_nats_url(h.servers.nats_url).connect_options())
    try:
        js = nc.jetstream()
        await ensure_streams(js, topology, 120, StreamSettings())
        no_headers: dict[str, str] = {}
        batch = [(topology.event_subject(m.agent_id, "Transaction"), m.payload, no_headers) for m in messages]
        started = time.perf_counter()
        for i in range(0, len(batch), MAX_BATCH):
            await publish_atomic(js, batch[i : i + MAX_BATCH], timeout=60)
        seconds = time.perf_counter() - started
        await delete_streams(nc, topology)
    finally:
        await nc.close()
    return len(messages) / seconds


async def consume_seconds(nc: Client, stream: str, subject: str, total: int) -> float:
    """Seconds for a new durable pull consumer to deliver and ack ``total`` messages of
    ``stream``, read as the services read: what nats-py can do with nothing done with them."""
    js = nc.jetstream()
    durable = "bench-limit"
    config = pull_consumer_config(durable, subject, ack_wait_s=30, max_deliver=10)
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
    await sub.unsubscribe()  # only the consumer is wanted
    pulls = PullStream(nc, api_prefix(js), stream, durable, batch=PULL_BATCH)
    started = time.perf_counter()
    await pulls.start()
    consumed = 0
    while consumed < total:
        msgs = await pulls.take(timeout=5)
        if not msgs:
            raise RuntimeError(f"consumer stalled after {consumed} of {total} messages")
        await ack_all(msgs)
        consumed += len(msgs)
    await nc.flush()
    seconds = time.perf_counter() - started
    await pulls.stop()
    await js.delete_consumer(stream, durable)
    return seconds


async def jetstream(h: Harness) -> list[Figure]:
    n = min(h.sizes.limit_messages, len(h.workload()))
    published, consumed = await publish_and_consume(h.servers.nats_url, h, consume=True)
    batched = await atomic_batch_publish(h)
    async with nats_with_default_sync(h.servers) as relaxed_servers:
        relaxed, _ = await publish_and_consume(relaxed_servers.nats_url, h, consume=False)
    return [
        Figure("limits", "JetStream publish", published, "msgs/s", note=f"{n:,} one-transaction messages"),
        Figure(
            "limits",
            "JetStream atomic batch publish",
            batched,
            "msgs/s",
            note=f"the same {n:,} messages as atomic batches of {MAX_BATCH:,} (one fsync each)",
        ),
        Figure(
            "limits",
            "JetStream consume",
            consumed,
            "msgs/s",
            note=f"{n:,} messages, pulled as the services pull (batches of {PULL_BATCH:,}), ack each",
        ),
        Figure(
            "limits",
            "JetStream publish, sync_interval 2 min",
            relaxed,
            "msgs/s",
            note="for comparison only: nats-server's default fsync interval instead of the embedded "
            "`sync_interval: always` every other figure runs with",
        ),
    ]


async def run(h: Harness) -> None:
    h.add(await raw_copy(h))
    for figure in await jetstream(h):
        h.add(figure)

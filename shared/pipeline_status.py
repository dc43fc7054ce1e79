"""Is the pipeline keeping up? What ``pflea status`` prints and the explorer's operations page shows."""

from __future__ import annotations

from typing import Any

import asyncpg
import nats.js.errors
from nats.aio.client import Client

from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS


async def jetstream_status(nc: Client, topo: Topology) -> dict[str, Any]:
    """The two streams and the pipeline's durable consumers; None where one does not exist."""
    js = nc.jetstream()
    streams: list[dict[str, Any]] = []
    partitions = 1
    for name in (topo.tx_stream, topo.events_stream):
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            streams.append({"stream": name, "messages": None, "bytes": None, "last_seq": None})
            continue
        state = info.state
        streams.append(
            {"stream": name, "messages": state.messages, "bytes": state.bytes, "last_seq": state.last_seq}
        )
        if name == topo.tx_stream:
            partitions = topo.tx_partitions(info.config)
    wanted = [(topo.tx_stream, topo.writer_partition_durable(partitions, p)) for p in range(partitions)]
    wanted += [(topo.events_stream, topo.projector_durable(name)) for name in PROJECTIONS]
    consumers: list[dict[str, Any]] = []
    for stream, durable in wanted:
        try:
            c = await js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            consumers.append({"stream": stream, "consumer": durable, "pending": None, "ack_pending": None})
            continue
        consumers.append(
            {
                "stream": stream,
                "consumer": durable,
                "pending": c.num_pending,  # not yet delivered: the lag
                "ack_pending": c.num_ack_pending,  # delivered, not yet acknowledged
                "redelivered": c.num_redelivered,
            }
        )
    return {"streams": streams, "consumers": consumers}


async def database_status(pool: asyncpg.Pool) -> dict[str, Any]:
    """Projection freshness, tailers' checkpoints, quarantine and command counts."""
    projections = await pool.fetch(
        """SELECT projection, applied_position, log_position, lag_events, lag_seconds, applied_event_at,
                  updated_at
           FROM projection_status ORDER BY projection"""
    )
    tailers = await pool.fetch(
        "SELECT kind, name, position, lag_events, lag_seconds, updated_at FROM tailer_status ORDER BY 1, 2"
    )
    streams = await pool.fetch(
        """SELECT projection, count(*) AS streams, coalesce(sum(version), 0) AS events
           FROM projection_checkpoints GROUP BY projection ORDER BY projection"""
    )
    quarantined = await pool.fetch(
        """SELECT source, count(*) AS entries, sum(seen_count) AS seen
           FROM quarantine GROUP BY source ORDER BY 1"""
    )
    commands = await pool.fetch(
        "SELECT command_type, accepted, count(*) AS n FROM command_results GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return {
        "projections": [dict(r) for r in projections],
        "checkpoints": {
            "tailers": [dict(r) for r in tailers],
            "projection_streams": [dict(r) for r in streams],
        },
        "quarantine": {
            "entries": sum(r["entries"] for r in quarantined),
            "by_source": [dict(r) for r in quarantined],
        },
        "commands": [dict(r) for r in commands],
    }

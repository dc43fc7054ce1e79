"""``pflea status`` (is the pipeline keeping up?) and ``pflea quarantine`` (what could not be stored)."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from services.cli.connections import (
    OK,
    REFUSED,
    UNREACHABLE,
    Unreachable,
    connect_nats,
    run,
    settings,
    topology,
    with_pool,
)
from services.cli.render import fail, print_json, print_table
from shared.jetstream import Topology
from shared.projections.registry import PROJECTIONS


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="streams, consumer lag, projection freshness, checkpoints, quarantine")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: run(lambda: _status(args)))
    p = sub.add_parser("quarantine", help="inputs that could not become events, with the reason")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="the newest entries (the default)")
    what.add_argument("--show", type=int, metavar="ID", help="one entry with its raw payload")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: run(lambda: _quarantine(args)))


async def _jetstream(nc: Client, topo: Topology) -> dict[str, Any]:
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


async def _database(pool: asyncpg.Pool) -> dict[str, Any]:
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


async def _status(args: argparse.Namespace) -> int:
    s = settings()
    report: dict[str, Any] = await with_pool(s, _database)
    code = OK
    try:
        nc = await connect_nats(s)
        try:
            report.update(await _jetstream(nc, topology(s)))
        finally:
            await nc.close()
    except (Unreachable, nats.errors.Error, TimeoutError) as exc:
        report["nats_error"] = str(exc)
        code = UNREACHABLE
    if args.json:
        print_json(report)
    else:
        _print_status(report)
    return code


def _print_status(r: dict[str, Any]) -> None:
    if "nats_error" in r:
        print(f"NATS: {r['nats_error']}")
    else:
        print("Streams")
        print_table(["stream", "messages", "bytes", "last_seq"], [list(x.values()) for x in r["streams"]])
        print("\nConsumers")
        columns = ["stream", "consumer", "pending", "ack_pending"]
        print_table(columns, [[x.get(c) for c in columns] for x in r["consumers"]])
    print("\nProjections")
    columns = [
        "projection",
        "applied_position",
        "log_position",
        "lag_events",
        "lag_seconds",
        "applied_event_at",
    ]
    print_table(columns, [[x[c] for c in columns] for x in r["projections"]])
    print("\nCheckpoints")
    columns = ["kind", "name", "position", "lag_events", "lag_seconds", "updated_at"]
    print_table(columns, [[x[c] for c in columns] for x in r["checkpoints"]["tailers"]])
    print_table(
        ["projection", "streams", "events"],
        [list(x.values()) for x in r["checkpoints"]["projection_streams"]],
    )
    print(f"\nQuarantine: {r['quarantine']['entries']} entries")
    for x in r["quarantine"]["by_source"]:
        print(f"  {x['source']}: {x['entries']} entries, seen {x['seen']} times")
    if r["commands"]:
        print("\nCommands")
        print_table(["command", "accepted", "count"], [list(x.values()) for x in r["commands"]])


async def _quarantine(args: argparse.Namespace) -> int:
    async def body(pool: asyncpg.Pool) -> int:
        if args.show is not None:
            row = await pool.fetchrow("SELECT * FROM quarantine WHERE id = $1", args.show)
            if row is None:
                return fail(
                    f"quarantine: no entry {args.show} (pflea quarantine --list shows the ids)", REFUSED
                )
            _print_entry(dict(row), args.json)
            return OK
        rows = await pool.fetch(
            """SELECT id, source, agent_id, seen_count, received_at, reason FROM quarantine
               ORDER BY id DESC LIMIT $1""",
            args.limit,
        )
        if args.json:
            print_json({"quarantine": [dict(r) for r in rows]})
        else:
            columns = ["id", "source", "agent_id", "seen_count", "received_at", "reason"]
            table = [[r[c] if c != "reason" else r[c][:100] for c in columns] for r in rows]
            print_table(columns, table, empty="(quarantine is empty)")
        return OK

    result: int = await with_pool(settings(), body)
    return result


def _print_entry(entry: dict[str, Any], as_json: bool) -> None:
    raw = bytes(entry.pop("raw"))
    try:
        entry["raw"], entry["raw_encoding"] = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        entry["raw"], entry["raw_encoding"] = base64.b64encode(raw).decode(), "base64"
    if as_json:
        print_json(entry)
        return
    for key, value in entry.items():
        if key != "raw":
            print(f"{key}: {value}")
    print(f"raw ({len(raw)} bytes):")
    print(entry["raw"])

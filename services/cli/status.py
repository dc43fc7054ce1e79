"""``pflea status`` (is the pipeline keeping up?) and ``pflea quarantine`` (what could not be stored)."""

from __future__ import annotations

import argparse
import base64
from typing import Any

import asyncpg
import nats.errors

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
from shared.pipeline_status import database_status, jetstream_status


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


async def _status(args: argparse.Namespace) -> int:
    s = settings()
    report: dict[str, Any] = await with_pool(s, database_status)
    code = OK
    try:
        nc = await connect_nats(s)
        try:
            report.update(await jetstream_status(nc, topology(s)))
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

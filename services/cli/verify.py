"""``pflea verify``: is the stored history the history that was written (and published)?

Exit 0 when every chain holds, 1 on any break (each stream's first broken link is listed with
its version, and the expected and stored hashes where they differ), 3 when the ledger cannot be
reached. ``--against-stream`` also compares every stored hash with the one subscribers were sent
on PFLEA_EVENTS: it needs a NATS user that may read that stream through a consumer (``admin``;
beside ``pflea up`` it is taken from the data folder).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import asyncpg
import msgspec

from services.cli.connections import OK, REFUSED, connect_nats, run, settings, topology, with_pool
from services.cli.render import print_json, print_table
from shared.chain import Verification, published_hashes, verify_against_published, verify_chains
from shared.nats_auth import user_url
from shared.settings import Settings
from shared.stack import read_stack


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("verify", help="recompute every stream's hash chain; exit 1 on a break")
    p.add_argument("agents", nargs="*", help="only these streams (default: all)")
    p.add_argument("--since", type=int, default=0, metavar="POSITION", help="check links after this position")
    p.add_argument(
        "--against-stream",
        action="store_true",
        help="also compare stored hashes with those published on PFLEA_EVENTS",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=lambda args: run(lambda: _verify(args)))


async def _verify(args: argparse.Namespace) -> int:
    s = settings()
    started = time.perf_counter()

    async def check(pool: asyncpg.Pool) -> Verification:
        async with pool.acquire() as conn:
            await conn.execute("SET statement_timeout = 0")  # a whole-log scan is the point here
            result = await verify_chains(conn, args.agents or None, since=args.since)
            if args.against_stream:
                nc = await connect_nats(_admin(s))
                try:
                    published = await published_hashes(nc.jetstream(), topology(s), args.agents or None)
                finally:
                    await nc.close()
                await verify_against_published(conn, published, result)
            return result

    result: Verification = await with_pool(s, check)
    seconds = time.perf_counter() - started
    if args.json:
        print_json({**msgspec.to_builtins(result), "intact": result.intact, "seconds": round(seconds, 3)})
    else:
        published = f", {result.published_checked:,} against PFLEA_EVENTS" if args.against_stream else ""
        print(
            f"checked {result.events:,} events in {result.streams:,} streams{published} "
            f"in {seconds:.1f}s: {'intact' if result.intact else f'{len(result.breaks)} broken'}"
        )
        if result.breaks:
            rows = [[b.stream_id, b.version, b.reason, b.expected, b.stored] for b in result.breaks]
            print_table(["stream", "version", "break", "expected", "stored"], rows)
    return OK if result.intact else REFUSED


def _admin(s: Settings) -> Settings:
    """NATS_URL as given; else, beside `pflea up`, its admin user (the operator may not read
    PFLEA_EVENTS through a consumer)."""
    if os.environ.get("NATS_URL"):
        return s
    stack = read_stack(s.data_dir)
    users = s.data_dir / "nats" / "users.json"
    if stack is None or not users.exists():
        return s
    password = json.loads(users.read_text()).get("admin")
    if not password:
        return s
    return msgspec.structs.replace(s, nats_url=user_url(stack.nats_url, "admin", password))

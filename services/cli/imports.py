"""``pflea import sqlite PATH [--dry-run] [--feed NAME]``: bring the article's event store in.

It appends to the log, so it connects as the role that appends: ``pflea_writer`` (INSERT and
SELECT on ``events``, the quarantine, the append lock; no table of its own, no UPDATE or DELETE
of an event). DATABASE_URL must name that role; under ``pflea up`` its URL is made from the
stack's secrets. ``--dry-run`` reads only the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import asyncpg

from services.cli.connections import OK, USAGE, Unreachable, run
from services.cli.credentials import secrets_folder
from services.cli.render import fail
from services.importer.article import Origin
from services.importer.run import QUARANTINE_SOURCE, ImportReport, LedgerSink, import_file, render
from services.importer.sqlite_file import ArticleFile, NotAnArticleStore
from shared.db import WRITER_ROLE, role_dsn, service_pool
from shared.quarantine import Quarantine
from shared.service import require, tune_gc
from shared.settings import CASINO_FEED, load_settings
from shared.stack import read_stack
from shared.store import EventStore
from shared.unreachable import ServerUnreachable, redacted_url


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("import", help="bring history in from another event store")
    kinds = p.add_subparsers(dest="kind", required=True)
    s = kinds.add_parser(
        "sqlite",
        help="the article's SQLite EventStore file: every stream appended in order, as pflea_writer "
        "(DATABASE_URL); importing it again doubles nothing",
    )
    s.add_argument("path", type=Path, help="the SQLite file (tables events and snapshots)")
    s.add_argument(
        "--dry-run", action="store_true", help="read and report only: counts, rows it would quarantine"
    )
    s.add_argument(
        "--feed",
        default=CASINO_FEED,
        help=f"the feed the file's transactions were read from (default {CASINO_FEED}): "
        "part of their identity",
    )
    s.set_defaults(func=_import_sqlite)


def _import_sqlite(args: argparse.Namespace) -> int:
    try:
        article = ArticleFile(args.path)
    except NotAnArticleStore as exc:
        return fail(str(exc), USAGE)
    origin = Origin(file=args.path.name, feed=args.feed)
    tune_gc()  # a row builds many small objects, as a service's message does
    reports: list[ImportReport] = []

    async def body() -> int:
        sink = None if args.dry_run else await _ledger(writer_url(), origin)
        try:
            reports.append(await import_file(article, origin, sink))
        finally:
            if sink is not None:
                await sink.store.pool.close()
        return OK

    try:
        code = run(body)
    finally:
        article.close()
    if reports:
        print(render(reports[0]))
    return code


async def _ledger(url: str, origin: Origin) -> LedgerSink:
    try:
        pool = await service_pool(url, WRITER_ROLE, min_size=1, max_size=2)
    except (OSError, TimeoutError, asyncpg.PostgresConnectionError, ServerUnreachable) as exc:
        raise Unreachable(f"cannot reach Postgres at {redacted_url(url)} ({exc})") from None
    return LedgerSink(EventStore(pool), Quarantine(pool, QUARANTINE_SOURCE), origin.file)


def writer_url() -> str:
    """DATABASE_URL; under ``pflea up`` without it, ``pflea_writer``'s URL made from the stack's
    reader URL and the writer's password in its secrets."""
    s = load_settings()
    info = read_stack(s.data_dir)
    if s.database_url or info is None:
        return require(s.database_url, "DATABASE_URL")
    try:
        password = json.loads((secrets_folder(s.data_dir) / "postgres.json").read_text())[WRITER_ROLE]
    except (OSError, ValueError, KeyError):
        return require("", "DATABASE_URL")
    return role_dsn(info.database_url, WRITER_ROLE, password)

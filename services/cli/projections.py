"""``pflea projections rebuild NAME``."""

from __future__ import annotations

import argparse
import asyncio

from services.cli.connections import owner_settings
from services.projectors.rebuild import rebuild
from shared.projections.registry import PROJECTIONS, projection
from shared.service import require


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("projections", help="rebuild read models from the event log")
    actions = p.add_subparsers(dest="action", required=True)
    r = actions.add_parser("rebuild", help="replay the log into new tables and swap them in")
    r.add_argument("name", choices=[*PROJECTIONS, "all"])
    r.set_defaults(func=_rebuild)


def _rebuild(args: argparse.Namespace) -> int:
    settings = owner_settings()
    url = require(settings.database_url, "DATABASE_URL")
    names = list(PROJECTIONS) if args.name == "all" else [args.name]
    for name in names:
        report = asyncio.run(rebuild(url, projection(name)))
        print(
            f"{name}: {report.events} events -> {report.rows} rows in {report.seconds:.2f}s "
            f"({report.events_per_second:,.0f} events/s), at position {report.position}"
        )
    return 0

"""``pflea`` — run and inspect the ledger."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.cli import agent, events, projections, queries, status, up
from services.cli.connections import settings as cli_settings
from shared.logs import configure_logging
from shared.settings import SettingsError


def _migrate(args: argparse.Namespace) -> int:
    from shared.migrate import migrate
    from shared.service import require

    settings = cli_settings()
    url = require(settings.database_url, "DATABASE_URL")
    applied = asyncio.run(migrate(url, service_password=settings.db_service_password))
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pflea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("migrate", help="apply database migrations (as the owner in DATABASE_URL)")
    p.set_defaults(func=_migrate)
    projections.add_parser(sub)
    queries.add_parsers(sub)
    events.add_parsers(sub)
    status.add_parsers(sub)
    agent.add_parsers(sub)
    up.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging("cli", "WARNING")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"pflea: configuration error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())

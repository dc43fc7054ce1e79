"""``pflea`` — run and inspect the ledger."""

from __future__ import annotations

import argparse
import asyncio
import sys

import nats.errors
import nats.js.errors

from services.cli import agent, agents, events, imports, projections, queries, status, up, verify
from services.cli.connections import owner_settings
from shared.logs import configure_logging
from shared.settings import Settings, SettingsError, load_settings
from shared.unreachable import redacted_url


def _migrate(args: argparse.Namespace) -> int:
    from shared.migrate import MigrationError, migrate
    from shared.service import require

    # NATS_URL from the environment only: a running `pflea up` declared its streams itself, and
    # the URL its stack.json names is the read-only operator's.
    explicit_nats = load_settings().nats_url
    settings = owner_settings()
    url = require(settings.database_url, "DATABASE_URL")
    try:
        applied = asyncio.run(migrate(url))
    except MigrationError as exc:
        print(f"pflea migrate: {exc}", file=sys.stderr)
        return 2
    print(f"migrations applied: {', '.join(applied) or 'none (up to date)'}")
    if explicit_nats:
        try:
            declared = asyncio.run(_declare_streams(explicit_nats, settings))
        except (OSError, TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            host = redacted_url(explicit_nats)
            print(f"pflea migrate: could not declare the streams at {host} ({exc!r})", file=sys.stderr)
            print("  NATS_URL must name the admin user (it creates and updates streams)", file=sys.stderr)
            return 3
        streams, deferred = declared
        print(f"streams declared: {', '.join(streams)}")
        for note in deferred:
            print(f"pflea migrate: {note}", file=sys.stderr)
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    import os

    from shared.bootstrap import BootstrapError, bootstrap, passwords_from_environ
    from shared.service import require

    try:
        url = require(os.environ.get("PFLEA_SUPERUSER_URL", ""), "PFLEA_SUPERUSER_URL")
        asyncio.run(bootstrap(url, passwords_from_environ(), allow_shared=args.allow_shared_passwords))
    except BootstrapError as exc:
        print(f"pflea bootstrap: {exc}", file=sys.stderr)
        return 2
    print("bootstrapped: roles, passwords, ownership and advisory-lock privileges are in place")
    return 0


async def _declare_streams(url: str, settings: Settings) -> tuple[list[str], list[str]]:
    """Create or update the JetStream streams and the ingesters' KV bucket, as the user in
    NATS_URL (the admin): their names, and what could not be done yet (see
    shared.retention_change)."""
    from shared.jetstream import StreamSettings, Topology, declare_ingest_bucket, declare_streams
    from shared.nats_url import parse_nats_url

    servers = parse_nats_url(url).connect_options()
    nc = await nats.connect(**servers, name="pflea-migrate", connect_timeout=10, allow_reconnect=False)
    try:
        topology = Topology(settings.namespace)
        deferred = await declare_streams(
            nc.jetstream(), topology, settings.duplicate_window_s, StreamSettings.of(settings)
        )
        bucket = await declare_ingest_bucket(
            nc.jetstream(), topology, settings.ingest_lease_ttl_s, settings.stream_replicas
        )
        return [topology.tx_stream, topology.events_stream, bucket], deferred
    finally:
        await nc.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pflea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "bootstrap",
        help="as the superuser (PFLEA_SUPERUSER_URL): create the ledger's roles with the passwords in "
        "PFLEA_<ROLE>_DB_PASSWORD, hand the database to pflea_owner (run again to rotate)",
    )
    p.add_argument(
        "--allow-shared-passwords",
        action="store_true",
        help="let roles share a password (a throw-away test cluster; never in production)",
    )
    p.set_defaults(func=_bootstrap)
    p = sub.add_parser(
        "migrate",
        help="apply database migrations (as pflea_owner, DATABASE_URL); with NATS_URL (the admin "
        "user) also create or update the JetStream streams",
    )
    p.set_defaults(func=_migrate)
    projections.add_parser(sub)
    queries.add_parsers(sub)
    events.add_parsers(sub)
    status.add_parsers(sub)
    agent.add_parsers(sub)
    agents.add_parsers(sub)
    verify.add_parsers(sub)
    imports.add_parsers(sub)
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

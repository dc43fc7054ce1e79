"""``pflea agents add|remove|list``: agents' own NATS credentials.

``add`` makes a random password, keeps only its bcrypt hash in the registry, writes the agent's
credential file (the one place the password is written; its path is printed, never the
password), renders the users file the nats-server includes and has the server reload it.
``remove`` revokes: the agent's user is gone after the reload, and the server closes its
connections. The embedded server of a running ``pflea up`` is reloaded here; another server
(compose) needs its own reload (``docker compose kill -s HUP nats``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

import msgspec
import nats.errors

from services.cli.connections import OK, REFUSED, UNREACHABLE, settings
from services.cli.render import fail, print_json, print_table
from shared.agent_logins import add_login, remove_login
from shared.db import role_dsn
from shared.nats_agents import AgentError, AgentLogin, AgentRegistry, connect_agent, read_login
from shared.nats_agents import credential_path as credential_file
from shared.nats_url import without_login
from shared.private_files import new_password
from shared.settings import Settings
from shared.stack import read_stack

RELOAD_DEADLINE_S = 10.0


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agents", help="create, revoke and list agents' NATS credentials")
    p.add_argument(
        "--nats-url",
        help="the URL agents connect to, written into new credential files (default: NATS_URL or "
        "the running `pflea up`'s, without its user)",
    )
    verbs = p.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="create an agent's credentials; prints where the file is")
    add.add_argument("agent")
    add.set_defaults(func=_add)
    remove = verbs.add_parser("remove", help="revoke an agent's credentials")
    remove.add_argument("agent")
    remove.set_defaults(func=_remove)
    listing = verbs.add_parser("list", help="the agents with credentials")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_list)


def _registry(s: Settings) -> AgentRegistry:
    return AgentRegistry(s.data_dir, s.namespace)


def _add(args: argparse.Namespace) -> int:
    s = settings()
    try:
        path = _registry(s).add(args.agent, args.nats_url or _agent_url(s))
    except AgentError as exc:
        return fail(str(exc), REFUSED)
    if owner := _owner_url(s):
        password = new_password()
        role = asyncio.run(add_login(owner, args.agent, password))
        _registry(s).set_database_url(args.agent, role_dsn(owner, role, password))
        print(f"agent {args.agent}: a SQL login of its own ({role}) that reads only its rows")
    print(f"agent {args.agent}: credentials in {path} (mode 0600; it holds the agent's passwords)")
    print(f"  send commands as it:  pflea agent {args.agent} register")
    return _reload(s, read_login(path), expect_login=True)


def _owner_url(s: Settings) -> str:
    """The schema owner's URL of a running `pflea up` (its stack.json), which may create the
    agent's SQL login; elsewhere none (`shared.agent_logins` as the owner does it)."""
    stack = read_stack(s.data_dir)
    return stack.owner_database_url if stack is not None else ""


def _remove(args: argparse.Namespace) -> int:
    s = settings()
    path = credential_file(s.data_dir, args.agent)
    login = read_login(path) if path.exists() else None
    try:
        _registry(s).remove(args.agent)
    except AgentError as exc:
        return fail(str(exc), REFUSED)
    if (owner := _owner_url(s)) and asyncio.run(remove_login(owner, args.agent)):
        print(f"agent {args.agent}: its SQL login is dropped")
    print(f"agent {args.agent}: credentials revoked")
    return _reload(s, login, expect_login=False)


def _list(args: argparse.Namespace) -> int:
    s = settings()
    entries = _registry(s).entries()
    rows = [
        {
            "agent_id": agent_id,
            "created_at": entry.created_at,
            "credentials": str(credential_file(s.data_dir, agent_id))
            if credential_file(s.data_dir, agent_id).exists()
            else None,
        }
        for agent_id, entry in entries.items()
    ]
    if args.json:
        print_json({"agents": rows})
    else:
        columns = ["agent_id", "created_at", "credentials"]
        print_table(columns, [[row[c] for c in columns] for row in rows])
    return OK


def _agent_url(s: Settings) -> str:
    """Where agents reach NATS: NATS_URL or the running stack's, without the user in it."""
    return without_login(s.nats_url or f"nats://127.0.0.1:{s.embedded_nats_port}")


def _reload(s: Settings, login: AgentLogin | None, *, expect_login: bool) -> int:
    """Have the embedded nats-server of a running ``pflea up`` load the users file again."""
    stack = read_stack(s.data_dir)
    if stack is None or stack.nats_pid is None or not _is_nats_server(stack.nats_pid):
        print(
            "  no embedded nats-server runs from this data folder: the next `pflea up` loads the "
            "change; reload another server yourself (docker compose: docker compose kill -s HUP nats)"
        )
        return OK
    os.kill(stack.nats_pid, signal.SIGHUP)
    if login is not None:
        local = msgspec.structs.replace(login, nats_url=_agent_url(s))
        if not asyncio.run(_login_settles(local, expect_login)):
            state = "accepted" if expect_login else "refused"
            return fail(
                f"nats-server (pid {stack.nats_pid}) reloaded, but the agent is not {state}", UNREACHABLE
            )
    print(f"  nats-server (pid {stack.nats_pid}) reloaded its users")
    return OK


def _is_nats_server(pid: int) -> bool:
    """Never signal a stranger: a stale stack.json may name a pid now reused."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: trust the pid if it lives
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return b"nats-server" in cmdline


async def _quiet(exc: Exception) -> None:
    """nats-py prints every error it reports; a refused login is what we look for."""


async def _login_settles(login: AgentLogin, expect_login: bool) -> bool:
    """Whether logging in as the agent succeeds (or fails) within the deadline: the reload
    happens in the server after the signal, not before ``kill`` returns."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RELOAD_DEADLINE_S
    while loop.time() < deadline:
        try:
            nc = await connect_agent(
                login, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, error_cb=_quiet
            )
        except (OSError, TimeoutError, nats.errors.Error):
            if not expect_login:
                return True
        else:
            await nc.close()
            if expect_login:
                return True
        await asyncio.sleep(0.1)
    return False

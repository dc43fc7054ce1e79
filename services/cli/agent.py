"""``pflea agent AGENT register|bet|withdraw|faucet|escrow-lock|escrow-release ...``: send a
command as that agent.

It logs in to NATS with the agent's own credentials (``<data>/agents/<id>.json``, made by
``pflea agents add``), which may send commands for that agent only. Prints the writer's reply
and exits 0 if it was accepted, 1 if it was rejected (the reason is printed) or NATS refused it,
3 if no writer answered. Pass ``--command-id`` to retry a command safely: the same id is never
applied twice, and a retry prints the original answer.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable

import nats.errors

from services.cli.connections import OK, REFUSED, UNREACHABLE, Unreachable, run, settings
from services.cli.render import cell, fail, print_json
from shared.commands import (
    ClaimFaucet,
    Command,
    LockEscrow,
    PlaceBet,
    RegisterAgent,
    ReleaseEscrow,
    Reply,
    WithdrawFunds,
)
from shared.jetstream import Topology
from shared.ledger_client import CommandNotPermitted, LedgerClient, LedgerUnavailable
from shared.nats_agents import AgentError, check_agent_id, connect_agent, credential_path, read_login

Build = Callable[[argparse.Namespace, uuid.UUID], Command]


def _register(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return RegisterAgent(command_id=cid, name=a.name)


def _bet(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return PlaceBet(command_id=cid, game=a.game, amount=a.amount, asset=a.asset)


def _withdraw(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return WithdrawFunds(command_id=cid, amount=a.amount, asset=a.asset, address=a.address)


def _faucet(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return ClaimFaucet(command_id=cid)


def _lock(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return LockEscrow(command_id=cid, amount=a.amount, asset=a.asset, escrow_id=a.escrow_id)


def _release(a: argparse.Namespace, cid: uuid.UUID) -> Command:
    return ReleaseEscrow(command_id=cid, escrow_id=a.escrow_id, amount=a.amount, asset=a.asset)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    agent = sub.add_parser("agent", help="send a command as an agent, with its own credentials")
    agent.add_argument("agent", help="the agent id (its credentials: pflea agents add AGENT)")
    commands = agent.add_subparsers(dest="action", required=True)

    def command(name: str, help: str, build: Build) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help)
        p.add_argument(
            "--command-id", type=uuid.UUID, help="a UUID of your choosing; reuse it to retry safely"
        )
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
        p.set_defaults(func=lambda args: run(lambda: _send(args, build)))
        return p

    p = command("register", "register the agent (its first event)", _register)
    p.add_argument("--name")
    p = command("bet", "place a bet (through Purple Flea when the writer has an API key for the agent)", _bet)
    p.add_argument("game")
    p.add_argument("amount", help="a decimal, e.g. 2.50")
    p.add_argument("--asset", default="PFLEA")
    p = command("withdraw", "withdraw funds to an address", _withdraw)
    p.add_argument("amount")
    p.add_argument("address")
    p.add_argument("--asset", default="PFLEA")
    command("faucet", "claim the faucet", _faucet)
    p = command("escrow-lock", "lock funds in an escrow", _lock)
    p.add_argument("escrow_id")
    p.add_argument("amount")
    p.add_argument("--asset", default="PFLEA")
    p = command("escrow-release", "release an escrow by id (or --amount and --asset)", _release)
    p.add_argument("escrow_id", nargs="?")
    p.add_argument("--amount")
    p.add_argument("--asset")


async def _send(args: argparse.Namespace, build: Build) -> int:
    s = settings()
    try:
        path = credential_path(s.data_dir, check_agent_id(args.agent))
    except AgentError as exc:
        return fail(str(exc), REFUSED)
    try:
        login = read_login(path)
    except FileNotFoundError:
        return fail(
            f"no credentials for agent {args.agent!r} ({path} does not exist): create them with "
            f"`pflea agents add {args.agent}`",
            REFUSED,
        )
    command = build(args, args.command_id or uuid.uuid4())
    try:
        nc = await connect_agent(login, connect_timeout=5, allow_reconnect=False, error_cb=_quiet)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise Unreachable(
            f"cannot log in to NATS at {login.nats_url} as {login.nats_user} ({exc!r})"
        ) from None
    try:
        client = LedgerClient(nc, Topology(login.namespace), timeout_s=s.command_timeout_s)
        reply = await client.send(args.agent, command)
    except CommandNotPermitted as exc:
        return fail(f"{exc} (the credentials in {path} are {login.nats_user}'s)", REFUSED)
    except LedgerUnavailable as exc:
        return fail(str(exc), UNREACHABLE)
    finally:
        await nc.close()
    if args.json:
        print_json(reply)
    else:
        print(_describe(reply))
    return OK if reply.accepted else REFUSED


async def _quiet(exc: Exception) -> None:
    """Errors are reported once, by _send; nats-py would print each as it comes."""


def _describe(reply: Reply) -> str:
    head = f"{reply.status}: {reply.command} for {reply.agent_id} (command_id {reply.command_id})"
    if not reply.accepted:
        return f"{head}\n  {reply.code}: {reply.reason}"
    lines = [head, f"  stream version {reply.version}; events {', '.join(map(str, reply.event_ids))}"]
    if reply.won is not None:
        outcome = f"won, payout {cell(reply.payout)}" if reply.won else "lost"
        lines.append(f"  Purple Flea: {outcome} (transactions {', '.join(reply.tx_ids)})")
    elif reply.command == "PlaceBet":
        lines.append("  outcome unknown: no Purple Flea API is configured for this agent")
    return "\n".join(lines)

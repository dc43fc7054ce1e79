"""The client side of agent commands: send one, wait for its reply, retry what may be retried.

A command carries a client-chosen ``command_id``, so sending the same one again never applies it
twice (see :mod:`shared.commands`); this client resends on timeouts and on retryable failures.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import nats.errors
from nats.aio.client import Client

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
from shared.money import MoneyError, to_text
from shared.settings import AGENT_ID_PATTERN
from shared.wire import decode_reply, encode_command


def check_agent_id(agent_id: str) -> str:
    if not AGENT_ID_PATTERN.fullmatch(agent_id):
        raise ValueError(f"agent_id: {agent_id!r} must match [A-Za-z0-9_-]{{1,64}}")
    return agent_id


def wire_amount(value: Decimal | str | int, field: str = "amount") -> str:
    """An amount as the command carries it: text. Floats are refused here, before sending."""
    if isinstance(value, bool | float):
        raise MoneyError(field, "send a Decimal or a decimal string, not a float or boolean", value)
    if isinstance(value, Decimal):
        return to_text(value)
    return str(value)


class LedgerUnavailable(Exception):
    """No writer answered in time (after retries); the command may or may not have been applied:
    send it again with the same command_id to find out."""


class CommandNotPermitted(Exception):
    """NATS refused to carry the command: this connection's user may not publish its subject
    (an agent's credentials send commands for that agent only)."""


def _refused(nc: Client, subject: str) -> bool:
    """A publish the server refuses gets no answer, only an -ERR naming the subject."""
    error = str(nc.last_error or "").lower()
    return "permissions violation" in error and f'"{subject.lower()}"' in error


class LedgerClient:
    """Send commands to the writers and wait for their replies.

    Each method takes an optional ``command_id``; pass your own to retry safely across process
    restarts. Timeouts and ``failed`` replies marked retryable are retried here with the same id.
    """

    def __init__(self, nc: Client, topology: Topology, *, timeout_s: float = 10.0, attempts: int = 3) -> None:
        self.nc = nc
        self.topology = topology
        self.timeout_s = timeout_s
        self.attempts = attempts

    async def send(self, agent_id: str, command: Command) -> Reply:
        subject = self.topology.command_subject(check_agent_id(agent_id), type(command).__name__)
        payload = encode_command(command)
        reply: Reply | None = None
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
            try:
                msg = await self.nc.request(subject, payload, timeout=self.timeout_s)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError):
                if _refused(self.nc, subject):
                    raise CommandNotPermitted(f"NATS refused the command: {self.nc.last_error}") from None
                continue
            reply = decode_reply(msg.data)
            if not reply.retryable:
                return reply
        if reply is not None:
            return reply
        raise LedgerUnavailable(
            f"no writer answered {subject} after {self.attempts} tries; "
            f"resend with command_id {command.command_id} to learn the outcome"
        )

    async def register_agent(
        self, agent_id: str, name: str | None = None, *, command_id: uuid.UUID | None = None
    ) -> Reply:
        return await self.send(agent_id, RegisterAgent(command_id=command_id or uuid.uuid4(), name=name))

    async def place_bet(
        self,
        agent_id: str,
        game: str,
        amount: Decimal | str | int,
        asset: str = "PFLEA",
        *,
        command_id: uuid.UUID | None = None,
    ) -> Reply:
        command = PlaceBet(
            command_id=command_id or uuid.uuid4(), game=game, amount=wire_amount(amount), asset=asset
        )
        return await self.send(agent_id, command)

    async def withdraw_funds(
        self,
        agent_id: str,
        amount: Decimal | str | int,
        asset: str,
        address: str,
        *,
        command_id: uuid.UUID | None = None,
    ) -> Reply:
        command = WithdrawFunds(
            command_id=command_id or uuid.uuid4(), amount=wire_amount(amount), asset=asset, address=address
        )
        return await self.send(agent_id, command)

    async def claim_faucet(self, agent_id: str, *, command_id: uuid.UUID | None = None) -> Reply:
        return await self.send(agent_id, ClaimFaucet(command_id=command_id or uuid.uuid4()))

    async def lock_escrow(
        self,
        agent_id: str,
        amount: Decimal | str | int,
        asset: str,
        escrow_id: str,
        *,
        command_id: uuid.UUID | None = None,
    ) -> Reply:
        command = LockEscrow(
            command_id=command_id or uuid.uuid4(),
            amount=wire_amount(amount),
            asset=asset,
            escrow_id=escrow_id,
        )
        return await self.send(agent_id, command)

    async def release_escrow(
        self,
        agent_id: str,
        escrow_id: str | None = None,
        *,
        amount: Decimal | str | int | None = None,
        asset: str | None = None,
        command_id: uuid.UUID | None = None,
    ) -> Reply:
        command = ReleaseEscrow(
            command_id=command_id or uuid.uuid4(),
            escrow_id=escrow_id,
            amount=wire_amount(amount) if amount is not None else None,
            asset=asset,
        )
        return await self.send(agent_id, command)

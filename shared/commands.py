"""Agent commands over NATS request/reply: the messages, the reply, and a small async client.

A command asks the writer to make something happen to one agent; it is validated against the
agent's current state before any event exists, and answered with a :class:`Reply`. It travels on
``<namespace>.cmd.<agent_id>.<CommandName>`` (the agent is the subject token, so NATS
permissions can later scope an agent to its own subjects) and the writers share the subject
through one queue group.

Every command carries a client-chosen ``command_id``. Sending the same command id again never
applies it twice: the writer answers with the reply it gave the first time. So a client that
timed out simply sends the same command again (``shared.ledger_client.LedgerClient`` does it for you).
Their wire encoding is ``shared.wire``.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Literal

import msgspec

# Fixed forever: the i-th event a command records locally has id uuid5(this, "<command_id>:<i>"),
# so a retried command whose first commit's outcome was unknown can never be stored twice.
COMMAND_EVENT_NAMESPACE = uuid.UUID("0c4b7e52-36a1-4f0e-8d7a-70666c656131")


def command_event_id(command_id: uuid.UUID, index: int) -> uuid.UUID:
    return uuid.uuid5(COMMAND_EVENT_NAMESPACE, f"{command_id}:{index}")


class Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="command", tag=True):
    """Base of every command. Amounts are decimal strings (the writer parses them exactly)."""

    command_id: uuid.UUID


class RegisterAgent(Command, frozen=True, kw_only=True):
    name: str | None = None


class PlaceBet(Command, frozen=True, kw_only=True):
    game: str
    amount: str
    asset: str = "PFLEA"


class WithdrawFunds(Command, frozen=True, kw_only=True):
    amount: str
    asset: str = "PFLEA"
    address: str


class ClaimFaucet(Command, frozen=True, kw_only=True):
    pass


class LockEscrow(Command, frozen=True, kw_only=True):
    amount: str
    asset: str = "PFLEA"
    escrow_id: str


class ReleaseEscrow(Command, frozen=True, kw_only=True):
    """Release the lock ``escrow_id`` in full, or (no id) ``amount`` of ``asset`` from escrow."""

    escrow_id: str | None = None
    amount: str | None = None
    asset: str | None = None


AnyCommand = RegisterAgent | PlaceBet | WithdrawFunds | ClaimFaucet | LockEscrow | ReleaseEscrow

Status = Literal["accepted", "rejected", "failed"]


class Code:
    """Why a command was not accepted. ``rejected`` is final; ``failed`` may be retried as is."""

    UNKNOWN_AGENT = "unknown_agent"
    ALREADY_REGISTERED = "already_registered"
    BAD_COMMAND = "bad_command"
    BAD_AMOUNT = "bad_amount"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    ESCROW_EXISTS = "escrow_exists"
    ESCROW_NOT_LOCKED = "escrow_not_locked"
    UPSTREAM_REJECTED = "upstream_rejected"
    # The command's authenticated sender is not the agent of its subject (or is unknown).
    FORBIDDEN = "forbidden"
    # A local faucet claim beyond PFLEA_FAUCET_CLAIMS per PFLEA_FAUCET_WINDOW_S; a later one may pass.
    RATE_LIMITED = "rate_limited"
    # The agent is linked to Purple Flea, which has no endpoint for this command: do it there,
    # and its feed records it (a local event would be counted twice once the feed reports it).
    NOT_ON_PURPLEFLEA = "not_on_purpleflea"
    # failed: nothing was recorded; send the same command (same command_id) again.
    UNAVAILABLE = "unavailable"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    CONFLICT = "conflict"
    INTERNAL = "internal_error"
    # failed, NOT to be resent blindly: Purple Flea may have applied it (its feed will tell).
    OUTCOME_UNKNOWN = "outcome_unknown"
    UPSTREAM_BAD_ANSWER = "upstream_bad_answer"


RETRYABLE = frozenset({Code.UNAVAILABLE, Code.UPSTREAM_UNAVAILABLE, Code.CONFLICT})


class Reply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The writer's answer. ``accepted``: the events are committed, ``version`` is the stream's
    version right after them. ``won`` and ``payout`` come from Purple Flea (a bet placed without
    an API configured has an unknown outcome: ``won`` is absent)."""

    command_id: uuid.UUID
    agent_id: str
    command: str
    status: Status
    code: str | None = None
    reason: str | None = None
    version: int | None = None
    event_ids: tuple[uuid.UUID, ...] = ()
    tx_ids: tuple[str, ...] = ()
    bet_id: str | None = None
    won: bool | None = None
    payout: Decimal | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @property
    def retryable(self) -> bool:
        return self.status == "failed" and self.code in RETRYABLE

"""Decide a command against an agent's state: the events it would record, or why it cannot happen.

Pure: no I/O, no clock. The handler loads the state, calls :func:`decide`, and appends what it
returns with the version it loaded; if the stream moved meanwhile it reloads and decides again.
"""

from __future__ import annotations

from decimal import Decimal

import msgspec

from shared.commands import (
    ClaimFaucet,
    Code,
    Command,
    LockEscrow,
    PlaceBet,
    RegisterAgent,
    ReleaseEscrow,
    WithdrawFunds,
)
from shared.events import (
    AgentRegistered,
    BetPlaced,
    EscrowLocked,
    EscrowReleased,
    Event,
    FaucetClaimed,
    FundsWithdrawn,
)
from shared.money import MoneyError, parse_amount, to_text
from shared.projections.agent import AgentFold
from shared.transactions import asset_code

MAX_TEXT = 200
FAUCET_ASSET = "PFLEA"


class Rejection(msgspec.Struct, frozen=True):
    code: str
    reason: str


class Accept(msgspec.Struct, frozen=True):
    events: list[Event]


Decision = Accept | Rejection


class _Reject(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.rejection = Rejection(code, reason)


def decide(state: AgentFold, command: Command, *, faucet_amount: Decimal) -> Decision:
    """What ``command`` records for an agent in ``state``; ``faucet_amount`` is a faucet claim's
    amount when no Purple Flea API answers for it."""
    try:
        if isinstance(command, RegisterAgent):
            return _register(state, command)
        if not state.registered:
            raise _Reject(
                Code.UNKNOWN_AGENT,
                "this agent is not registered (its stream has no AgentRegistered); send RegisterAgent first",
            )
        match command:
            case PlaceBet():
                bet = _bet(command)
                _funds(state, bet.asset, bet.amount)
                return Accept([bet])
            case WithdrawFunds():
                amount, asset = _amount(command.amount), _asset(command.asset)
                address = _text("address", command.address)
                _funds(state, asset, amount)
                return Accept([FundsWithdrawn(amount=amount, asset=asset, address=address)])
            case ClaimFaucet():
                return Accept([FaucetClaimed(amount=faucet_amount, asset=FAUCET_ASSET)])
            case LockEscrow():
                return _lock(state, command)
            case ReleaseEscrow():
                return _release(state, command)
        raise _Reject(Code.BAD_COMMAND, f"unknown command {type(command).__name__}")
    except _Reject as exc:
        return exc.rejection


def checked_shape(command: Command, *, faucet_amount: Decimal) -> Decision:
    """The command's events checked for shape only (amounts, assets, text), not against state:
    for a command Purple Flea has been asked already, which is the judge of funds then."""
    try:
        if isinstance(command, PlaceBet):
            return Accept([_bet(command)])
        return Accept([FaucetClaimed(amount=faucet_amount, asset=FAUCET_ASSET)])
    except _Reject as exc:
        return exc.rejection


def _bet(command: PlaceBet) -> BetPlaced:
    amount, asset = _amount(command.amount), _asset(command.asset)
    return BetPlaced(amount=amount, asset=asset, game=_text("game", command.game))


def _register(state: AgentFold, command: RegisterAgent) -> Decision:
    if state.registered:
        raise _Reject(Code.ALREADY_REGISTERED, "this agent is registered already")
    name = _text("name", command.name) if command.name is not None else None
    return Accept([AgentRegistered(name=name)])


def _lock(state: AgentFold, command: LockEscrow) -> Decision:
    amount, asset = _amount(command.amount), _asset(command.asset)
    escrow_id = _text("escrow_id", command.escrow_id)
    if escrow_id in state.escrows:
        raise _Reject(Code.ESCROW_EXISTS, f"escrow_id: {escrow_id!r} is locked already; choose a new id")
    _funds(state, asset, amount)
    return Accept([EscrowLocked(amount=amount, asset=asset, escrow_id=escrow_id)])


def _release(state: AgentFold, command: ReleaseEscrow) -> Decision:
    if command.escrow_id is not None:
        escrow_id = _text("escrow_id", command.escrow_id)
        lock = state.escrows.get(escrow_id)
        if lock is None:
            raise _Reject(Code.ESCROW_NOT_LOCKED, f"escrow_id: {escrow_id!r} is not locked")
        return Accept([EscrowReleased(amount=lock.amount, asset=lock.asset, escrow_id=escrow_id)])
    if command.amount is None or command.asset is None:
        raise _Reject(Code.BAD_COMMAND, "escrow_id, or amount and asset, are required")
    amount, asset = _amount(command.amount), _asset(command.asset)
    held = state.in_escrow(asset)
    if amount > held:
        raise _Reject(
            Code.ESCROW_NOT_LOCKED, f"{asset}: {to_text(amount)} to release, only {to_text(held)} in escrow"
        )
    return Accept([EscrowReleased(amount=amount, asset=asset)])


def _amount(text: str) -> Decimal:
    try:
        amount = parse_amount(text, "amount")
    except MoneyError as exc:
        raise _Reject(Code.BAD_AMOUNT, str(exc)) from None
    if amount <= 0:
        raise _Reject(Code.BAD_AMOUNT, f"amount: must be more than 0 (got {text!r})")
    return amount


def _asset(text: str) -> str:
    code = asset_code(text)
    if code is None:
        raise _Reject(Code.BAD_COMMAND, f"asset: expected an asset code like PFLEA or USDC, got {text!r}")
    return code


def _text(field: str, value: str) -> str:
    if not value or len(value) > MAX_TEXT or "\x00" in value:
        raise _Reject(Code.BAD_COMMAND, f"{field}: must be 1 to {MAX_TEXT} characters")
    return value


def _funds(state: AgentFold, asset: str, amount: Decimal) -> None:
    available = state.available(asset)
    if amount > available:
        raise _Reject(
            Code.INSUFFICIENT_FUNDS, f"{asset}: needs {to_text(amount)}, only {to_text(available)} available"
        )

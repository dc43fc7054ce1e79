"""The event catalogue: every fact the ledger records, as frozen msgspec structs.

Events are past-tense facts about one agent (the stream). Amounts are non-negative
magnitudes; the event type says which way money moves. Each event's effect on an agent's
balances and escrow is given by :func:`money_effect`, the single definition every projection,
time-travel query and command handler uses.

| event              | source type       | balance effect                         | other effect          |
|--------------------|-------------------|----------------------------------------|-----------------------|
| AgentRegistered    | register          | none                                   | agent exists          |
| FundsDeposited     | deposit           | +amount asset                          |                       |
| FundsWithdrawn     | withdraw          | -amount asset                          |                       |
| BetPlaced          | bet               | -amount asset                          | P&L: wagered, bets    |
| BetWon             | win               | +amount asset                          | P&L: won, wins        |
| FeeCharged         | fee               | -amount asset                          | P&L: fees             |
| FaucetClaimed      | faucet            | +amount asset                          |                       |
| EscrowLocked       | escrow            | -amount asset                          | +amount in escrow     |
| EscrowReleased     | escrow_release    | +amount asset                          | -amount in escrow     |
| TradeExecuted buy  | trade (side=buy)  | -amount asset, +quantity instrument    | trading volume        |
| TradeExecuted sell | trade (side=sell) | +amount asset, -quantity instrument    | trading volume        |
| WalletTransferIn   | transfer_in       | +amount asset                          | on-chain deposit      |
| WalletTransferOut  | transfer_out      | -amount asset                          | on-chain withdrawal   |
| AssetSwapped       | swap              | -amount asset, +to_amount to_asset     |                       |
| DomainPurchased    | domain_purchase   | -amount asset                          |                       |
| DomainRenewed      | domain_renewal    | -amount asset                          |                       |
| DomainSold         | domain_sale       | +amount asset                          |                       |
| UnknownTransaction | anything else     | none (kept verbatim, never dropped)    |                       |
"""

from __future__ import annotations

from decimal import Decimal
from types import UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

import msgspec

# Bumped when an event's stored shape changes; ``shared/upcasting.py`` lifts older shapes on
# read and must hold an upcaster for every step below these numbers (a test checks it).
CURRENT_SCHEMA_VERSION: dict[str, int] = {"BetPlaced": 2}
# The shape of the article's SQLite EventStore (events brought in by ``pflea import sqlite``):
# stored as the article wrote it, lifted to the current shape on read like any older version.
ARTICLE_SCHEMA_VERSION = 0


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every event. ``tx_id`` is the Purple Flea transaction id for ingested events."""

    tx_id: str | None = None
    extra: dict[str, Any] = {}


class MoneyEvent(Event, frozen=True, kw_only=True):
    amount: Decimal
    asset: str


class AgentRegistered(Event, frozen=True, kw_only=True):
    name: str | None = None


class FundsDeposited(MoneyEvent, frozen=True, kw_only=True):
    pass


class FundsWithdrawn(MoneyEvent, frozen=True, kw_only=True):
    address: str | None = None


class BetPlaced(MoneyEvent, frozen=True, kw_only=True):
    game: str | None = None
    bet_id: str | None = None  # the casino's id of the bet (POST /bet answers it)


class BetWon(MoneyEvent, frozen=True, kw_only=True):
    """``amount`` is the payout."""

    game: str | None = None
    bet_id: str | None = None


class FeeCharged(MoneyEvent, frozen=True, kw_only=True):
    reason: str | None = None


class FaucetClaimed(MoneyEvent, frozen=True, kw_only=True):
    pass


class EscrowLocked(MoneyEvent, frozen=True, kw_only=True):
    escrow_id: str | None = None


class EscrowReleased(MoneyEvent, frozen=True, kw_only=True):
    escrow_id: str | None = None


class TradeExecuted(MoneyEvent, frozen=True, kw_only=True):
    """``amount`` of ``asset`` (the quote) paid or received for ``quantity`` of ``instrument``."""

    side: Literal["buy", "sell"]
    instrument: str
    quantity: Decimal
    price: Decimal | None = None


class WalletTransferIn(MoneyEvent, frozen=True, kw_only=True):
    address: str | None = None
    chain: str | None = None


class WalletTransferOut(MoneyEvent, frozen=True, kw_only=True):
    address: str | None = None
    chain: str | None = None


class AssetSwapped(MoneyEvent, frozen=True, kw_only=True):
    to_amount: Decimal
    to_asset: str


class DomainPurchased(MoneyEvent, frozen=True, kw_only=True):
    domain: str


class DomainRenewed(MoneyEvent, frozen=True, kw_only=True):
    domain: str


class DomainSold(MoneyEvent, frozen=True, kw_only=True):
    domain: str


class UnknownTransaction(Event, frozen=True, kw_only=True):
    """A source transaction of a type we do not know yet: kept verbatim, no money effect."""

    source_type: str
    raw: dict[str, Any] = {}


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        AgentRegistered,
        FundsDeposited,
        FundsWithdrawn,
        BetPlaced,
        BetWon,
        FeeCharged,
        FaucetClaimed,
        EscrowLocked,
        EscrowReleased,
        TradeExecuted,
        WalletTransferIn,
        WalletTransferOut,
        AssetSwapped,
        DomainPurchased,
        DomainRenewed,
        DomainSold,
        UnknownTransaction,
    )
}

_encoder = msgspec.json.Encoder()


def plain_json(value: Any) -> Any:
    # msgspec writes str(Decimal), which switches to exponent form below 1e-6; amounts in the
    # log are always plain decimal text, so that equal amounts have equal text.
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


class UnknownEventType(ValueError):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"event_type: {event_type!r} is not in the event catalogue")
        self.event_type = event_type


def event_type_of(event: Event) -> str:
    return type(event).__name__


def schema_version_of(event_type: str) -> int:
    return CURRENT_SCHEMA_VERSION.get(event_type, 1)


def encode_data(event: Event) -> bytes:
    """The JSON stored in ``events.data``: amounts as strings, defaults omitted."""
    if _written_plainly(event):
        return _encoder.encode(event)  # the same bytes, without the detour through a dict
    return _encoder.encode(plain_json(msgspec.to_builtins(event, builtin_types=(Decimal,))))


_PLAIN_TYPES = (str, int, bool, type(None))


class _Layout(NamedTuple):
    decimals: tuple[str, ...]  # fields typed Decimal or Decimal | None
    objects: tuple[str, ...]  # fields typed dict (extra, raw)


_LAYOUTS: dict[type, _Layout | None] = {}


def _layout(cls: type[Event]) -> _Layout | None:
    """Where ``cls`` keeps Decimals and JSON objects; None if it has a field of another kind
    than those and plain scalars (msgspec might write it otherwise than plain_json)."""
    if cls not in _LAYOUTS:
        decimals, objects, plain = [], [], True
        for f in msgspec.structs.fields(cls):
            if _scalar(f.type, Decimal) and not _scalar(f.type):
                decimals.append(f.name)
            elif get_origin(f.type) is dict:
                objects.append(f.name)
            else:
                plain = plain and _scalar(f.type)
        _LAYOUTS[cls] = _Layout(tuple(decimals), tuple(objects)) if plain else None
    return _LAYOUTS[cls]


def _scalar(kind: Any, *also: type) -> bool:
    """Whether a field typed ``kind`` holds only plain scalars (or ``also``)."""
    if kind in _PLAIN_TYPES or kind in also:
        return True
    if get_origin(kind) is Literal:
        return all(type(arg) in _PLAIN_TYPES for arg in get_args(kind))
    if get_origin(kind) in (UnionType, Union):
        return all(_scalar(arg, *also) for arg in get_args(kind))
    return False


def _written_plainly(event: Event) -> bool:
    """Whether msgspec writes ``event`` as :func:`plain_json` would have it: each Decimal is one
    ``str()`` writes without an exponent, and its JSON objects (``extra``, ``raw``) hold only
    strings, integers, booleans and nulls."""
    layout = _layout(type(event))
    if layout is None:
        return False
    for name in layout.decimals:
        value = getattr(event, name)
        if value is not None and not (
            value.is_finite() and value.as_tuple().exponent <= 0 and value.adjusted() >= -6
        ):
            return False
    for name in layout.objects:
        for item in getattr(event, name).values():
            if type(item) not in _PLAIN_TYPES:
                return False
    return True


def decode_data(event_type: str, data: bytes | str | dict[str, Any]) -> Event:
    """Rebuild an event from its stored data (already upcast to the current shape)."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEventType(event_type)
    if isinstance(data, dict):
        return msgspec.convert(data, cls, strict=False)
    return msgspec.json.decode(data, type=cls)


class MoneyEffect(msgspec.Struct, frozen=True):
    """How one event moves an agent's money: deltas per asset."""

    balance: tuple[tuple[str, Decimal], ...] = ()
    escrow: tuple[tuple[str, Decimal], ...] = ()


NO_EFFECT = MoneyEffect()


def money_effect(event: Event) -> MoneyEffect:
    """The documented effect of ``event`` on balances and escrow (see the module table)."""
    match event:
        case FundsDeposited() | BetWon() | FaucetClaimed() | WalletTransferIn() | DomainSold():
            return MoneyEffect(balance=((event.asset, event.amount),))
        case FundsWithdrawn() | BetPlaced() | FeeCharged() | WalletTransferOut():
            return MoneyEffect(balance=((event.asset, -event.amount),))
        case DomainPurchased() | DomainRenewed():
            return MoneyEffect(balance=((event.asset, -event.amount),))
        case EscrowLocked():
            return MoneyEffect(balance=((event.asset, -event.amount),), escrow=((event.asset, event.amount),))
        case EscrowReleased():
            return MoneyEffect(balance=((event.asset, event.amount),), escrow=((event.asset, -event.amount),))
        case TradeExecuted(side="buy"):
            return MoneyEffect(balance=((event.asset, -event.amount), (event.instrument, event.quantity)))
        case TradeExecuted(side="sell"):
            return MoneyEffect(balance=((event.asset, event.amount), (event.instrument, -event.quantity)))
        case AssetSwapped():
            return MoneyEffect(balance=((event.asset, -event.amount), (event.to_asset, event.to_amount)))
        case _:
            return NO_EFFECT

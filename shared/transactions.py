"""Turn one raw Purple Flea transaction into a ``TxEnvelope``, or reject it naming the field;
and tell the writer whether an envelope it is handed is what that makes of the transaction the
envelope carries (:func:`reparse`).

Items are parsed from their own raw bytes strictly: numbers become ``Decimal`` from their text
(never via float), ``NaN``/``Infinity`` tokens and duplicate keys are refused, and text that
Postgres cannot store (NUL, lone surrogates) is refused instead of failing later. Two ways, one
result: msgspec takes an item it can prove plain (:func:`_plain_item`), the stdlib parser with
its checks every other one, and says why it is refused.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from shared.envelope import CASINO_FEED, TxEnvelope, bet_event_id, ingested_event_id
from shared.events import (
    AgentRegistered,
    AssetSwapped,
    BetPlaced,
    BetWon,
    DomainPurchased,
    DomainRenewed,
    DomainSold,
    EscrowLocked,
    EscrowReleased,
    Event,
    FaucetClaimed,
    FeeCharged,
    FundsDeposited,
    FundsWithdrawn,
    TradeExecuted,
    UnknownTransaction,
    WalletTransferIn,
    WalletTransferOut,
    encode_data,
    event_type_of,
    plain_json,
    schema_version_of,
)
from shared.money import MoneyError, parse_amount

MAX_ITEM_BYTES = 64 * 1024
MAX_DEPTH = 32
DEFAULT_ASSET = "PFLEA"
ASSET_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,32}")


def asset_code(value: object) -> str | None:
    """``value`` as an asset code is stored (upper case), or None when it is not one; ingested
    transactions and commands alike, so both name an asset the same way."""
    if isinstance(value, str) and ASSET_PATTERN.fullmatch(value):
        return value.upper()
    return None


class Rejected(ValueError):
    """A transaction that cannot become an event; ``tx_id`` when it could be read."""

    def __init__(self, reason: str, tx_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tx_id = tx_id


def _no_constants(name: str) -> Any:
    raise Rejected(f"amount: {name} is not a number a ledger can store")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Rejected(f"{key}: the key appears twice in one object; which value is meant?")
        result[key] = value
    return result


def check_text(value: Any, path: str, depth: int = 0) -> None:
    """Refuse text Postgres cannot store (NUL, lone surrogates) and nesting past ``MAX_DEPTH``."""
    if depth > MAX_DEPTH:
        raise Rejected(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise Rejected(f"{path}: contains a NUL character, which Postgres cannot store")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected(f"{path}: contains a lone surrogate, which is not valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, path, depth + 1)
            check_text(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{path}[{i}]", depth + 1)


def decode_item(raw: bytes) -> dict[str, Any]:
    """Strict, exact JSON decoding of one transaction object."""
    if len(raw) > MAX_ITEM_BYTES:
        raise Rejected(f"transaction: {len(raw)} bytes is over the {MAX_ITEM_BYTES}-byte limit")
    plain = _plain_item(raw)
    if plain is not None:
        return plain
    return _checked_item(_strict_json(raw, "transaction"))


# JSON numbers with a fraction or exponent become Decimal from their own text, as the stdlib
# path's parse_float does; integers stay int in both.
PLAIN_FLOAT_HOOK = Decimal
_plain_decoder = msgspec.json.Decoder(dict[str, Any], float_hook=PLAIN_FLOAT_HOOK)
_exact_decoder = msgspec.json.Decoder(float_hook=PLAIN_FLOAT_HOOK)
# Writes a decoded plain item back byte for byte: a Decimal as its str(), which is its source text.
PLAIN_ENCODER = msgspec.json.Encoder(decimal_format="number")
_SCALARS = (str, int, Decimal, bool, type(None))


def _plain_item(raw: bytes) -> dict[str, Any] | None:
    """``raw`` decoded by msgspec, if the stdlib path would decode it to the same dict and accept
    it; None for anything else (that path then judges it, and says why).

    msgspec refuses what the stdlib parser refuses (invalid UTF-8, NaN, control characters) and
    lone surrogates too, but keeps the last of duplicate keys and decodes ``\\u0000``. So an item
    is taken only when it is :func:`flat` and :func:`written_plainly`: a duplicate key cannot
    be, as its dict has one key fewer than its text.
    """
    try:
        item = _plain_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not flat(item) or not written_plainly(PLAIN_ENCODER.encode(item), raw):
        return None
    return item


def _exact_json(raw: bytes) -> Any:
    """``raw`` decoded by msgspec, if the stdlib parser would decode it to the same value (any
    depth: a duplicate key anywhere would not write back to ``raw``); else None."""
    try:
        value = _exact_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return value if written_plainly(PLAIN_ENCODER.encode(value), raw) else None


def flat(item: object) -> bool:
    """A JSON object with no object or array in it: the depth and text checks of the stdlib
    path have nothing to find in it once :func:`written_plainly` holds."""
    return type(item) is dict and all(type(value) in _SCALARS for value in item.values())


def written_plainly(encoded: bytes, raw: bytes) -> bool:
    """Whether ``raw`` is exactly ``encoded`` (:data:`PLAIN_ENCODER`'s writing of what msgspec
    decoded from it) and holds no NUL."""
    return encoded == raw and b"\\u0000" not in raw


def _strict_json(raw: bytes, what: str) -> Any:
    """``raw`` as JSON, exactly: numbers with a fraction or exponent become ``Decimal``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_no_constants,
            object_pairs_hook=_no_duplicate_keys,
        )
    except RecursionError:
        raise Rejected(f"{what}: nested too deeply to parse") from None
    except json.JSONDecodeError as exc:
        raise Rejected(f"{what}: not JSON ({exc.msg} at {exc.pos})") from None


def _checked_item(obj: Any) -> dict[str, Any]:
    if type(obj) is dict and _plain_text(obj):
        return obj  # nothing for the walk below to find
    if not isinstance(obj, dict):
        raise Rejected(f"transaction: expected a JSON object, got {type(obj).__name__}")
    try:
        check_text(obj, "transaction")
    except Rejected as exc:
        raise Rejected(exc.reason, _tx_id_or_none(obj)) from None
    return obj


def _plain_text(item: dict[str, Any]) -> bool:
    """Whether ``item`` is flat and all its text ASCII without NUL: what :func:`_check_text`
    passes without a look (it would refuse no key or value of it)."""
    for key, value in item.items():
        if not key.isascii() or "\x00" in key:
            return False
        kind = type(value)
        if kind is str:
            if not value.isascii() or "\x00" in value:
                return False
        elif kind not in _SCALARS:
            return False
    return True


def _text(tx: dict[str, Any], field: str, *, required: bool = True, limit: int = 200) -> str | None:
    value = tx.get(field)
    if type(value) is str and 0 < len(value) <= limit:
        return value  # the common case, decided as below
    if value is None:
        if required:
            raise Rejected(f"{field}: missing", _tx_id_or_none(tx))
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Rejected(f"{field}: expected a string, got {type(value).__name__}", _tx_id_or_none(tx))
    text = str(value)
    if not text or len(text) > limit:
        raise Rejected(f"{field}: must be 1 to {limit} characters", _tx_id_or_none(tx))
    return text


def _tx_id_or_none(tx: dict[str, Any]) -> str | None:
    value = tx.get("id")
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def _amount(tx: dict[str, Any], field: str = "amount") -> Decimal:
    if field not in tx:
        raise Rejected(f"{field}: missing", _tx_id_or_none(tx))
    try:
        return parse_amount(tx[field], field)
    except MoneyError as exc:
        raise Rejected(str(exc), _tx_id_or_none(tx)) from None


def _asset(tx: dict[str, Any], field: str = "asset", default: str | None = DEFAULT_ASSET) -> str:
    value = tx.get(field)
    if value is None:  # absent or null: the default, if the field has one
        value = default
    if value is None:
        raise Rejected(f"{field}: missing", _tx_id_or_none(tx))
    code = asset_code(value)
    if code is None:
        raise Rejected(
            f"{field}: expected an asset code like PFLEA or USDC, got {value!r}", _tx_id_or_none(tx)
        )
    return code


def _occurred_at(tx: dict[str, Any]) -> datetime:
    """When the transaction happened by the source; when we first saw it if the source is silent."""
    value = tx.get("created_at")
    if value is None:
        # Absent or null: keep the transaction (its money effect is known) at our clock's time;
        # ``to_event`` marks it. A re-poll gets a later time but the same event id, so the
        # database keeps the first.
        return datetime.now(UTC)
    if not isinstance(value, str):
        raise Rejected(
            f"created_at: expected an ISO 8601 string, got {type(value).__name__}", _tx_id_or_none(tx)
        )
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"created_at: {value[:40]!r} is not ISO 8601", _tx_id_or_none(tx)) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


Fields = dict[str, Any]


def _money(*extra: str) -> Callable[[dict[str, Any]], Fields]:
    def fields(tx: dict[str, Any]) -> Fields:
        found: Fields = {"amount": _amount(tx), "asset": _asset(tx)}
        for name in extra:
            found[name] = _text(tx, name, required=False)
        return found

    return fields


def _domain(tx: dict[str, Any]) -> Fields:
    amount, asset, domain = _amount(tx), _asset(tx), _text(tx, "domain")
    assert domain is not None
    return {"amount": amount, "asset": asset, "domain": domain}


def _trade(tx: dict[str, Any]) -> Fields:
    side = tx.get("side")
    if side not in ("buy", "sell"):
        raise Rejected(f"side: expected 'buy' or 'sell', got {side!r}", _tx_id_or_none(tx))
    price = _amount(tx, "price") if tx.get("price") is not None else None
    return {
        "amount": _amount(tx),
        "asset": _asset(tx),
        "side": side,
        "instrument": _asset(tx, "instrument", None),
        "quantity": _amount(tx, "quantity"),
        "price": price,
    }


def _swap(tx: dict[str, Any]) -> Fields:
    return {
        "amount": _amount(tx),
        "asset": _asset(tx),
        "to_amount": _amount(tx, "to_amount"),
        "to_asset": _asset(tx, "to_asset", None),
    }


def _register(tx: dict[str, Any]) -> Fields:
    return {"name": _text(tx, "name", required=False)}


# Each source type: the event it becomes, its fields read from the transaction, and the
# transaction's fields that event keeps (not in extra).
BUILDERS: dict[str, tuple[type[Event], Callable[[dict[str, Any]], Fields], frozenset[str]]] = {
    "register": (AgentRegistered, _register, frozenset({"name", "amount", "asset"})),
    "deposit": (FundsDeposited, _money(), frozenset()),
    "withdraw": (FundsWithdrawn, _money("address"), frozenset({"address"})),
    "bet": (BetPlaced, _money("game", "bet_id"), frozenset({"game", "bet_id"})),
    "win": (BetWon, _money("game", "bet_id"), frozenset({"game", "bet_id"})),
    "fee": (FeeCharged, _money("reason"), frozenset({"reason"})),
    "faucet": (FaucetClaimed, _money(), frozenset()),
    "escrow": (EscrowLocked, _money("escrow_id"), frozenset({"escrow_id"})),
    "escrow_release": (EscrowReleased, _money("escrow_id"), frozenset({"escrow_id"})),
    "trade": (TradeExecuted, _trade, frozenset({"side", "instrument", "quantity", "price"})),
    "transfer_in": (
        WalletTransferIn,
        _money("address", "chain"),
        frozenset({"address", "chain"}),
    ),
    "transfer_out": (
        WalletTransferOut,
        _money("address", "chain"),
        frozenset({"address", "chain"}),
    ),
    "swap": (AssetSwapped, _swap, frozenset({"to_amount", "to_asset"})),
    "domain_purchase": (DomainPurchased, _domain, frozenset({"domain"})),
    "domain_renewal": (DomainRenewed, _domain, frozenset({"domain"})),
    "domain_sale": (DomainSold, _domain, frozenset({"domain"})),
}
# The source type each catalogue event comes from (UnknownTransaction keeps its own).
SOURCE_TYPES: dict[str, str] = {cls.__name__: source for source, (cls, _, _) in BUILDERS.items()}
_COMMON = frozenset({"id", "type", "amount", "asset", "created_at", "agent_id"})
# In ``extra`` of an event whose transaction came without ``created_at``: its ``occurred_at``
# is when the ingester first saw it, not when it happened.
FIRST_SEEN = {"occurred_at_source": "first_seen"}


def _marks(tx: dict[str, Any]) -> dict[str, Any]:
    return dict(FIRST_SEEN) if tx.get("created_at") is None else {}


def to_event(tx: dict[str, Any]) -> Event:
    """The catalogue event for a decoded transaction; unknown types are kept, not dropped."""
    tx_type = _text(tx, "type", limit=64)
    assert tx_type is not None
    tx_id = _text(tx, "id")
    return _event(tx, tx_type, tx_id)


def _event(tx: dict[str, Any], tx_type: str, tx_id: str | None) -> Event:
    built = BUILDERS.get(tx_type)
    if built is None:
        if tx.get("amount") is not None:
            _amount(tx)  # an unknown type still may not carry an amount we could not store
        raw = {k: plain_json(v) for k, v in tx.items()}
        return UnknownTransaction(tx_id=tx_id, source_type=tx_type, raw=raw, extra=_marks(tx))
    cls, read, own_fields = built
    fields = read(tx)
    extra = {k: plain_json(v) for k, v in tx.items() if k not in _COMMON and k not in own_fields}
    extra.update(_marks(tx))
    return cls(tx_id=tx_id, extra=extra, **fields)


def transaction_event_id(feed: str, agent_id: str, tx_id: str, event: Event) -> uuid.UUID:
    """The identity of a feed transaction: a bet carrying ``bet_id`` on the casino feed is
    known by it (so the answer of ``POST /bet`` and the feed item are one event); anything
    else by (feed, agent, tx id)."""
    if feed == CASINO_FEED and isinstance(event, BetPlaced | BetWon) and event.bet_id is not None:
        return bet_event_id(agent_id, event.bet_id, won=isinstance(event, BetWon))
    return ingested_event_id(feed, agent_id, tx_id)


def parse_transaction(
    raw: bytes, agent_id: str, feed: str, plain: dict[str, Any] | None = None
) -> TxEnvelope:
    """Validate one raw transaction of ``agent_id`` read from ``feed``; raises ``Rejected``
    with the reason. ``plain``: ``raw`` already decoded, :func:`flat` and
    :func:`written_plainly` (a whole page proven so at once)."""
    if plain is None or len(raw) > MAX_ITEM_BYTES:
        plain = decode_item(raw)
    return _envelope(plain, agent_id, feed)


def _envelope(tx: dict[str, Any], agent_id: str, feed: str) -> TxEnvelope:
    tx_id = _text(tx, "id")
    assert tx_id is not None
    owner = tx.get("agent_id")
    if owner is not None and owner != agent_id:
        raise Rejected(f"agent_id: transaction belongs to {owner!r}, polled for {agent_id!r}", tx_id)
    occurred_at = _occurred_at(tx)
    tx_type = _text(tx, "type", limit=64)
    assert tx_type is not None
    event = _event(tx, tx_type, tx_id)
    event_type = event_type_of(event)
    return TxEnvelope(
        event_id=transaction_event_id(feed, agent_id, tx_id, event),
        agent_id=agent_id,
        event_type=event_type,
        schema_version=schema_version_of(event_type),
        data=msgspec.Raw(encode_data(event)),
        occurred_at=occurred_at,
        feed=feed,
        tx_id=tx_id,
    )


_item_encoder = msgspec.json.Encoder()


def reparse(envelope: TxEnvelope) -> TxEnvelope:
    """What :func:`parse_transaction` makes of the transaction ``envelope`` claims to carry: the
    feed item told back from its event data, then validated and identified again by the very
    same code. Raises ``Rejected`` naming the field. An envelope equal to its reparse is one the
    ingester could have made; the writer stores no other (README, Security)."""
    item = source_item(envelope)
    size = len(_item_encoder.encode(item))
    if size > MAX_ITEM_BYTES:
        raise Rejected(f"transaction: {size} bytes is over the {MAX_ITEM_BYTES}-byte limit", envelope.tx_id)
    expected = _envelope(_checked_item(item), envelope.agent_id, envelope.feed)
    if item.get("created_at") is None:
        # First seen without created_at: occurred_at is the ingester's clock, nothing to check.
        return msgspec.structs.replace(expected, occurred_at=envelope.occurred_at)
    return expected


def source_item(envelope: TxEnvelope) -> dict[str, Any]:
    """The feed item ``envelope`` was made from, as far as its event keeps it: the inverse of
    :func:`to_event` (an UnknownTransaction keeps the item whole; any other event its fields,
    ``extra`` and ``created_at`` as ``occurred_at``, unless it was first seen without one)."""
    raw = bytes(envelope.data)
    data = _exact_json(raw)
    if data is None:
        data = _strict_json(raw, "data")
    if not isinstance(data, dict):
        raise Rejected(f"data: expected a JSON object, got {type(data).__name__}", envelope.tx_id)
    if envelope.event_type == "UnknownTransaction":
        item = data.get("raw")
        if not isinstance(item, dict):
            raise Rejected("data.raw: expected the source transaction, a JSON object", envelope.tx_id)
        return item
    source_type = SOURCE_TYPES.get(envelope.event_type)
    if source_type is None:
        raise Rejected(
            f"event_type: {envelope.event_type[:64]!r} is not in the event catalogue", envelope.tx_id
        )
    fields = {k: v for k, v in data.items() if k not in ("tx_id", "extra")}
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise Rejected(f"data.extra: expected a JSON object, got {type(extra).__name__}", envelope.tx_id)
    first_seen = all(extra.get(k) == v for k, v in FIRST_SEEN.items())
    if first_seen:
        extra = {k: v for k, v in extra.items() if k not in FIRST_SEEN}
    item = {**extra, **fields, "id": envelope.tx_id, "type": source_type}
    if not first_seen:
        item["created_at"] = envelope.occurred_at.isoformat()
    return item

"""One row of the article's store → the event this ledger stores for it, or why it cannot be read.

Stored as the article wrote it (schema v0): its data, numbers exact, lifted to the current shape
on every read by ``shared.upcasting`` — the same path every reader takes — and decoded here once
through that very path, so a row no reader could fold is quarantined now instead. A type outside
the catalogue is kept as ``UnknownTransaction`` (no money effect).

Identity: a Purple Flea transaction (``data.tx_id`` or ``metadata.raw_tx_id``) gets the event id
the ingester gives it when it reads it from ``feed`` (``shared.transactions``), so a later poll
finds it stored; any other row keeps the article's event id.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from services.importer.sqlite_file import ArticleRow
from shared.envelope import INGESTED_EVENT_NAMESPACE
from shared.events import (
    ARTICLE_SCHEMA_VERSION,
    EVENT_TYPES,
    Event,
    UnknownTransaction,
    encode_data,
    plain_json,
    schema_version_of,
)
from shared.money import MoneyError, check_amount
from shared.settings import AGENT_ID_PATTERN
from shared.store import NewEvent, StreamEvent
from shared.transactions import MAX_DEPTH, Rejected, check_text, transaction_event_id
from shared.upcasting import UnreadableEvent, decode_event

# Numbers with a fraction or exponent become Decimal from their text; written back as numbers.
_decoder = msgspec.json.Decoder(float_hook=Decimal)
_encoder = msgspec.json.Encoder(decimal_format="number")
_MONEY_FIELDS = ("amount", "quantity", "to_amount", "price")
MAX_STREAM_TYPE = 64
# Beyond this, a JSON number is no amount and would not fit Postgres' numeric: refused, not stored.
MAX_EXPONENT = 1000
_BIG_EXPONENT = re.compile(r"[eE][+-]?\d{4}")


class Unreadable(ValueError):
    """A row that cannot become an event; the reason names the column or field."""


class Origin(msgspec.Struct, frozen=True):
    """Where imported events come from: the file's name and the feed its transactions were
    read from (its ingester polled the casino's ``/transactions``)."""

    file: str
    feed: str


def imported_event(row: ArticleRow, origin: Origin) -> StreamEvent:
    """The event ``row`` becomes; raises ``Unreadable``."""
    stream_id = _stream_id(row.stream_id)
    stream_type = _text(row.stream_type, "stream_type", MAX_STREAM_TYPE)
    event_type = _text(row.event_type, "event_type", 200)
    if isinstance(row.version, bool) or not isinstance(row.version, int):
        raise Unreadable(f"version: expected an integer, got {row.version!r:.40}")
    data = _json_object(row.data, "data")
    metadata = _json_object(row.metadata, "metadata")
    occurred_at = _occurred_at(row.occurred_at)
    tx_id = _tx_id(data, metadata)
    if tx_id is not None:
        data.setdefault("tx_id", tx_id)  # the ingester's resume point reads data.tx_id
    event, stored_type, schema, text = _event(event_type, data)
    if tx_id is not None:
        event_id = transaction_event_id(origin.feed, stream_id, tx_id, event)
        source = f"{origin.feed}:{tx_id}"
        metadata["feed"] = origin.feed
    else:
        event_id = _kept_id(row.event_id)
        source = f"import:{row.event_id}"
    metadata["imported_from"] = {"file": origin.file, "version": row.version, "event_id": str(row.event_id)}
    new = NewEvent(
        event_id=event_id,
        event_type=stored_type,
        data=text,
        occurred_at=occurred_at,
        schema_version=schema,
        causation_id=source,
        correlation_id=source if tx_id is not None else None,
        metadata=metadata,
    )
    return StreamEvent(stream_id, stream_type, new)


def _event(event_type: str, data: dict[str, Any]) -> tuple[Event, str, int, str]:
    """(the event as every reader will see it, stored type, stored schema version, stored data)."""
    if event_type not in EVENT_TYPES:
        tx_id = data.get("tx_id")
        unknown = UnknownTransaction(
            tx_id=None if tx_id is None else str(tx_id), source_type=event_type, raw=plain_json(data)
        )
        return (
            unknown,
            "UnknownTransaction",
            schema_version_of("UnknownTransaction"),
            encode_data(unknown).decode(),
        )
    text = _encoder.encode(data).decode()
    try:
        event = decode_event(event_type, ARTICLE_SCHEMA_VERSION, text)
    except UnreadableEvent as exc:
        raise Unreadable(f"data: {exc}") from None
    for field in _MONEY_FIELDS:
        value = getattr(event, field, None)
        if isinstance(value, Decimal):
            try:
                check_amount(value, f"data.{field}")
            except MoneyError as exc:
                raise Unreadable(str(exc)) from None
    return event, event_type, ARTICLE_SCHEMA_VERSION, text


def _json_object(value: Any, column: str) -> dict[str, Any]:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Unreadable(f"{column}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise Unreadable(f"{column}: expected JSON text, got {type(value).__name__}")
    try:
        obj = _decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise Unreadable(f"{column}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise Unreadable(f"{column}: expected a JSON object, got {type(obj).__name__}")
    # The walks below are the slow part of a row: run only when the text could fail them (the
    # decoder already refused raw control characters, lone surrogates, NaN and Infinity).
    if "\\u0000" in value or value.count("{") + value.count("[") > MAX_DEPTH:
        try:
            check_text(obj, column)
        except Rejected as exc:
            raise Unreadable(exc.reason) from None
    if len(value) > MAX_EXPONENT or _BIG_EXPONENT.search(value):  # a number could be too big
        for number in _numbers(obj):
            if not number.is_finite() or abs(number.adjusted()) > MAX_EXPONENT:
                raise Unreadable(f"{column}: {number:.6} is not a number a ledger can store")
    return obj


def _numbers(value: Any) -> list[Decimal]:
    if isinstance(value, Decimal):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _text(value: Any, column: str, limit: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise Unreadable(f"{column}: expected text of 1 to {limit} characters, got {value!r:.40}")
    return value


def _stream_id(value: Any) -> str:
    if not isinstance(value, str) or not AGENT_ID_PATTERN.fullmatch(value):
        raise Unreadable(
            f"stream_id: {value!r:.80} is not an agent id (letters, digits, '_' and '-', 1 to 64): "
            "it names the stream's NATS subjects"
        )
    return value


def _occurred_at(value: Any) -> datetime:
    if not isinstance(value, str):
        raise Unreadable(f"occurred_at: expected ISO-8601 text, got {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Unreadable(f"occurred_at: {value[:40]!r} is not ISO 8601") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _tx_id(data: dict[str, Any], metadata: dict[str, Any]) -> str | None:
    for where, value in (
        ("data.tx_id", data.get("tx_id")),
        ("metadata.raw_tx_id", metadata.get("raw_tx_id")),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int) or not 0 < len(str(value)) <= 200:
            raise Unreadable(f"{where}: expected a transaction id (1 to 200 characters), got {value!r:.40}")
        return str(value)
    return None


def _kept_id(value: Any) -> uuid.UUID:
    """The article's event id; one that is not a UUID gets a fixed one derived from it."""
    if not isinstance(value, str) or not value:
        raise Unreadable(f"event_id: expected text, got {value!r:.40}")
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.uuid5(INGESTED_EVENT_NAMESPACE, f"import:{value}")

"""The chaos checker itself: every kind of damage it exists to find, it finds.

A checker that never fails proves nothing, so this damages a log on purpose (as the table
owner, below the services' guards) and expects each invariant to name what is wrong.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import msgspec
import nats
import pytest

from services.simulator.feed import StoredTx
from shared.envelope import ingested_event_id
from shared.jetstream import Topology
from shared.wire import HDR_EVENT_ID
from tests.chaos.checker import check

pytestmark = pytest.mark.chaos


def _tx(seq: int, malformed: str | None = None) -> StoredTx:
    return StoredTx("a", seq, f"tx-{seq}", "deposit", malformed, (f'{{"id":"tx-{seq}"}}'.encode(),))


async def _insert(conn: asyncpg.Connection, stream: str, version: int, data: dict[str, object]) -> uuid.UUID:
    """An ingested event of the casino feed: under its documented id the first time its tx id
    is stored in ``stream``, under a random one after that (a double)."""
    tx_id = data.get("tx_id")
    taken = await conn.fetchval("SELECT count(*) FROM events WHERE data->>'tx_id' = $1", tx_id)
    first = isinstance(tx_id, str) and not taken
    event_id = ingested_event_id("casino", stream, tx_id) if first else uuid.uuid4()  # type: ignore[arg-type]
    await conn.execute(
        """INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata,
                               occurred_at)
           VALUES ($1, $2, 'agent', 'FundsDeposited', $3, $4::jsonb,
                   '{"schema_version": 1, "feed": "casino"}', $5)""",
        event_id,
        stream,
        version,
        msgspec.json.encode(data).decode(),
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    return event_id


async def test_each_kind_of_damage_is_found_and_counted(
    database_url: str, js_streams: nats.NATS, topology: Topology
) -> None:
    truth = [_tx(1), _tx(2), _tx(3), _tx(4, malformed="amount_nan")]
    conn = await asyncpg.connect(database_url)
    try:
        relayed = await _insert(conn, "a", 1, {"tx_id": "tx-1", "amount": "1.50", "asset": "PFLEA"})
        await _insert(conn, "a", 2, {"tx_id": "tx-2", "amount": "2", "asset": "PFLEA"})
        await _insert(conn, "a", 3, {"tx_id": "tx-2", "amount": "2", "asset": "PFLEA"})  # stored twice
        await _insert(conn, "a", 4, {"tx_id": "tx-9", "amount": "NaN", "asset": "PFLEA"})  # no source; NaN
        await _insert(conn, "b", 1, {"amount": "1", "asset": "PFLEA", "note": "deleted below"})
        await _insert(conn, "b", 2, {"amount": "1e5", "asset": "PFLEA"})  # exponent text
        # v1 of b deleted behind the store's back: a gap, and a broken hash chain.
        await conn.execute(
            "SET session_replication_role = replica;"
            "DELETE FROM events WHERE stream_id = 'b' AND version = 1; RESET session_replication_role"
        )
        await conn.execute(
            "INSERT INTO balances (agent_id, asset, balance, last_position) VALUES ('a', 'PFLEA', 'NaN', 1)"
        )
        await js_streams.jetstream().publish(
            topology.event_subject("a", "FundsDeposited"), b"{}", headers={HDR_EVENT_ID: str(relayed)}
        )
        findings = await check(conn, js_streams.jetstream(), topology, truth)
    finally:
        await conn.close()
    # tx-3 never stored, the malformed tx-4 not quarantined; tx-2 twice; tx-9 and b's event unexplained.
    assert (findings.missing, findings.duplicates, findings.extra) == (2, 1, 2), findings.problems
    named = {problem[:3] for problem in findings.problems}
    assert named == {"[1]", "[2]", "[3]", "[4]", "[5]", "[6]", "[7]"}, findings.problems
    text = "\n".join(findings.problems)
    assert "1 streams have version gaps" in text
    assert "events@" in text and "'NaN'" in text and "1e5" in text and "balances[a,PFLEA]" in text
    assert "4 committed events never reached PFLEA_EVENTS" in text
    assert "1 streams' hash chains are broken" in text and "version 1 is missing" in text

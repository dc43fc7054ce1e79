"""The one invariant checker every chaos scenario ends with.

1. every source transaction is in ``events`` exactly once, or (malformed) in ``quarantine``;
   every other event is explained (a command's accepted reply, or appended by the scenario);
2. per stream, versions are 1..n with no gap, and ingested events sit in source order;
3. every read model equals a fresh, independent fold over ``events`` (tests/reference.py);
4. each projector's checkpoints equal the streams' last versions, and projection_status lag is 0;
5. no NaN, infinity or out-of-range amount in ``events.data`` or any read-model column;
6. PFLEA_EVENTS carries every committed event (its Pflea-Event-Id headers cover ``events``);
7. every stream's hash chain holds, and every hash PFLEA_EVENTS delivered is the stored one
   (``pflea verify --against-stream``).
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
from nats.js import JetStreamContext

from services.simulator.feed import StoredTx
from shared.chain import published_hashes, verify_against_published, verify_chains
from shared.jetstream import Topology
from shared.wire import HDR_EVENT_ID
from tests.reference import TABLE_COLUMNS, fold, stored_events, table_rows
from tests.support import stream_messages, truth_event_id

PROJECTIONS = ("balance", "pnl", "portfolio", "leaderboard")
AMOUNT_FIELDS = ("amount", "quantity", "price", "to_amount")
# A stored amount: plain non-negative decimal text, at most 20 integer digits and 18 places.
AMOUNT_TEXT = re.compile(r"(0|[1-9]\d{0,19})(\.\d{1,18})?")
READ_MODEL_NUMERICS = {
    "balances": ["balance"],
    "pnl": ["total_wagered", "total_won", "total_fees", "net_pnl", "win_rate", "roi"],
    "portfolio": ["available", "in_escrow", "total"],
    "leaderboard_entries": ["net_pnl", "roi", "win_rate", "volume", "total_wagered", "total_won"],
}
# Far beyond any sum of this suite's amounts, far below where NUMERIC would misbehave.
ABSURD = "1e30"
SAMPLES = 5


@dataclass
class Findings:
    missing: int = 0
    duplicates: int = 0
    extra: int = 0
    reordered: int = 0
    reorder_samples: list[tuple[str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fail(self, invariant: int, what: str, samples: Iterable[Any] = ()) -> None:
        shown = list(samples)[:SAMPLES]
        self.problems.append(f"[{invariant}] {what}" + (f"; e.g. {shown}" if shown else ""))


async def check(
    conn: asyncpg.Connection,
    js: JetStreamContext,
    topology: Topology,
    truth: list[StoredTx],
    external: set[uuid.UUID] = frozenset(),  # type: ignore[assignment]
) -> Findings:
    """Every invariant, on a quiet system (services stopped); never stops at the first failure."""
    findings = Findings()
    await source_exactly_once(conn, truth, external, findings)
    await versions_contiguous(conn, findings)
    await source_order_kept(conn, truth, findings)
    await read_models_equal_fold(conn, findings)
    await checkpoints_at_heads(conn, findings)
    await amounts_in_range(conn, findings)
    await relay_covers_log(conn, js, topology, findings)
    await chains_hold(conn, js, topology, findings)
    return findings


async def chains_hold(
    conn: asyncpg.Connection, js: JetStreamContext, topology: Topology, findings: Findings
) -> None:
    result = await verify_chains(conn)
    await verify_against_published(conn, await published_hashes(js, topology), result)
    if result.breaks:
        findings.fail(7, f"{len(result.breaks)} streams' hash chains are broken", result.breaks)


async def source_exactly_once(
    conn: asyncpg.Connection, truth: list[StoredTx], external: set[uuid.UUID], findings: Findings
) -> None:
    rows = await conn.fetch(
        """SELECT event_id, stream_id, metadata->>'feed' AS feed, data->>'tx_id' AS tx_id,
                  event_type, position FROM events"""
    )
    raws = [bytes(r[0]) for r in await conn.fetch("SELECT raw FROM quarantine WHERE source = 'ingester'")]
    commanded = await _command_event_ids(conn)
    # Each well-formed transaction under the identity the README documents (truth_event_id).
    good = {truth_event_id(tx): tx for tx in truth if tx.malformed is None and tx.id is not None}
    ids = {r["event_id"] for r in rows}
    stored = Counter(
        (r["stream_id"], r["feed"], r["tx_id"])
        for r in rows
        if r["tx_id"] is not None and r["feed"] is not None and r["event_id"] not in external
    )
    quarantined = set(raws)
    lost = sorted(f"{tx.agent_id}:{tx.feed}:{tx.id}" for event_id, tx in good.items() if event_id not in ids)
    unkept = [
        f"{tx.agent_id}#{tx.seq} ({tx.malformed})"
        for tx in truth
        if tx.malformed and tx.raw not in quarantined
    ]
    doubled = {tx: n for tx, n in stored.items() if n > 1}
    known = {(tx.agent_id, tx.feed, tx.id) for tx in good.values()}
    unexplained = [  # a double of a known transaction is counted as such above, not here
        f"{r['event_id']} #{r['position']} {r['stream_id']} {r['event_type']} {r['feed']}:{r['tx_id']}"
        for r in rows
        if r["event_id"] not in good
        and r["event_id"] not in external
        and r["event_id"] not in commanded
        and (r["stream_id"], r["feed"], r["tx_id"]) not in known
    ]
    findings.missing += len(lost) + len(unkept)
    findings.duplicates += sum(n - 1 for n in doubled.values()) + len(raws) - len(quarantined)
    findings.extra += len(unexplained)
    if lost:
        findings.fail(1, f"{len(lost)} source transactions never became events", lost)
    if unkept:
        findings.fail(1, f"{len(unkept)} malformed transactions are neither stored nor quarantined", unkept)
    if doubled:
        findings.fail(1, f"{len(doubled)} source transactions are stored more than once", doubled.items())
    if len(raws) != len(quarantined):
        findings.fail(1, f"{len(raws) - len(quarantined)} quarantined inputs were copied twice")
    if unexplained:
        findings.fail(1, f"{len(unexplained)} events have no source transaction or command", unexplained)


async def _command_event_ids(conn: asyncpg.Connection) -> set[uuid.UUID]:
    replies = await conn.fetch("SELECT reply FROM command_results WHERE accepted")
    return {uuid.UUID(i) for r in replies for i in msgspec.json.decode(r["reply"]).get("event_ids", ())}


async def versions_contiguous(conn: asyncpg.Connection, findings: Findings) -> None:
    broken = await conn.fetch(
        """SELECT stream_id, min(version) AS lo, max(version) AS hi, count(*) AS n
           FROM events GROUP BY stream_id
           HAVING min(version) <> 1 OR max(version) <> count(*)"""
    )
    if broken:
        findings.fail(2, f"{len(broken)} streams have version gaps", [dict(r) for r in broken])


async def source_order_kept(conn: asyncpg.Connection, truth: list[StoredTx], findings: Findings) -> None:
    """Ingested events that sit after a later transaction of their feed. Events a command
    recorded (a bet placed through the ledger) are left out: they are stored when the command
    runs, ahead of feed items the ingester has not read yet."""
    seq = {(tx.feed, tx.id): tx.seq for tx in truth if tx.malformed is None}
    commanded = await _command_event_ids(conn)
    rows = [
        r
        for r in await conn.fetch(
            """SELECT event_id, stream_id, metadata->>'feed' AS feed, data->>'tx_id' AS tx_id
               FROM events ORDER BY stream_id, version"""
        )
        if r["event_id"] not in commanded
    ]
    # Feeds are polled independently: order holds within each (agent, feed).
    last: dict[tuple[str, str], int] = {}
    reordered: dict[str, int] = {}
    for row in rows:
        n = seq.get((row["feed"], row["tx_id"]))
        if n is None:
            continue
        key = (row["stream_id"], row["feed"])
        if n < last.get(key, 0):
            reordered[row["stream_id"]] = reordered.get(row["stream_id"], 0) + 1
        last[key] = max(n, last.get(key, 0))
    findings.reordered = sum(reordered.values())
    if reordered:
        findings.reorder_samples = list(reordered.items())[:SAMPLES]
        findings.fail(
            2,
            f"{findings.reordered} events stored after a later transaction of their feed",
            reordered.items(),
        )


async def read_models_equal_fold(conn: asyncpg.Connection, findings: Findings) -> None:
    expected = fold(await stored_events(conn))
    for table, columns in TABLE_COLUMNS.items():
        actual = await table_rows(conn, table, columns)
        wrong = [
            (key, actual.get(key), row) for key, row in expected[table].items() if actual.get(key) != row
        ]
        stray = sorted(set(actual) - set(expected[table]))
        if wrong or stray:
            findings.fail(
                3,
                f"{table}: {len(wrong)} rows differ from the fold, {len(stray)} rows should not exist",
                wrong or stray,
            )


async def checkpoints_at_heads(conn: asyncpg.Connection, findings: Findings) -> None:
    behind = await conn.fetch(
        """SELECT p.name, s.stream_id, s.v AS head, c.version AS checkpoint
           FROM (SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id) s
           CROSS JOIN unnest($1::text[]) AS p(name)
           LEFT JOIN projection_checkpoints c ON c.projection = p.name AND c.stream_id = s.stream_id
           WHERE c.version IS DISTINCT FROM s.v""",
        list(PROJECTIONS),
    )
    if behind:
        findings.fail(
            4, f"{len(behind)} projector checkpoints differ from stream heads", [dict(r) for r in behind]
        )
    lagging = await conn.fetch("SELECT projection, lag_events FROM projection_status WHERE lag_events <> 0")
    if lagging:
        findings.fail(4, "projection_status reports lag", [dict(r) for r in lagging])


async def amounts_in_range(conn: asyncpg.Connection, findings: Findings) -> None:
    bad = [
        f"events@{r['position']}.{r['field']}={r['value']}"
        for r in await conn.fetch(
            """SELECT position, f AS field, value::text AS value
               FROM events,
                    LATERAL (SELECT f, data->f AS value FROM unnest($1::text[]) AS f
                             UNION ALL
                             SELECT 'raw.amount', data->'raw'->'amount'
                             WHERE event_type = 'UnknownTransaction') AS amounts
               WHERE value IS NOT NULL AND value <> 'null'::jsonb
                 AND (jsonb_typeof(value) <> 'string' OR NOT (value #>> '{}') ~ $2)""",
            list(AMOUNT_FIELDS),
            f"^{AMOUNT_TEXT.pattern}$",
        )
    ]
    for table, columns in READ_MODEL_NUMERICS.items():
        # NUMERIC NaN sorts above every number and abs('Infinity') is Infinity: both fail here.
        test = " OR ".join(f"abs({c}) >= {ABSURD} OR scale({c}) > 18" for c in columns)
        for r in await conn.fetch(f"SELECT agent_id, asset, {', '.join(columns)} FROM {table} WHERE {test}"):
            bad.append(f"{table}[{r['agent_id']},{r['asset']}]={dict(r)}")
    if bad:
        findings.fail(5, f"{len(bad)} amounts are NaN, infinite or out of range", bad)


async def relay_covers_log(
    conn: asyncpg.Connection, js: JetStreamContext, topology: Topology, findings: Findings
) -> None:
    committed = {r[0] for r in await conn.fetch("SELECT event_id FROM events")}
    relayed = await relayed_event_ids(js, topology)
    unrelayed = committed - relayed
    if unrelayed:
        findings.fail(6, f"{len(unrelayed)} committed events never reached PFLEA_EVENTS", unrelayed)


async def relayed_event_ids(js: JetStreamContext, topology: Topology) -> set[uuid.UUID]:
    """Every Pflea-Event-Id on PFLEA_EVENTS (headers only)."""
    msgs = await stream_messages(js, topology.events_stream, topology.events_filter, headers_only=True)
    return {uuid.UUID(m.headers[HDR_EVENT_ID]) for m in msgs if m.headers}

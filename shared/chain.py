"""Verifying the per-stream hash chains (migration 008; README, "Verifiable history").

Every event's ``hash`` is SHA-256 of the previous event's hash (32 zero bytes before version 1)
followed by the event's canonical encoding, computed by a trigger as it is inserted. Here we
check the stored history against itself — each stream's versions 1..n with no gap, each hash
recomputed from the stored previous hash and the stored row — and against what subscribers were
sent: the relay publishes each event's hash in a header (``Pflea-Event-Hash``), so a rewrite of
Postgres after publication shows even if the rewriter recomputed every hash.

The recomputation runs in Postgres (one scan in ``(stream_id, version)`` order, the hash with the
same SQL function the trigger uses), so the encoding has one definition; a third party can
recompute it independently from the README (tests/test_hash_chain.py does).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg
import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.jetstream import Topology
from shared.wire import HDR_HASH, HDR_STREAM_ID, HDR_VERSION

GENESIS = bytes(32)


class Break(msgspec.Struct, frozen=True):
    """The first link of a stream that does not hold."""

    stream_id: str
    version: int
    reason: str
    expected: str = ""  # hex
    stored: str = ""  # hex


class Verification(msgspec.Struct):
    events: int = 0
    streams: int = 0
    breaks: list[Break] = msgspec.field(default_factory=list)
    published_checked: int = 0

    @property
    def intact(self) -> bool:
        return not self.breaks


# Each event with the link it should have: the stored previous hash (genesis at version 1) and
# the previous version. The first break per stream is all a reader needs to start looking.
_LINKS = """
WITH scope AS (
    SELECT DISTINCT stream_id FROM events
    WHERE ($1::text[] IS NULL OR stream_id = ANY($1)) AND position > $2
), links AS (
    SELECT e.stream_id, e.version, e.position, e.hash AS stored,
           lag(e.version) OVER w AS prev_version,
           pflea_event_hash(coalesce(lag(e.hash) OVER w, pflea_chain_genesis()), e) AS expected
    FROM events e JOIN scope USING (stream_id)
    WINDOW w AS (PARTITION BY e.stream_id ORDER BY e.version)
)
SELECT stream_id, version, position, stored, expected, prev_version FROM links
"""

_BREAKS = f"""
SELECT DISTINCT ON (stream_id) stream_id, version, stored, expected, prev_version
FROM ({_LINKS}) l
WHERE position > $2
  AND (version <> coalesce(prev_version, 0) + 1 OR stored IS DISTINCT FROM expected)
ORDER BY stream_id, version
"""

_COUNTS = """
SELECT count(*) AS events, count(DISTINCT stream_id) AS streams FROM events
WHERE ($1::text[] IS NULL OR stream_id = ANY($1)) AND position > $2
"""


async def verify_chains(
    conn: asyncpg.Connection, streams: Sequence[str] | None = None, *, since: int = 0
) -> Verification:
    """Recompute the chains of ``streams`` (all by default), reporting links after position
    ``since`` (earlier ones are read only as the predecessors of those)."""
    stream_list = list(streams) if streams else None
    result = Verification()
    counts = await conn.fetchrow(_COUNTS, stream_list, since)
    result.events, result.streams = int(counts["events"]), int(counts["streams"])
    for row in await conn.fetch(_BREAKS, stream_list, since):
        expected_version = (row["prev_version"] or 0) + 1
        if row["version"] != expected_version:
            reason = (
                f"version {row['version']} follows version {row['prev_version'] or 0}: "
                f"version {expected_version} is missing or moved"
            )
            result.breaks.append(Break(row["stream_id"], row["version"], reason))
        else:
            result.breaks.append(
                Break(
                    row["stream_id"],
                    row["version"],
                    "stored hash differs from the recomputed one: the event or its predecessor changed",
                    expected=bytes(row["expected"]).hex(),
                    stored=bytes(row["stored"]).hex(),
                )
            )
    return result


async def published_hashes(
    js: JetStreamContext, topology: Topology, streams: Sequence[str] | None = None
) -> dict[tuple[str, int], str]:
    """(stream, version) -> hex hash, as PFLEA_EVENTS delivered them (headers only; messages
    relayed before events were chained carry none and are skipped)."""
    stream = topology.events_stream
    info = await js.stream_info(stream)
    total = int(info.state.messages)
    found: dict[tuple[str, int], str] = {}
    if total == 0:
        return found
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL,
        headers_only=True,
        inactive_threshold=30,
        name=f"pflea-verify-{uuid.uuid4().hex[:12]}",
    )
    wanted = set(streams) if streams else None
    sub = await js.pull_subscribe(topology.events_filter, stream=stream, config=config)
    try:
        seen = 0
        while seen < total:
            batch = await sub.fetch(min(5000, total - seen), timeout=10)
            seen += len(batch)
            for msg in batch:
                h = msg.headers or {}
                if not h.get(HDR_HASH):
                    continue
                key = (h[HDR_STREAM_ID], int(h[HDR_VERSION]))
                if wanted is None or key[0] in wanted:
                    found[key] = h[HDR_HASH]
    finally:
        await sub.unsubscribe()
    return found


async def verify_against_published(
    conn: asyncpg.Connection, published: dict[tuple[str, int], str], result: Verification
) -> None:
    """Add a break for every published event whose stored hash differs, or that is gone."""
    if not published:
        return
    keys = list(published)
    rows = await conn.fetch(
        """SELECT k.stream_id, k.version, e.hash
           FROM unnest($1::text[], $2::bigint[]) AS k(stream_id, version)
           LEFT JOIN events e USING (stream_id, version)""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    first: dict[str, Break] = {}
    for row in sorted(rows, key=lambda r: (r["stream_id"], r["version"])):
        sent = published[(row["stream_id"], row["version"])]
        if row["hash"] is None:
            problem = Break(
                row["stream_id"], row["version"], "published to subscribers, no longer stored", sent
            )
        elif bytes(row["hash"]).hex() != sent:
            reason = "stored hash differs from the one published to subscribers: history was rewritten"
            problem = Break(row["stream_id"], row["version"], reason, sent, bytes(row["hash"]).hex())
        else:
            continue
        first.setdefault(row["stream_id"], problem)
    result.published_checked = len(keys)
    known = {b.stream_id for b in result.breaks}
    result.breaks += [b for s, b in sorted(first.items()) if s not in known]

"""Events PFLEA_EVENTS dropped before a projection applied them: fill them from Postgres, loudly.

PFLEA_EVENTS keeps limits retention: it is derived (every event is in the events table) and
subscribers read it too, so a slow or stopped projector must not hold the relay up. It can
therefore drop messages a projector never got (PFLEA_EVENTS_MAX_MSGS / _MAX_BYTES, 30 days).
The consumer then just moves on to the oldest message still held, and nats-server soon moves
the consumer's floors past the hole, so NATS keeps no trace of it. A stream that gets a later
event is mended by the gap fill (:mod:`.apply`); one that gets none would stay behind for good.

The trace kept is positional: the relay publishes in position order, so every event below the
position of the oldest message PFLEA_EVENTS holds (its *horizon*) will never be delivered again.
The runner checks at start and every ``CHECK_EVERY_S``: each stream whose next unapplied
version lies below the horizon is filled from the events table through :func:`apply_batch`
(checkpoint row locks, gap fill, fold: what a live batch does, so replicas and live batches
stay exactly-once in effect), logged as a warning and counted in
``pflea_projector_caught_up_from_log_total``. An event filled early and delivered later is
skipped as applied; the check only costs an index probe per stream when the horizon moved.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import Counter

from services.projectors.apply import apply_batch
from shared.projections.model import ReadModel
from shared.quarantine import Quarantine
from shared.store import fetch_stream
from shared.wire import HDR_POSITION, DeliveredEvent

log = logging.getLogger(__name__)

CHECK_EVERY_S = 10.0
STREAMS_PER_TRANSACTION = 200

CAUGHT_UP = Counter(
    "pflea_projector_caught_up_from_log_total",
    "Events applied from the events table because PFLEA_EVENTS dropped them before delivery",
    ["projection"],
)

# Every stream (a skip scan over the (stream_id, version) key: one probe per stream, however
# long the log) whose next version after this projection's checkpoint lies below the horizon,
# and its last version below it.
_BEHIND_THE_HORIZON = """
WITH RECURSIVE streams(stream_id) AS (
    SELECT min(stream_id) FROM events
  UNION ALL
    SELECT (SELECT min(e.stream_id) FROM events e WHERE e.stream_id > s.stream_id)
    FROM streams s WHERE s.stream_id IS NOT NULL
)
SELECT s.stream_id,
       (SELECT max(e.version) FROM events e WHERE e.stream_id = s.stream_id AND e.position < $2) AS below
FROM streams s
LEFT JOIN projection_checkpoints c ON c.projection = $1 AND c.stream_id = s.stream_id
WHERE s.stream_id IS NOT NULL
  AND EXISTS (SELECT 1 FROM events e
              WHERE e.stream_id = s.stream_id AND e.version = coalesce(c.version, 0) + 1 AND e.position < $2)
ORDER BY s.stream_id
"""


class CatchUp:
    def __init__(
        self,
        model: ReadModel[Any],
        pool: asyncpg.Pool,
        js: JetStreamContext,
        stream: str,
        quarantine: Quarantine,
    ) -> None:
        self.model = model
        self.pool = pool
        self.js = js
        self.stream = stream
        self.quarantine = quarantine
        self.checked = 0  # the horizon of the last check: nothing below it was left behind

    async def check(self) -> int:
        """Fill what PFLEA_EVENTS can no longer deliver; how many events that applied."""
        horizon = await self.horizon()
        if horizon is None or horizon <= self.checked:
            return 0
        behind = await self.pool.fetch(_BEHIND_THE_HORIZON, self.model.name, horizon)
        filled = 0
        for start in range(0, len(behind), STREAMS_PER_TRANSACTION):
            filled += await self._fill(
                [(r["stream_id"], r["below"]) for r in behind[start : start + STREAMS_PER_TRANSACTION]]
            )
        self.checked = horizon
        if behind:
            CAUGHT_UP.labels(self.model.name).inc(filled)
            log.warning(
                "%s dropped events projection %s never applied (it holds positions from %d on): "
                "caught up %d streams, %d events, from the events table",
                self.stream,
                self.model.name,
                horizon,
                len(behind),
                filled,
                extra={
                    "projection": self.model.name,
                    "streams": len(behind),
                    "events": filled,
                    "horizon": horizon,
                },
            )
        return filled

    async def horizon(self) -> int | None:
        """The position of the oldest event PFLEA_EVENTS holds (all below it are gone from it);
        past the log's head when it holds none; None when it never held any."""
        for _ in range(5):
            state = (await self.js.stream_info(self.stream)).state
            if not state.last_seq:
                return None
            if not state.messages:
                head: int = await self.pool.fetchval("SELECT coalesce(max(position), 0) FROM events")
                return head + 1
            try:
                oldest = await self.js.get_msg(self.stream, state.first_seq)
            except NotFoundError:
                continue  # dropped meanwhile: look again
            if oldest.headers and HDR_POSITION in oldest.headers:
                return int(oldest.headers[HDR_POSITION])
            return None  # not a relayed event: nothing to go by
        return None

    async def _fill(self, streams: list[tuple[str, int]]) -> int:
        """Apply each stream up to its given version, as a live batch carrying that version would:
        apply_batch reads the versions in between from the events table."""
        async with self.pool.acquire() as conn, conn.transaction():
            delivered: list[DeliveredEvent] = []
            for stream_id, version in streams:
                delivered += [
                    DeliveredEvent.of(e) for e in await fetch_stream(conn, stream_id, version, version)
                ]
            return await apply_batch(conn, self.model, delivered, self.quarantine)

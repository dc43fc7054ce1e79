"""Lag in seconds, as a metric: the age of the oldest event a reader has not applied yet.

``pflea_lag_seconds{reader}`` — ``projector:<name>`` from each projector, ``relay`` and
``snapshots`` from the relay process — read every few seconds from the views
``projection_status`` / ``tailer_status`` (migration 010), the same numbers ``pflea status``
shows. Zero at the head; growing without bound means the reader cannot keep up (README,
Operations: what to do then).
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import Gauge

from shared.db import TRANSIENT_DB_ERRORS

log = logging.getLogger(__name__)

LAG_SECONDS = Gauge(
    "pflea_lag_seconds", "Age of the oldest event this reader has not applied yet (0 at the head)", ["reader"]
)
REPORT_EVERY_S = 5.0

_PROJECTION = "SELECT 'projector:' || projection, lag_seconds FROM projection_status WHERE projection = $1"
_TAILERS = "SELECT kind, lag_seconds FROM tailer_status"


async def report_projection_lag(pool: asyncpg.Pool, projection: str) -> None:
    await _report(pool, _PROJECTION, projection)


async def report_tailer_lag(pool: asyncpg.Pool) -> None:
    await _report(pool, _TAILERS)


async def _report(pool: asyncpg.Pool, query: str, *args: object) -> None:
    """Forever (the caller cancels it): set the gauge from ``query``'s (reader, seconds) rows."""
    while True:
        try:
            for reader, seconds in await pool.fetch(query, *args):
                LAG_SECONDS.labels(reader).set(float(seconds))
        except (*TRANSIENT_DB_ERRORS, asyncpg.PostgresError) as exc:
            log.debug("lag not measured this time (%r)", exc)
        await asyncio.sleep(REPORT_EVERY_S)

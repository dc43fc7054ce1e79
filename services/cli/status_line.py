"""The live status line of ``pflea up``: throughput and lag, read from Postgres and the ingester's
/metrics."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import asyncpg
import httpx
from prometheus_client.parser import text_string_to_metric_families


class StatusLine:
    def __init__(
        self,
        reader_url: str,
        *,
        live: bool,
        ingester_metrics: str | None = None,
    ) -> None:
        self.dsn = reader_url
        self.ingester_metrics = ingester_metrics  # its /metrics: transactions published
        self.live = live and sys.stdout.isatty()
        self.quiet = not live
        self.conn: asyncpg.Connection | None = None
        self.previous: tuple[float, dict[str, int]] | None = None

    async def run(self, every: float = 2.0, plain_every: float = 10.0) -> None:
        last_plain = 0.0
        while True:
            await asyncio.sleep(every)
            try:
                line = await self.sample()
            except Exception as exc:  # the status line must never take `pflea up` down
                line = f"status unavailable: {exc!r}"
            if self.quiet:
                continue
            if self.live:
                print("\r" + line.ljust(150)[:150], end="", flush=True)
            elif time.monotonic() - last_plain >= plain_every:
                print(line, flush=True)
                last_plain = time.monotonic()

    async def sample(self) -> str:
        try:
            counts = await self._counts()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            self.conn = None
            return f"status unavailable: {exc!r}"
        now = time.monotonic()
        rates: dict[str, float] = {}
        if self.previous is not None:
            then, before = self.previous
            rates = {k: (v - before.get(k, v)) / (now - then) for k, v in counts.items()}
        self.previous = (now, counts)
        head = counts["stored"]
        parts = [
            f"ingested {rates.get('ingested', 0):,.0f}/s",
            f"stored {rates.get('stored', 0):,.0f}/s (total {head:,})",
        ]
        for name in ("balance", "pnl", "portfolio", "leaderboard"):
            position = counts.get(name, 0)
            parts.append(f"{name} {rates.get(name, 0):,.0f}/s lag {max(head - position, 0):,}")
        parts.append(f"quarantine {counts['quarantine']:,}")
        return " · ".join(parts)

    async def _counts(self) -> dict[str, int]:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, timeout=3)
        counts = {
            "stored": int(await self.conn.fetchval("SELECT coalesce(max(position), 0) FROM events")),
            "quarantine": int(await self.conn.fetchval("SELECT count(*) FROM quarantine")),
        }
        for row in await self.conn.fetch("SELECT projection, position FROM projection_positions"):
            counts[row["projection"]] = int(row["position"])
        counts["ingested"] = await self._published()
        return counts

    async def _published(self) -> int:
        """Transactions the ingester has published (a PFLEA_TX message holds a batch of them);
        0 when its /metrics cannot be read."""
        if not self.ingester_metrics:
            return 0
        try:
            async with httpx.AsyncClient(timeout=2) as http:
                text = (await http.get(self.ingester_metrics)).text
        except httpx.HTTPError:
            return 0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "pflea_ingester_transactions_published_total":
                    return int(sample.value)
        return 0

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()

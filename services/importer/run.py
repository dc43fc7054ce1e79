"""The import: the file's rows, stream by stream, appended in batches through ``EventStore``.

Each batch is one ``EventStore.append_batch`` — the writer's own path: the append lock every
INSERT into ``events`` takes (global positions visible in order, the hash chain computed by the
trigger in that transaction), each event at its stream's end. The writer's lease is not taken:
the writer goes on appending between the import's batches. Event ids are fixed (see
``services.importer.article``), so a second import, or one run again after a crash half-way,
finds what is stored and skips it. An unreadable row is quarantined with its raw text and the
import goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

import msgspec

from services.importer.article import Origin, Unreadable, imported_event
from services.importer.sqlite_file import ArticleFile, ArticleRow
from shared.quarantine import Quarantine
from shared.store import EventStore, StreamEvent, StreamHeads

BATCH_SIZE = 5_000
YIELD_EVERY = 200  # rows read between two turns of the event loop
QUARANTINE_SOURCE = "import"


class QuarantinedRow(msgspec.Struct, frozen=True):
    row_id: object
    stream_id: object
    version: object
    event_type: object
    reason: str


class ImportReport(msgspec.Struct):
    file: str
    dry_run: bool
    rows: int = 0
    appended: int = 0
    already_stored: int = 0  # imported before, or read from the feed already
    quarantined: list[QuarantinedRow] = msgspec.field(default_factory=list)
    counts: dict[str, Counter[str]] = msgspec.field(default_factory=dict)  # stream -> article type -> rows
    snapshots: int = 0  # the file's, not imported: the relay's snapshotter takes this ledger's own
    seconds: float = 0.0


class Appended(msgspec.Struct, frozen=True):
    appended: int
    already_stored: int
    refused: list[tuple[StreamEvent, str]]  # with the reason


class Sink(Protocol):
    async def append(self, items: list[StreamEvent]) -> Appended: ...

    async def quarantine(self, row: ArticleRow, reason: str) -> None: ...


class LedgerSink:
    """Where a real import goes: the event store and the quarantine."""

    def __init__(self, store: EventStore, quarantine: Quarantine, file: str) -> None:
        self.store = store
        self.dead_letters = quarantine
        self.file = file
        self.heads = StreamHeads()

    async def append(self, items: list[StreamEvent]) -> Appended:
        result = await self.store.append_batch(items, heads=self.heads)
        refused = [
            (c.item, f"event_id: {c.item.event.event_id} is stored already, in stream {c.stored_in!r}")
            for c in result.collisions
        ]
        return Appended(len(result.appended), len(result.duplicates), refused)

    async def quarantine(self, row: ArticleRow, reason: str) -> None:
        agent = row.stream_id if isinstance(row.stream_id, str) else None
        await self.dead_letters.put(row.raw(), reason, agent_id=agent, key=f"{self.file}:{row.id}")


async def import_file(article: ArticleFile, origin: Origin, sink: Sink | None) -> ImportReport:
    """Import ``article``; with no ``sink`` (``--dry-run``) only read and report."""
    started = time.perf_counter()
    report = ImportReport(file=origin.file, dry_run=sink is None, snapshots=article.snapshots())
    batch: list[tuple[ArticleRow, StreamEvent]] = []
    # One batch is appended while the next is read: Postgres works on one core, we on the other.
    # The next append starts only once the previous one committed, so batches commit in order.
    appending: asyncio.Task[None] | None = None
    try:
        for row, outcome in _read(article, origin):
            report.rows += 1
            if report.rows % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let the append in flight send its rows
            if isinstance(outcome, str):
                report.quarantined.append(_quarantined(row, outcome))
                if sink is not None:
                    await sink.quarantine(row, outcome)
                continue
            report.counts.setdefault(outcome.stream_id, Counter())[str(row.event_type)] += 1
            batch.append((row, outcome))
            if len(batch) >= BATCH_SIZE:
                if appending is not None:
                    await appending
                appending = asyncio.create_task(_flush(batch, sink, report))
                batch = []
        if appending is not None:
            await appending
        await _flush(batch, sink, report)
    finally:
        if appending is not None and not appending.done():
            appending.cancel()
    report.seconds = time.perf_counter() - started
    return report


def _read(article: ArticleFile, origin: Origin) -> Iterator[tuple[ArticleRow, StreamEvent | str]]:
    for row in article.rows():
        try:
            yield row, imported_event(row, origin)
        except Unreadable as exc:
            yield row, str(exc)


async def _flush(
    batch: list[tuple[ArticleRow, StreamEvent]], sink: Sink | None, report: ImportReport
) -> None:
    if not batch or sink is None:
        return
    outcome = await sink.append([item for _, item in batch])
    report.appended += outcome.appended
    report.already_stored += outcome.already_stored
    rows = {id(item): row for row, item in batch}
    for item, reason in outcome.refused:
        row = rows[id(item)]
        report.quarantined.append(_quarantined(row, reason))
        await sink.quarantine(row, reason)


def _quarantined(row: ArticleRow, reason: str) -> QuarantinedRow:
    return QuarantinedRow(row.id, row.stream_id, row.version, row.event_type, reason)


def render(report: ImportReport) -> str:
    """The report a person reads: totals, rows per stream and type, every quarantined row."""
    readable = sum(sum(c.values()) for c in report.counts.values())
    if report.dry_run:
        head = (
            f"{report.file}: {report.rows:,} rows in {len(report.counts):,} streams; would import "
            f"{readable:,} (ids already stored are skipped), quarantine {len(report.quarantined):,}; "
            "nothing written (--dry-run)"
        )
    else:
        head = (
            f"{report.file}: {report.rows:,} rows in {len(report.counts):,} streams; imported "
            f"{report.appended:,}, already stored {report.already_stored:,}, quarantined "
            f"{len(report.quarantined):,}, in {report.seconds:.1f} s"
        )
    lines = [head]
    if report.snapshots:
        lines.append(
            f"  {report.snapshots} snapshot(s) in the file not imported: the relay's snapshotter "
            "takes this ledger's own from the imported events"
        )
    totals: Counter[str] = Counter()
    for per_stream in report.counts.values():
        totals.update(per_stream)
    lines.append("  by type: " + ", ".join(f"{t} {n:,}" for t, n in sorted(totals.items())))
    if report.dry_run:  # per stream too: what a person checks before the real run
        for stream in sorted(report.counts):
            shown = ", ".join(f"{t} {n:,}" for t, n in sorted(report.counts[stream].items()))
            lines.append(f"  {stream}: {shown}")
    for q in report.quarantined:
        lines.append(f"  quarantine: row {q.row_id} ({q.stream_id} v{q.version} {q.event_type}): {q.reason}")
    return "\n".join(lines)

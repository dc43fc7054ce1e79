"""Reading the article's SQLite file (``devstack/article_store.py`` writes one), read-only."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

COLUMNS = (
    "id",
    "event_id",
    "stream_id",
    "stream_type",
    "event_type",
    "version",
    "data",
    "metadata",
    "occurred_at",
)
_FETCH = 5_000


class NotAnArticleStore(ValueError):
    """The file is not SQLite, or has no ``events`` table with the article's columns."""


class ArticleRow(msgspec.Struct, frozen=True, gc=False):
    """One row of the article's ``events`` table, as SQLite returns it (any column may hold any
    type: SQLite does not enforce them)."""

    id: Any
    event_id: Any
    stream_id: Any
    stream_type: Any
    event_type: Any
    version: Any
    data: Any
    metadata: Any
    occurred_at: Any

    def raw(self) -> bytes:
        """The row as JSON text, kept in quarantine when it cannot be read."""
        fields = {
            name: (value.hex() if isinstance(value, bytes) else value)
            for name, value in zip(COLUMNS, msgspec.structs.astuple(self), strict=True)
        }
        return _raw_encoder.encode(fields)


_raw_encoder = msgspec.json.Encoder()


class ArticleFile:
    """An article store opened read-only: its rows stream by stream in version order."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise NotAnArticleStore(f"{path}: no such file")
        self.path = path
        try:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(events)")}
        except sqlite3.DatabaseError as exc:
            raise NotAnArticleStore(f"{path}: not a SQLite database ({exc})") from None
        if missing := [c for c in COLUMNS if c not in columns]:
            raise NotAnArticleStore(
                f"{path}: table events lacks {', '.join(missing)}: not the article's store"
            )

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def snapshots(self) -> int:
        try:
            return int(self.db.execute("SELECT count(*) FROM snapshots").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # no snapshots table

    def rows(self) -> Iterator[ArticleRow]:
        """Every event row, stream by stream, each stream in its version order."""
        cursor = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM events ORDER BY stream_id, version, id")
        while batch := cursor.fetchmany(_FETCH):
            for values in batch:
                yield ArticleRow(*values)

    def close(self) -> None:
        self.db.close()

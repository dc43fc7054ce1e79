"""The article's single-file SQLite ``EventStore``, as it writes its file: what ``pflea import
sqlite`` reads. For the tests and the bench (they make such files); the ledger never writes one.

Its shapes, as the article has them: versions from 0 per stream, ``data`` and ``metadata``
written with ``json.dumps`` (so amounts are JSON numbers such as ``12.5``), ``occurred_at`` as
ISO-8601 text, and a ``snapshots`` table of states keyed by stream.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE NOT NULL,
    stream_id TEXT NOT NULL,
    stream_type TEXT NOT NULL,
    event_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    UNIQUE(stream_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    stream_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""


class ArticleStore:
    """Appends the way the article's ``EventStore.append`` does: the next version of the stream
    (0 for a new one), a fresh uuid4 event id, JSON by ``json.dumps``."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.executescript(SCHEMA)
        self.versions: dict[str, int] = {}

    def append(
        self,
        stream_id: str,
        event_type: str,
        data: dict[str, Any],
        occurred_at: datetime,
        *,
        metadata: dict[str, Any] | None = None,
        stream_type: str = "agent",
    ) -> str:
        version = self.versions.get(stream_id, -1) + 1
        self.versions[stream_id] = version
        event_id = str(uuid.uuid4())
        self.db.execute(
            "INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata,"
            " occurred_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event_id,
                stream_id,
                stream_type,
                event_type,
                version,
                json.dumps(data),
                json.dumps(metadata or {}),
                occurred_at.isoformat(),
            ),
        )
        return event_id

    def append_raw(self, stream_id: str, event_type: str, data: str, occurred_at: str) -> None:
        """A row as some other writer of the file left it (``data`` not necessarily JSON)."""
        version = self.versions.get(stream_id, -1) + 1
        self.versions[stream_id] = version
        self.db.execute(
            "INSERT INTO events (event_id, stream_id, stream_type, event_type, version, data, metadata,"
            " occurred_at) VALUES (?, ?, 'agent', ?, ?, ?, '{}', ?)",
            (str(uuid.uuid4()), stream_id, event_type, version, data, occurred_at),
        )

    def snapshot(self, stream_id: str, state: dict[str, Any], created_at: datetime) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO snapshots (stream_id, version, state, created_at) VALUES (?, ?, ?, ?)",
            (stream_id, self.versions[stream_id], json.dumps(state), created_at.isoformat()),
        )

    def close(self) -> None:
        self.db.commit()
        self.db.close()

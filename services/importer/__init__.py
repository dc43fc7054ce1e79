"""``pflea import sqlite``: the article's SQLite event store appended to this ledger's log."""

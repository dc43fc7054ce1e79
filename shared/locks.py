"""Every Postgres advisory-lock id the system takes, named in one place.

Advisory locks share one key space per database: two uses that happen to pick the same id
silently exclude each other (or, worse, one takes a lock the other believes guards something
else). So no id is typed anywhere but here, and ``tests/test_locks.py`` checks that they are
all distinct and that the migration's trigger takes :data:`APPENDS`.

Projections get their ids from an explicit table rather than from their names: a name-derived
id (the sum of the name's bytes, before) gives anagrams the same lock. The four projections
keep the ids that formula gave them, so upgrading to this module changes no lock.

Changing an id is safe only if no process using the old id runs at the same time as one using
the new: two processes on different ids do not exclude each other (a live projector and a
rebuild's swap, say, or two relay leaders). Stop every process that takes the lock, then start
the new version.
"""

from __future__ import annotations

# Every INSERT into events, held until commit (transaction lock). 001_event_store.sql's trigger
# takes this same number; migrations are immutable, so this one can never change.
APPENDS = 7061746561
# `pflea migrate`: one migrator at a time (session lock).
MIGRATIONS = 7061746562
# The relay that publishes to PFLEA_EVENTS: one leader (session lock, services/relay).
RELAY_LEADER = 7061746563
# The writer that consumes PFLEA_TX: one leader (session lock, services/writer).
APPEND_LEADER = 7061746564

# Writer processes, each registered under one member slot (session lock WRITER_MEMBERS + slot,
# slot < MAX_WRITERS), so the partitions of PFLEA_TX spread over the live writers.
WRITER_MEMBERS = 7061750000
MAX_WRITERS = 64
# The writer appending partition ``part`` of P > 1 (session lock): APPEND_PARTITIONS + 256 P + part.
APPEND_PARTITIONS = 7061760000

NAMED = {
    "APPENDS": APPENDS,
    "MIGRATIONS": MIGRATIONS,
    "RELAY_LEADER": RELAY_LEADER,
    "APPEND_LEADER": APPEND_LEADER,
}

# Live projector batches take a projection's lock shared; a rebuild's swap takes it exclusive.
# A new projection needs a row here: pick any id not used above.
PROJECTIONS = {
    "balance": 7061747310,
    "pnl": 7061746930,
    "portfolio": 7061747590,
    "leaderboard": 7061747741,
}


def append_leader(partitions: int, part: int) -> int:
    """The lock of the writer that appends one partition; with one partition, APPEND_LEADER,
    as before partitions existed (an upgrade changes no lock)."""
    if not 0 <= part < partitions <= 255:
        raise ValueError(f"no partition {part} of {partitions}")
    return APPEND_LEADER if partitions == 1 else APPEND_PARTITIONS + 256 * partitions + part


def ranges() -> dict[str, range]:
    """The id ranges handed out by number, for the distinctness test."""
    return {
        "WRITER_MEMBERS": range(WRITER_MEMBERS, WRITER_MEMBERS + MAX_WRITERS),
        "APPEND_PARTITIONS": range(APPEND_PARTITIONS + 512, APPEND_PARTITIONS + 256 * 256),
    }


class UnknownProjectionLock(KeyError):
    def __str__(self) -> str:
        return f"projection {self.args[0]!r} has no advisory lock id: add one to shared/locks.py PROJECTIONS"


def projection(name: str) -> int:
    """The lock id of projection ``name``."""
    try:
        return PROJECTIONS[name]
    except KeyError:
        raise UnknownProjectionLock(name) from None

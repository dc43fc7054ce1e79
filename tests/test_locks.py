"""The advisory-lock registry: every id distinct, and the one the migration types is the registry's."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from shared import locks
from shared.migrate import migration_files
from shared.projections.registry import PROJECTIONS


def test_every_lock_id_is_distinct_and_fits_a_bigint() -> None:
    ids = [*locks.NAMED.values(), *locks.PROJECTIONS.values()]
    assert len(set(ids)) == len(ids)
    assert all(-(2**63) <= i < 2**63 for i in ids)


def test_numbered_lock_ranges_hold_no_other_lock_and_do_not_overlap() -> None:
    ids = [*locks.NAMED.values(), *locks.PROJECTIONS.values()]
    spans = sorted(locks.ranges().values(), key=lambda r: r.start)
    assert not any(i in span for i in ids for span in spans)
    assert all(a.stop <= b.start for a, b in zip(spans, spans[1:], strict=False))
    partitions = {locks.append_leader(p, n) for p in range(2, 65) for n in range(p)}
    assert len(partitions) == sum(range(2, 65)) and partitions <= set(locks.ranges()["APPEND_PARTITIONS"])
    assert locks.append_leader(1, 0) == locks.APPEND_LEADER  # one partition: the lock of old
    with pytest.raises(ValueError):
        locks.append_leader(3, 3)


def test_every_projection_has_its_own_lock() -> None:
    assert set(locks.PROJECTIONS) == set(PROJECTIONS)
    assert len({locks.projection(name) for name in PROJECTIONS}) == len(PROJECTIONS)


def test_anagram_projection_names_cannot_share_a_lock() -> None:
    # The old derivation (base + sum of the name's bytes) gave "pnl" and "lnp" one id; an id
    # now comes only from the table, so a name without a row is refused, never given a twin's.
    assert sum(b"pnl") == sum(b"lnp")
    with pytest.raises(KeyError, match="shared/locks.py"):
        locks.projection("lnp")


def test_projections_keep_the_ids_they_had_before_the_registry() -> None:
    """An upgrade must not change a lock a running projector holds (see the module docstring)."""
    assert {name: 7061746600 + sum(name.encode()) for name in PROJECTIONS} == locks.PROJECTIONS


def test_the_append_trigger_takes_the_registry_appends_lock() -> None:
    sql = resources.files("shared.migrations").joinpath("001_event_store.sql").read_text()
    trigger = re.search(r"FUNCTION pflea_serialize_event_appends\(\).*?\$\$(.*?)\$\$", sql, re.S)
    assert trigger is not None, "001_event_store.sql no longer defines the append trigger"
    assert re.findall(r"pg_advisory_xact_lock\((\d+)\)", trigger.group(1)) == [str(locks.APPENDS)]


def test_the_projectors_lock_function_allows_exactly_the_projection_locks() -> None:
    """Migration 006 lists the ids a projector may lock; a new projection needs its id there."""
    sql = resources.files("shared.migrations").joinpath("006_least_privilege.sql").read_text()
    allowed = re.search(r"lock_id = ANY \(ARRAY\[([\d, ]+)\]", sql)
    assert allowed is not None, "006_least_privilege.sql no longer lists the projection locks"
    assert {int(i) for i in allowed.group(1).split(",")} == set(locks.PROJECTIONS.values())


def test_no_migration_takes_a_lock_the_registry_does_not_name() -> None:
    known = {str(i) for i in [*locks.NAMED.values(), *locks.PROJECTIONS.values()]}
    for _, name, sql in migration_files():
        for lock_id in re.findall(r"pg_advisory\w*lock\w*\((\d+)", sql):
            assert lock_id in known, f"{name} takes advisory lock {lock_id}, not in shared/locks.py"


def test_no_code_types_a_lock_id_outside_the_registry() -> None:
    repo = Path(__file__).resolve().parent.parent
    ids = {str(i) for i in [*locks.NAMED.values(), *locks.PROJECTIONS.values()]}
    typed = [
        f"{path.relative_to(repo)}: {lock_id}"
        for folder in ("shared", "services", "bench")
        for path in (repo / folder).rglob("*.py")
        if path.name != "locks.py"
        for lock_id in ids
        if lock_id in path.read_text()
    ]
    assert typed == []

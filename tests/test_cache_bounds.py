"""Caches the services keep between batches have a size, whatever the history (issue 19)."""

from __future__ import annotations

import logging
import random
import uuid

from shared.store import Appended, StreamHeads
from shared.unreachable import RepeatedWarnings


def test_the_writers_stream_heads_never_exceed_their_capacity() -> None:
    heads = StreamHeads(capacity=100)
    rng = random.Random(19)
    versions: dict[str, int] = {}
    for _ in range(2_000):
        batch = []
        for stream_id in {f"agent-{rng.randrange(5_000)}" for _ in range(rng.randint(1, 250))}:
            versions[stream_id] = versions.get(stream_id, 0) + 1
            batch.append(Appended(uuid.uuid4(), stream_id, versions[stream_id]))
        heads.committed(batch)
        assert len(heads.versions) <= 100
        # What it remembers is right: a head it knows is the head committed last.
        assert all(versions[s] == v for s, v in heads.versions.items())
    assert heads.versions, "it still remembers the newest heads"


def test_held_back_warnings_are_bounded_however_many_different_ones_come() -> None:
    warnings = RepeatedWarnings(logging.getLogger("test.cache_bounds"))
    for n in range(10_000):
        warnings.warning(f"server down ({n}: a message that varies without end)")
        assert len(warnings._seen) <= 101

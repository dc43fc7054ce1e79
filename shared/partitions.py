"""Which partition an agent belongs to: one stable hash, the same everywhere.

An agent id maps to partition ``fnv1a_32(agent_id) % count``: the 32-bit FNV-1a hash of the id's
UTF-8 bytes, modulo the number of partitions. It is the hash nats-server's subject-mapping
function ``{{partition(count, n)}}`` applies to a subject token, so a stream's subject transform
and any Python process (the ingester's shards, the writer's partitions, a test) agree on where
an agent lives without asking each other; ``tests/test_partitions.py`` checks that nats-server
places agents where this says.

Changing ``count`` moves most agents to another partition, so it is a procedure, not a setting
that can change under running processes: README "Growing past one machine".
"""

from __future__ import annotations

FNV32_OFFSET = 0x811C9DC5
FNV32_PRIME = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash of ``data``."""
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


def partition(key: str, count: int) -> int:
    """The partition of ``key`` (an agent id) among ``count``, from 0 to ``count - 1``."""
    if count < 1:
        raise ValueError(f"the number of partitions must be at least 1, got {count}")
    return fnv1a_32(key.encode()) % count

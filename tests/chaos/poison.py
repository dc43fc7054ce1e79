"""Poison the simulator cannot write by itself, appended to a live feed as the ground truth.

The simulator's malformed kinds stay inside valid JSON text. These are worse: a bare ``NaN``
token, bytes that are not UTF-8, and 10 000 levels of nesting. Each makes the whole page
invalid for a strict parser, so the ingester must split the page by hand (services/ingester/
pages.py), quarantine the one item and let its neighbours through.
"""

from __future__ import annotations

from services.simulator import Simulator
from services.simulator.feed import StoredTx

KINDS = ("nan_token", "infinity_token", "invalid_utf8", "deep_nesting")
DEPTH = 10_000


def poison_item(kind: str, tx_id: str, created_at: str) -> bytes:
    head = b'{"id":"' + tx_id.encode() + b'","type":"deposit",'
    tail = b',"asset":"PFLEA","created_at":"' + created_at.encode() + b'"}'
    match kind:
        case "nan_token":
            return head + b'"amount":NaN' + tail
        case "infinity_token":
            return head + b'"amount":-Infinity' + tail
        case "invalid_utf8":
            return head + b'"amount":"1.00","memo":"\xff\xfe\xc3("' + tail
        case "deep_nesting":
            return head + b'"amount":"1.00","deep":' + b"[" * DEPTH + b"]" * DEPTH + tail
    raise ValueError(f"unknown poison kind {kind!r}")


def inject(sim: Simulator, agent_id: str, kind: str) -> StoredTx:
    """Append one poison item to ``agent_id``'s feed; the truth records it as malformed."""
    feed = sim.feed(agent_id)
    # The simulator has no public way to add a raw item; its feed's own helpers keep ids,
    # timestamps and the since-index consistent with the items it generates.
    seq, tx_id, created_at = feed._next_id()
    return feed._append(
        StoredTx(agent_id, seq, tx_id, "deposit", kind, (poison_item(kind, tx_id, created_at),))
    )

"""What one member knows of its group's KV bucket: the live members and each slot's holder.

Built from a watch of the whole bucket (:class:`shared.membership.Membership` feeds it) and from
the member's own writes, newest revision first. A value older than twice the TTL is treated as
gone even if no expiry marker was seen, so a missed marker never keeps a dead member or a dead
lease alive in the view. The keys, and the rendezvous hash that says who should own a slot, are
defined here once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = logging.getLogger(__name__)

MEMBER_PREFIX = "member."
SLOT_PREFIX = "slot."


def slot_key(slot: int) -> str:
    return f"{SLOT_PREFIX}{slot}"


def member_key(member: str) -> str:
    return f"{MEMBER_PREFIX}{member}"


def rendezvous_owner(slot: int, members: Iterable[str]) -> str | None:
    """The member with the highest rendezvous hash for ``slot`` (None when there is none)."""
    best, best_score = None, -1
    for member in members:
        digest = hashlib.blake2b(f"{member}/{slot}".encode(), digest_size=8).digest()
        score = int.from_bytes(digest, "big")
        if score > best_score or (score == best_score and best is not None and member > best):
            best, best_score = member, score
    return best


@dataclass(slots=True)
class Seen:
    """The newest message of a key as the watcher saw it."""

    value: str | None  # None: deleted, purged or expired
    revision: int
    at: float  # time.time() when it was written (the server's stamp) or seen deleted


class MembershipView:
    """The bucket as this member last saw it. ``slots`` is this member's slot count: a member
    heartbeating another count is reported once (they would cut the agents differently)."""

    def __init__(self, ttl_s: float, slots: int) -> None:
        self.ttl_s = ttl_s
        self.slots = slots
        self.seen: dict[str, Seen] = {}
        self._disagreeing: set[str] = set()

    def clear(self) -> None:
        self.seen.clear()

    def holder(self, key: str) -> str | None:
        """The live value of ``key`` (a slot's holder, a member's slot count), or None."""
        seen = self.seen.get(key)
        if seen is None or seen.value is None:
            return None
        # A value older than twice the TTL is gone whatever we were told (a marker missed).
        if time.time() - seen.at > 2 * self.ttl_s:
            return None
        return seen.value

    def revision(self, key: str) -> int:
        """The revision that showed ``key`` as it is in the view (0: never seen)."""
        seen = self.seen.get(key)
        return seen.revision if seen is not None else 0

    def members(self) -> set[str]:
        """The members whose heartbeat is live."""
        ids = (k.removeprefix(MEMBER_PREFIX) for k in self.seen if k.startswith(MEMBER_PREFIX))
        return {m for m in ids if self.holder(member_key(m)) is not None}

    def saw(self, key: str, seen: Seen) -> None:
        """Record ``seen`` unless the view already holds a newer revision of ``key``."""
        known = self.seen.get(key)
        if known is None or seen.revision >= known.revision:
            self.seen[key] = seen

    def see(self, entry: KeyValue.Entry) -> None:
        """An entry the watcher delivered."""
        deleted = entry.operation in (KV_DEL, KV_PURGE)
        created: object = entry.created  # the message's server time (nats-py types it int)
        at = created.timestamp() if isinstance(created, datetime) and not deleted else time.time()
        value = None if deleted else (entry.value or b"").decode()
        self.saw(entry.key, Seen(value, entry.revision or 0, at))
        if value and entry.key.startswith(MEMBER_PREFIX) and value != str(self.slots):
            self._disagrees(entry.key.removeprefix(MEMBER_PREFIX), value)

    def _disagrees(self, member: str, slots: str) -> None:
        if member in self._disagreeing:
            return
        self._disagreeing.add(member)
        log.error(
            "member %s cuts the work into %s slots, this one into %d: a slot number means other "
            "agents to each, so some are polled twice and some by nobody; give every replica the "
            "same number of slots",
            member,
            slots,
            self.slots,
        )

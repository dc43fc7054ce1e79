"""The ids the ingester published lately, per (feed, agent): bounded per key and in total.

Why they are kept at all: a feed may answer a page that repeats items just before the cursor
(an overlapping or repeated page), and skipping those saves publishing them again. It is only
a saving: JetStream's duplicate window and the writer's unique event ids are what keep the
store exactly-once, so forgetting an id costs a duplicate publish, never a duplicate event.

What bounds them: the items a page can repeat are the newest ones published before the cursor,
at most a page of them, so a key never keeps more than its last ``per_key`` ids (the page
limit). Across keys a total budget holds (``PFLEA_INGEST_RECENT_IDS``): with many keys each
keeps an equal share of it, its newest ids. A share, not an LRU of whole keys: pollers take
turns, so the least recently used key is the very next one polled, and an LRU would forget
every key just before it is needed. So memory follows configuration, not history or the
number of agents.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RecentIds:
    """Recently published ids per key; at most ``per_key`` per key and ``total`` over all.

    Each key keeps its newest ids, up to :meth:`share`; keys are forgotten whole only when
    there are more of them than ids in the budget.
    """

    def __init__(self, per_key: int, total: int) -> None:
        if per_key < 1 or total < 1:
            raise ValueError(f"per_key and total must be positive, got {per_key} and {total}")
        self.per_key = min(per_key, total)
        self.total = total
        self._keys: OrderedDict[Hashable, OrderedDict[str, None]] = OrderedDict()  # LRU first
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def window(self, key: Hashable) -> RecentWindow:
        return RecentWindow(self, key)

    def contains(self, key: Hashable, tx_id: str) -> bool:
        ids = self._keys.get(key)
        if ids is None:
            return False
        self._keys.move_to_end(key)
        return tx_id in ids

    def share(self) -> int:
        """How many ids each key may keep now: its part of the budget, up to ``per_key``."""
        return max(1, min(self.per_key, self.total // max(1, len(self._keys))))

    def add(self, key: Hashable, tx_id: str) -> None:
        ids = self._keys.get(key)
        if ids is None:
            ids = self._keys[key] = OrderedDict()
        self._keys.move_to_end(key)
        if tx_id in ids:
            ids.move_to_end(tx_id)
            return
        ids[tx_id] = None
        self._size += 1
        self._trim(ids, self.share())
        if self._size > self.total:  # a new key lowered the share: others keep theirs until now
            self._fit()

    def _trim(self, ids: OrderedDict[str, None], keep: int) -> None:
        while len(ids) > keep:
            ids.popitem(last=False)
            self._size -= 1

    def _fit(self) -> None:
        share = self.share()
        for ids in self._keys.values():  # least recently used first
            self._trim(ids, share)
            if self._size <= self.total:
                return
        while self._size > self.total:  # more keys than ids in the budget: forget the oldest keys
            _, evicted = self._keys.popitem(last=False)
            self._size -= len(evicted)

    def clear(self, key: Hashable) -> None:
        ids = self._keys.pop(key, None)
        if ids is not None:
            self._size -= len(ids)

    def keys(self) -> int:
        return len(self._keys)


class RecentWindow:
    """One poller's view of :class:`RecentIds`: ``tx_id in window``, ``add``, ``clear``."""

    __slots__ = ("_ids", "_key")

    def __init__(self, ids: RecentIds, key: Hashable) -> None:
        self._ids = ids
        self._key = key

    def __contains__(self, tx_id: object) -> bool:
        return isinstance(tx_id, str) and self._ids.contains(self._key, tx_id)

    def add(self, tx_id: str) -> None:
        self._ids.add(self._key, tx_id)

    def clear(self) -> None:
        self._ids.clear(self._key)

"""One feed of one agent as a window: its newest items, paged by the id of the last one read.

Absolute positions count every item the feed ever had; the window holds those from
``dropped`` on, so a cursor keeps its position while older items are dropped before it. The
window also knows how far it was ever served, so an item dropped before any page held it (lost
to every reader: :attr:`FeedWindow.dropped_unserved`) is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Item(Protocol):
    @property
    def id(self) -> str | None: ...


T = TypeVar("T", bound=Item)
# Dropped slots kept before the list is shifted: at least this many and at least as many as
# the items kept (amortised O(1) drops). Small, because a quiet feed takes hours to drop many:
# at 1,024, 3,000 quiet feeds kept growing their lists for hours (about 25 MB in all).
COMPACT_AFTER = 64


class FeedWindow(Generic[T]):
    """Append at the end, drop from the front, page after an id still in the window."""

    __slots__ = ("_dropped", "_head", "_items", "_positions", "_served", "dropped_unserved")

    def __init__(self) -> None:
        self._items: list[T | None] = []
        self._head = 0  # index in ``_items`` of the oldest item kept
        self._dropped = 0  # absolute position of the oldest item kept
        self._positions: dict[str, int] = {}  # id -> absolute position (the latest with that id)
        self._served = 0  # absolute position after the newest item any page held
        self.dropped_unserved = 0  # items dropped that no page ever held

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[T]:
        for index in range(self._head, len(self._items)):
            item = self._items[index]
            assert item is not None
            yield item

    def first(self) -> T:
        item = self._items[self._head]
        assert item is not None
        return item

    def append(self, item: T) -> None:
        if item.id is not None:
            self._positions[item.id] = self._dropped + len(self)
        self._items.append(item)

    def drop_first(self) -> T:
        item = self.first()
        if item.id is not None and self._positions.get(item.id) == self._dropped:
            del self._positions[item.id]
        if self._dropped >= self._served:
            self.dropped_unserved += 1
        self._items[self._head] = None
        self._head += 1
        self._dropped += 1
        if self._head >= COMPACT_AFTER and self._head * 2 >= len(self._items):
            del self._items[: self._head]
            self._head = 0
        return item

    def position(self, item_id: str) -> int | None:
        """The absolute position of ``item_id`` while it is in the window."""
        return self._positions.get(item_id)

    def after(self, position: int | None, limit: int, overlap: int = 0) -> list[T]:
        """Up to ``limit`` items after absolute ``position`` (None: from the oldest kept),
        starting up to ``overlap`` items earlier, never before the window."""
        start = 0 if position is None else position + 1
        start = max(self._dropped, start - overlap)
        index = self._head + start - self._dropped
        page = [item for item in self._items[index : index + limit] if item is not None]
        self._served = max(self._served, start + len(page))
        return page

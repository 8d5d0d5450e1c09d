"""Cache policies of the expert store: which resident expert to evict for a new one.

A policy sees the keys of one pool (``(layer, expert)`` pairs) and is told of every hit,
insertion and eviction; `victim` names the resident key to evict. Two implementations:

* `LRUPolicy`: the least recently used (the default; no tuning, and routing at decode
  is correlated from one token to the next within a layer).
* `LFUPolicy`: the least frequently used, counting every access since the store was
  made (evicted keys keep their count, so an expert that is popular overall is kept
  over one that was hot for a moment); ties go to the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

Key = Hashable


class CachePolicy(Protocol):
    """Bookkeeping of one pool of resident keys."""

    def on_hit(self, key: Key) -> None: ...

    def on_insert(self, key: Key) -> None: ...

    def on_evict(self, key: Key) -> None: ...

    def victim(self) -> Key:
        """A resident key to evict (the pool is full)."""
        ...


class LRUPolicy:
    """Evict the least recently used key."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_insert(self, key: Key) -> None:
        self._order[key] = None

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def victim(self) -> Key:
        return next(iter(self._order))


class LFUPolicy:
    """Evict the least frequently used key (counts kept across evictions); ties: the
    least recently used. `victim` scans the resident keys: a pool holds at most a few
    hundred experts."""

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}  # resident keys -> tick of their last access
        self._tick = 0

    def _use(self, key: Key) -> None:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._tick

    def on_hit(self, key: Key) -> None:
        self._use(key)

    def on_insert(self, key: Key) -> None:
        self._use(key)

    def on_evict(self, key: Key) -> None:
        del self._last[key]

    def victim(self) -> Key:
        return min(self._last, key=lambda k: (self._count[k], self._last[k]))


POLICIES: dict[str, Callable[[], CachePolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}

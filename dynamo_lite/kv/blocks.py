"""Prompt blocks as chained hashes, and an LRU of cached blocks that reports what it stores and evicts.

Shared by the router (which prefix does an instance hold?) and the engines (what did I cache?): both must hash
the same way. A block hash covers its block and everything before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import xxhash

from dynamo_lite.protocol import KvEventKind

KvEventSink = Callable[[tuple[int, list[int]]], None]

KV_BLOCK_SIZE = 32
"""Tokens per hashed block (``--kv-block-size``): the engines' and the kv router's must agree."""


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained 64-bit hashes of the full ``block_size``-token blocks of ``token_ids``."""
    out: list[int] = []
    parent = 0
    n_full = len(token_ids) // block_size * block_size
    for start in range(0, n_full, block_size):
        h = xxhash.xxh3_64()
        h.update(parent.to_bytes(8, "little"))
        h.update(
            b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids[start : start + block_size])
        )
        parent = h.intdigest()
        out.append(parent)
    return out


class PrefixCacheIndex:
    """Which block hashes an engine holds, least recently used first, bounded by ``capacity`` blocks.

    ``sink`` (if set) receives ``(KvEventKind, hashes)`` for every store and eviction — the worker publishes
    them so KV-aware routers know where prefixes live.
    """

    def __init__(self, capacity: int, sink: KvEventSink | None = None) -> None:
        self.capacity = capacity
        self.sink = sink
        self._lru: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def cached_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of ``hashes`` are cached."""
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            n += 1
        return n

    def store(self, hashes: list[int]) -> list[int]:
        """Mark ``hashes`` as most recently used (storing new ones); returns the evicted hashes."""
        new = []
        for h in hashes:
            if h in self._lru:
                self._lru.move_to_end(h)
            else:
                self._lru[h] = None
                new.append(h)
        evicted = []
        while len(self._lru) > self.capacity:
            evicted.append(self._lru.popitem(last=False)[0])
        if self.sink is not None:
            if new:
                self.sink((KvEventKind.STORED, new))
            if evicted:
                self.sink((KvEventKind.REMOVED, evicted))
        return evicted

    def clear(self) -> None:
        self._lru.clear()
        if self.sink is not None:
            self.sink((KvEventKind.CLEARED, []))

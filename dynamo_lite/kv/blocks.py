"""Prompt blocks as chained hashes, and an LRU of cached blocks that reports what it stores and evicts.

Shared by the router (which prefix does an instance hold?) and the engines (what did I cache?): both must hash
the same way. A block hash covers its block and everything before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable

from xxhash import xxh3_64_intdigest

from dynamo_lite.protocol import KvEventKind

KvEventSink = Callable[[tuple[int, list[int]]], None]

_INT32 = next(code for code in "ilh" if array(code).itemsize == 4)  # "i" wherever C's int is 32 bits
KV_BLOCK_SIZE = 32
"""Tokens per hashed block (``--kv-block-size``): the engines' and the kv router's must agree."""


def block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Chained 64-bit hashes of the full ``block_size``-token blocks of ``token_ids``: each block's hash is
    xxh3-64 of its parent's hash (8 bytes, little-endian) then its tokens (int32 each, little-endian)."""
    out: list[int] = []
    parent = 0
    n_full = len(token_ids) // block_size * block_size
    # Every token's bytes in one conversion (a per-token int.to_bytes cost ~0.5 µs a token, on the request path).
    tokens = array(_INT32, token_ids[:n_full])
    if sys.byteorder != "little":
        tokens.byteswap()
    data = memoryview(tokens).cast("B")
    step = block_size * 4
    for start in range(0, n_full * 4, step):
        parent = xxh3_64_intdigest(parent.to_bytes(8, "little") + data[start : start + step])
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

"""In-memory discovery: one process, same semantics as etcd (a client's keys vanish when it closes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from dynamo_lite.protocol import DiscoveryEvent


class MemoryStore:
    """The shared key space; each ``MemoryDiscovery`` is one 'process' with its own lease."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}
        self._revision = 0
        self._watchers: list[tuple[str, asyncio.Queue[DiscoveryEvent]]] = []

    def _emit(self, event: DiscoveryEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    def put(self, key: str, value: bytes) -> None:
        self._revision += 1
        self._data[key] = (value, self._revision)
        self._emit(DiscoveryEvent(key, value, self._revision))

    def delete(self, key: str) -> bool:
        if self._data.pop(key, None) is None:
            return False
        self._revision += 1
        self._emit(DiscoveryEvent(key, None, self._revision))
        return True

    def get_prefix(self, prefix: str) -> list[DiscoveryEvent]:
        return [DiscoveryEvent(k, v, r) for k, (v, r) in self._data.items() if k.startswith(prefix)]

    async def watch(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        queue: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        entry = (prefix, queue)
        self._watchers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(entry)


class MemoryDiscovery:
    """A ``Discovery`` client over a ``MemoryStore``. ``close()`` (or ``expire_lease()``) drops its keys."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._own: set[str] = set()

    async def put(self, key: str, value: bytes) -> None:
        self._own.add(key)
        self._store.put(key, value)

    async def put_shared(self, key: str, value: bytes) -> None:
        self._store.put(key, value)

    async def delete(self, key: str) -> None:
        self._own.discard(key)
        self._store.delete(key)

    async def get_prefix(self, prefix: str) -> list[DiscoveryEvent]:
        return self._store.get_prefix(prefix)

    def watch_prefix(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        return self._store.watch(prefix)

    async def delete_prefix(self, prefix: str) -> int:
        keys = [e.key for e in self._store.get_prefix(prefix)]
        return sum(self._store.delete(k) for k in keys)

    def expire_lease(self) -> None:
        """What a crash looks like to the others: every key of this client disappears."""
        for key in list(self._own):
            self._store.delete(key)
        self._own.clear()

    async def close(self) -> None:
        self.expire_lease()

"""KV-aware routing state: prompts hashed in fixed blocks, and which instance holds which blocks.

Block hashes are chained (each covers its block and everything before it), so "instance X holds block hash h"
means X holds that whole prefix. Engines publish ``KvEvent``s (stored / removed / cleared); without events, the
approximate mode assumes a prefix routed to an instance stays cached there for ``approx_ttl_s``.
"""

from __future__ import annotations

import time
from collections import defaultdict

from dynamo_lite.protocol import KvEvent, KvEventKind, RequestPlane, Subscription, WireError, decode
from dynamo_lite.runtime.keys import kv_events_subject


class KvIndex:
    """Which instance holds which blocks; answers "how many leading blocks of this prompt does X hold"."""

    def __init__(self, approx_ttl_s: float) -> None:
        self.approx_ttl_s = approx_ttl_s
        self._holders: defaultdict[int, set[str]] = defaultdict(set)
        self._blocks: defaultdict[str, set[int]] = defaultdict(set)
        self._approx: dict[tuple[str, int], float] = {}  # (instance, block) → expiry, when no events come
        self._event_sources: set[str] = set()  # instances that publish events: trust them, not guesses
        self._sub: Subscription | None = None

    async def start(self, plane: RequestPlane, namespace: str) -> None:
        self._sub = await plane.subscribe(kv_events_subject(namespace), self._on_event)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    def _on_event(self, subject: str, payload: bytes) -> None:
        try:
            event = decode(payload, KvEvent)
        except WireError:
            return
        self.apply(event)

    def apply(self, event: KvEvent) -> None:
        iid = event.instance_id
        self._event_sources.add(iid)
        if event.kind == KvEventKind.CLEARED:
            self.remove_instance(iid)
            self._event_sources.add(iid)
        elif event.kind == KvEventKind.STORED:
            for h in event.block_hashes:
                self._holders[h].add(iid)
                self._blocks[iid].add(h)
        elif event.kind == KvEventKind.REMOVED:
            for h in event.block_hashes:
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(iid)
                    if not holders:
                        del self._holders[h]
                self._blocks[iid].discard(h)

    def instances(self) -> list[str]:
        """Instances the index holds blocks for."""
        return list(self._blocks)

    def remove_instance(self, instance_id: str) -> None:
        for h in self._blocks.pop(instance_id, set()):
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(instance_id)
                if not holders:
                    del self._holders[h]
        self._event_sources.discard(instance_id)

    def routed(self, instance_id: str, hashes: list[int]) -> None:
        """Approximate mode: remember that ``instance_id`` will hold these blocks for a while."""
        if instance_id in self._event_sources:
            return
        expiry = time.monotonic() + self.approx_ttl_s
        for h in hashes:
            self._approx[(instance_id, h)] = expiry
        if len(self._approx) > 1_000_000:
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._approx.items() if t < now]:
            del self._approx[key]

    def overlap(self, instance_id: str, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` cached on ``instance_id``."""
        n = 0
        now = time.monotonic()
        exact = instance_id in self._event_sources
        for h in hashes:
            if exact:
                if instance_id not in self._holders.get(h, ()):
                    break
            else:
                expiry = self._approx.get((instance_id, h))
                if expiry is None or expiry < now:
                    break
            n += 1
        return n

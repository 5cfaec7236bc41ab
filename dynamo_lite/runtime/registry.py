"""Registration (worker side) and the live view of instances and model cards (frontend side)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo_lite.protocol import DiscoveryEvent, InstanceInfo, ModelCard, Role, WireError, decode, encode
from dynamo_lite.runtime import keys
from dynamo_lite.runtime.runtime import Runtime

log = logging.getLogger(__name__)


async def register(runtime: Runtime, info: InstanceInfo, card: ModelCard) -> None:
    """Write the instance and its model card under this process's lease."""
    root, ns = runtime.settings.root, runtime.settings.namespace
    await runtime.discovery.put(keys.model_key(root, ns, card.served_name, info.instance_id), encode(card))
    await runtime.discovery.put(
        keys.instance_key(root, ns, info.role, info.endpoint, info.instance_id), encode(info)
    )


async def deregister(runtime: Runtime, info: InstanceInfo, card: ModelCard) -> None:
    root, ns = runtime.settings.root, runtime.settings.namespace
    await runtime.discovery.delete(keys.instance_key(root, ns, info.role, info.endpoint, info.instance_id))
    await runtime.discovery.delete(keys.model_key(root, ns, card.served_name, info.instance_id))


@dataclass
class _Entry:
    revision: int
    value: object | None  # None: a tombstone (deleted at ``revision``)


@dataclass
class LiveView:
    """Instances and model cards of one namespace, kept current by a prefix watch.

    Survives a broken watch (etcd restart): it re-lists and re-watches, dropping events older than what it
    already knows by store revision.
    """

    runtime: Runtime
    instances: dict[str, InstanceInfo] = field(default_factory=dict)  # instance_id → info
    cards: dict[str, dict[str, ModelCard]] = field(default_factory=dict)  # model → instance_id → card
    on_change: list[Callable[[], None]] = field(default_factory=list)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def _prefix(self) -> str:
        return keys.namespace_prefix(self.runtime.settings.root, self.runtime.settings.namespace)

    async def start(self) -> None:
        """Returns once the first listing is in (within the runtime's connect timeout)."""
        self._task = asyncio.create_task(self._run(), name="discovery-watch")
        await asyncio.wait_for(self._ready.wait(), self.runtime.settings.timeouts.connect_s)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _apply(self, event: DiscoveryEvent) -> bool:
        known = self._entries.get(event.key)
        if known is not None and event.revision and event.revision < known.revision:
            return False
        rest = event.key[len(self._prefix) :]
        value: object | None = None
        if event.value is not None:
            try:
                if rest.startswith("instances/"):
                    value = decode(event.value, InstanceInfo)
                elif rest.startswith("models/"):
                    value = decode(event.value, ModelCard)
                else:
                    return False
            except WireError as e:
                log.warning("ignoring malformed discovery value at %s: %s", event.key, e)
                return False
        self._entries[event.key] = _Entry(event.revision, value)
        parts = rest.split("/")
        if parts[0] == "instances" and len(parts) == 4:
            iid = parts[3]
            if isinstance(value, InstanceInfo):
                self.instances[iid] = value
            else:
                self.instances.pop(iid, None)
        elif parts[0] == "models" and len(parts) == 3:
            model, iid = keys.unquote_name(parts[1]), parts[2]
            if isinstance(value, ModelCard):
                self.cards.setdefault(model, {})[iid] = value
            else:
                per = self.cards.get(model, {})
                per.pop(iid, None)
                if not per:
                    self.cards.pop(model, None)
        return True

    def _notify(self) -> None:
        for cb in self.on_change:
            cb()

    async def _resync(self) -> None:
        listed = await self.runtime.discovery.get_prefix(self._prefix)
        present = {e.key for e in listed}
        changed = False
        for event in listed:
            changed |= self._apply(event)
        for key, entry in list(self._entries.items()):
            if entry.value is not None and key not in present:
                changed |= self._apply(DiscoveryEvent(key, None, 0))
        if changed:
            self._notify()

    async def _run(self) -> None:
        backoff = 0.2
        resync_s = self.runtime.settings.discovery_resync_s or None
        while True:
            watch = self.runtime.discovery.watch_prefix(self._prefix)
            pending = asyncio.ensure_future(watch.__anext__())  # establish the watch before listing
            try:
                await asyncio.sleep(0.01)
                await self._resync()
                self._ready.set()
                backoff = 0.2
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=resync_s)
                    if not done:
                        # The watch may have been created on the server only after the first list (nothing
                        # tells us when): a list taken now repairs what it missed. Applied between events.
                        await self._resync()
                        continue
                    if self._apply(pending.result()):
                        self._notify()
                    pending = asyncio.ensure_future(watch.__anext__())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — etcd restart or network blip: re-list and re-watch
                log.warning("discovery watch broke (%s); re-watching", e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if not pending.done():
                    pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
                try:
                    await watch.aclose()
                except RuntimeError:  # still running after a cancel: it is being torn down anyway
                    pass

    def instances_of(self, role: Role, model: str | None = None) -> list[InstanceInfo]:
        return [i for i in self.instances.values() if i.role == role and (model is None or i.model == model)]

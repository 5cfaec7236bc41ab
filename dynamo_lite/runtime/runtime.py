"""A process's connection to the others: discovery + request plane, built from ``RuntimeSettings``.

Distributed (etcd + NATS) when endpoints are given; otherwise in-memory + in-process, shared by every
``Runtime`` of this process — that is the embedded mode, running the very same code path.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from dynamo_lite.protocol import Discovery, RequestPlane
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.discovery_memory import MemoryDiscovery, MemoryStore
from dynamo_lite.runtime.request_plane_inproc import InProcRequestPlane

_process_store: MemoryStore | None = None
_process_plane: InProcRequestPlane | None = None


def _embedded() -> tuple[MemoryStore, InProcRequestPlane]:
    global _process_store, _process_plane
    if _process_store is None or _process_plane is None:
        _process_store, _process_plane = MemoryStore(), InProcRequestPlane()
    return _process_store, _process_plane


@dataclass
class Runtime:
    settings: RuntimeSettings
    discovery: Discovery
    request_plane: RequestPlane
    owns_request_plane: bool = True
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @classmethod
    async def connect(cls, settings: RuntimeSettings, name: str = "dynamo_lite") -> Runtime:
        if settings.etcd_endpoints:
            from dynamo_lite.runtime.discovery_etcd import EtcdDiscovery, etcd_tls

            discovery: Discovery = await EtcdDiscovery.connect(
                settings.etcd_endpoints,
                settings.lease_ttl_s,
                settings.etcd_username,
                settings.etcd_password,
                settings.timeouts.connect_s,
                etcd_tls(settings),
            )
        else:
            discovery = MemoryDiscovery(_embedded()[0])
        if settings.nats_url:
            from dynamo_lite.runtime.request_plane_nats import NatsRequestPlane

            try:
                plane: RequestPlane = await NatsRequestPlane.connect(settings, name=name)
            except Exception:
                await discovery.close()
                raise
            owns = True
        else:
            plane, owns = _embedded()[1], False
        return cls(settings, discovery, plane, owns)

    async def close(self) -> None:
        await self.discovery.close()
        if self.owns_request_plane:
            await self.request_plane.close()

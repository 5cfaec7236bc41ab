"""What a worker does with a request, per role (as Dynamo's TensorRT-LLM worker has a handler per role).

- prefill, agg, and decode under prefill_first: the engine runs the request as its phase says (``EngineHandler``).
- decode under decode_first (``DecodeFirstHandler``): the router asks this worker directly; it runs the prefill →
  decode handoff itself (``dynamo_lite.placement``): the prefill on a prefill worker, the decode here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from dynamo_lite.engines.base import Engine
from dynamo_lite.placement import Placement, PlacementSettings
from dynamo_lite.protocol import DisaggregationStrategy, GenerateChunk, GenerateRequest, Role
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime


class RequestHandler(Protocol):
    async def start(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    async def stop(self) -> None: ...


class EngineHandler:
    """The engine runs the request: a prefill (first token + KV), a decode (from a KV, or prefilling locally),
    or both."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def start(self) -> None:
        pass

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        return self.engine.generate(request)

    async def stop(self) -> None:
        pass


class DecodeFirstHandler:
    """decode_first: a request asked of this decode worker with ``remote_prefill`` runs its prefill on a prefill
    worker (found through discovery) and decodes here; KV it will not pull is released, as by the router.

    Prefill workers are placed as the router places them (``settings``: the router's flags given to this
    worker), with their load reports."""

    def __init__(self, engine: Engine, runtime: Runtime, settings: PlacementSettings) -> None:
        self.engine = engine
        self.view = LiveView(runtime)
        self.placement = Placement(
            self.view, runtime.request_plane, runtime.settings.namespace, settings, [Role.PREFILL]
        )
        self.handoff = self.placement.handoff

    async def start(self) -> None:
        await self.view.start()
        await self.placement.start()

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if not request.remote_prefill:
            return self.engine.generate(request)
        return self.handoff.run(request.model, request, self.engine.generate)

    async def stop(self) -> None:
        await self.placement.stop()
        await self.view.stop()


def handler_for(
    role: Role,
    strategy: DisaggregationStrategy,
    placement: PlacementSettings,
    engine: Engine,
    runtime: Runtime,
) -> RequestHandler:
    """The handler of a worker of ``role`` (``strategy``: its ``--disaggregation-strategy``; ``placement``: how
    it places prefills under decode_first)."""
    if role == Role.DECODE and strategy == DisaggregationStrategy.DECODE_FIRST:
        return DecodeFirstHandler(engine, runtime, placement)
    return EngineHandler(engine)

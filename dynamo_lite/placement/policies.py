"""Instance selection policies: given the live instances of one role and the request, pick one."""

from __future__ import annotations

import random
from typing import Protocol

from dynamo_lite.kv.blocks import block_hashes
from dynamo_lite.placement.kv_index import KvIndex
from dynamo_lite.placement.load import LoadTracker
from dynamo_lite.placement.settings import PlacementSettings
from dynamo_lite.protocol import GenerateRequest, InstanceInfo


class Policy(Protocol):
    def pick(self, instances: list[InstanceInfo], request: GenerateRequest) -> InstanceInfo: ...


def _ordered(instances: list[InstanceInfo]) -> list[InstanceInfo]:
    return sorted(instances, key=lambda i: i.instance_id) if len(instances) > 1 else instances


class RoundRobin:
    """Cycles through instances in a stable (id) order; one counter per role, so roles don't interfere."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, instances: list[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        ordered = _ordered(instances)
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice


class Random:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, instances: list[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        return self._rng.choice(instances)


class LeastLoaded:
    """The instance with the lowest load score (in-flight, queued, KV usage); ties go round-robin."""

    def __init__(self, load: LoadTracker) -> None:
        self._load = load
        self._tie = RoundRobin()

    def pick(self, instances: list[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        scores = [(self._load.score(i.instance_id), i) for i in instances]
        best = min(s for s, _ in scores)
        return self._tie.pick([i for s, i in scores if s == best], request)


class KvAware:
    """Weighs the prefill work an instance would save (leading prompt blocks it already caches) against its
    load: cost = uncached prompt blocks + ``load_weight`` × load score. The lowest cost wins."""

    def __init__(self, load: LoadTracker, index: KvIndex, block_size: int, load_weight: float) -> None:
        self._load = load
        self._index = index
        self.block_size = block_size
        self.load_weight = load_weight
        self._tie = RoundRobin()

    def pick(self, instances: list[InstanceInfo], request: GenerateRequest) -> InstanceInfo:
        hashes = block_hashes(request.token_ids, self.block_size)
        total = len(request.token_ids) / self.block_size
        costs = []
        for inst in instances:
            cached = self._index.overlap(inst.instance_id, hashes)
            costs.append((total - cached + self.load_weight * self._load.score(inst.instance_id), inst))
        best = min(c for c, _ in costs)
        choice = self._tie.pick([i for c, i in costs if c == best], request)
        self._index.routed(choice.instance_id, hashes)
        return choice


_DEFAULTS = PlacementSettings()

POLICIES = ("round-robin", "random", "least-loaded", "kv")
"""What ``--router-mode`` chooses from."""


def make_policy(
    name: str,
    load: LoadTracker | None = None,
    index: KvIndex | None = None,
    block_size: int = _DEFAULTS.kv_block_size,
    load_weight: float = _DEFAULTS.kv_load_weight,
) -> Policy:
    if name == "round-robin":
        return RoundRobin()
    if name == "random":
        return Random()
    load = load or LoadTracker(_DEFAULTS.load_report_ttl_s)
    if name == "least-loaded":
        return LeastLoaded(load)
    if name == "kv":
        return KvAware(load, index or KvIndex(_DEFAULTS.kv_approx_ttl_s), block_size, load_weight)
    raise ValueError(f"unknown router mode {name!r}; choose from {', '.join(POLICIES)}")

"""Instance selection policies: given the live instances of one role, pick one."""

from __future__ import annotations

import random
from typing import Protocol

from dynamo_lite.protocol import InstanceInfo


class Policy(Protocol):
    def pick(self, instances: list[InstanceInfo], request_id: str) -> InstanceInfo: ...


class RoundRobin:
    """Cycles through instances in a stable (id) order; one counter per role, so roles don't interfere."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, instances: list[InstanceInfo], request_id: str) -> InstanceInfo:
        ordered = sorted(instances, key=lambda i: i.instance_id) if len(instances) > 1 else instances
        choice = ordered[self._next % len(ordered)]
        self._next += 1
        return choice


class Random:
    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, instances: list[InstanceInfo], request_id: str) -> InstanceInfo:
        return self._rng.choice(instances)


POLICIES = {"round-robin": RoundRobin, "random": Random}


def make_policy(mode: str) -> Policy:
    try:
        return POLICIES[mode]()
    except KeyError:
        raise ValueError(f"unknown router mode {mode!r}; choose from {', '.join(POLICIES)}") from None

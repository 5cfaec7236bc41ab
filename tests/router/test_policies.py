"""Instance selection policies."""

from __future__ import annotations

import collections

import pytest

from dynamo_lite.placement.policies import Random, RoundRobin, make_policy
from dynamo_lite.protocol import InstanceInfo


def instances(*ids: str) -> list[InstanceInfo]:
    return [InstanceInfo(i, "ns", "decode", "generate", f"addr.{i}", "m") for i in ids]


def test_round_robin_alternates_in_a_stable_order() -> None:
    rr = RoundRobin()
    picks = [rr.pick(instances("b", "a", "c"), f"r{n}").instance_id for n in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    # The order of the live list does not matter, only who is in it.
    rr = RoundRobin()
    assert [
        rr.pick(instances(*order), "r").instance_id for order in (("a", "b"), ("b", "a"), ("a", "b"))
    ] == ["a", "b", "a"]


def test_round_robin_skips_instances_that_left() -> None:
    rr = RoundRobin()
    assert rr.pick(instances("a", "b"), "r").instance_id == "a"
    assert rr.pick(instances("a"), "r").instance_id == "a"  # b is gone: only a is ever picked
    assert rr.pick(instances("a"), "r").instance_id == "a"


def test_random_picks_only_live_instances_and_spreads() -> None:
    pick = Random(seed=7).pick
    live = instances("a", "b", "c")
    counts = collections.Counter(pick(live, f"r{n}").instance_id for n in range(600))
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 120  # ~200 each
    assert {pick(instances("b"), "r").instance_id for _ in range(20)} == {"b"}


def test_make_policy() -> None:
    assert isinstance(make_policy("round-robin"), RoundRobin)
    assert isinstance(make_policy("random"), Random)
    with pytest.raises(ValueError, match="unknown router mode"):
        make_policy("fastest")

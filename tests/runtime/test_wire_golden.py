"""Golden bytes of every wire message (``golden/*.msgpack``, from ``wire_samples``): today's decoder reads
them into the sample, and today's encoder writes exactly them, so a reader of the release that recorded them
reads what we write."""

from __future__ import annotations

import pytest

from dynamo_lite.protocol import decode, encode
from tests.runtime.wire_samples import GOLDEN, SAMPLES


def test_every_golden_file_has_its_sample() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.msgpack")) == sorted(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_bytes_decode_to_the_sample(name: str) -> None:
    sample = SAMPLES[name]
    assert decode((GOLDEN / f"{name}.msgpack").read_bytes(), type(sample)) == sample


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_encoder_reproduces_the_golden_bytes(name: str) -> None:
    assert encode(SAMPLES[name]) == (GOLDEN / f"{name}.msgpack").read_bytes()

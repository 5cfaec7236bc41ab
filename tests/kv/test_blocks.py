"""Block hashes are a wire contract (the kv router and every engine must hash alike, across versions)."""

from __future__ import annotations

import random

import xxhash

from dynamo_lite.kv.blocks import block_hashes


def _by_definition(token_ids: list[int], block_size: int) -> list[int]:
    """xxh3-64 of the parent's hash (8 bytes little-endian) then the block's tokens (int32 little-endian)."""
    out, parent = [], 0
    for start in range(0, len(token_ids) // block_size * block_size, block_size):
        block = token_ids[start : start + block_size]
        data = parent.to_bytes(8, "little") + b"".join(t.to_bytes(4, "little", signed=True) for t in block)
        parent = xxhash.xxh3_64_intdigest(data)
        out.append(parent)
    return out


def test_block_hashes_keep_their_values() -> None:
    assert block_hashes(list(range(-3, 70)), 32) == [2365632096852706190, 5761965856906412755]


def test_block_hashes_follow_their_definition() -> None:
    rng = random.Random(0)
    for n in (0, 1, 31, 32, 33, 200, 1000):
        for block_size in (1, 16, 32, 64):
            ids = [rng.randrange(-(2**31), 2**31) for _ in range(n)]
            assert block_hashes(ids, block_size) == _by_definition(ids, block_size), (n, block_size)

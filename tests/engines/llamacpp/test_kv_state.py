"""llama.cpp's sequence-state bytes ↔ the KV handoff's layout (no llama.cpp needed: the format is built and
read back here; ``test_llamacpp_engine`` checks it against llama.cpp itself)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dynamo_lite.engines.llamacpp.kv_state import MAGIC, KvStateError, _permute_k, _unpermute_k, build, parse

LAYERS, HEADS, TOKENS, HEAD_DIM = 3, 2, 5, 8


def kv() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((LAYERS, 2, HEADS, TOKENS, HEAD_DIM)).astype(np.float16)


@pytest.mark.parametrize("v_trans", [False, True])
@pytest.mark.parametrize("k_permuted", [False, True])
def test_build_then_parse_is_the_identity(v_trans: bool, k_permuted: bool) -> None:
    x = kv()
    out = parse(build(x, seq=3, v_trans=v_trans, k_permuted=k_permuted), LAYERS, HEADS, HEAD_DIM, k_permuted)
    assert out.dtype == np.float16 and np.array_equal(out, x)


def test_k_rows_are_stored_in_llama_cpp_s_interleaved_order() -> None:
    """HF's K halves (x_i, x_{i+d/2}) rotate together; llama.cpp's GGUF keeps them as neighbours (2i, 2i+1)."""
    hf = np.arange(HEAD_DIM, dtype=np.float16)  # 0..7: halves (0..3) and (4..7)
    assert _permute_k(hf).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert np.array_equal(_unpermute_k(_permute_k(hf)), hf)
    x = kv()
    state = build(x, seq=0, v_trans=False, k_permuted=True)
    header = struct.calcsize("<IiII") + TOKENS * 12 + struct.calcsize("<II") + struct.calcsize("<iQ")
    first_row = np.frombuffer(state, np.float16, HEADS * HEAD_DIM, header).reshape(HEADS, HEAD_DIM)
    assert np.array_equal(first_row, _permute_k(x[0, 0, :, 0]))  # layer 0, K, position 0, every head


def test_cells_in_cache_order_are_sorted_by_position() -> None:
    """A cache that reused freed cells lists a sequence's positions out of order: ``parse`` sorts them."""
    x = kv()
    order = [2, 0, 4, 1, 3]  # cell i holds position order[i]
    state = bytearray(build(x[:, :, :, order], seq=1, v_trans=True, k_permuted=False))
    meta_at = struct.calcsize("<IiII")
    for cell, pos in enumerate(order):
        struct.pack_into("<i", state, meta_at + 12 * cell, pos)
    assert np.array_equal(parse(bytes(state), LAYERS, HEADS, HEAD_DIM, False), x)


def test_states_that_do_not_fit_are_refused() -> None:
    state = build(kv(), seq=0, v_trans=False, k_permuted=False)
    with pytest.raises(KvStateError, match="layers"):
        parse(state, LAYERS + 1, HEADS, HEAD_DIM, False)
    with pytest.raises(KvStateError, match="type"):
        parse(state, LAYERS, HEADS * 2, HEAD_DIM, False)
    with pytest.raises(KvStateError, match="ends early"):
        parse(state[:-2], LAYERS, HEADS, HEAD_DIM, False)
    with pytest.raises(KvStateError, match="magic"):
        parse(struct.pack("<I", MAGIC ^ 1) + state[4:], LAYERS, HEADS, HEAD_DIM, False)
    gap = bytearray(state)
    struct.pack_into("<i", gap, struct.calcsize("<IiII"), 7)  # position 0 → 7: a hole
    with pytest.raises(KvStateError, match="positions"):
        parse(bytes(gap), LAYERS, HEADS, HEAD_DIM, False)

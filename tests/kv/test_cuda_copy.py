"""The one-launch row copy of KV into a cache slot: the row table everywhere, the kernel itself on CUDA."""

from __future__ import annotations

import pytest
import torch

from dynamo_lite.kv import cuda_copy
from dynamo_lite.kv.cuda_ipc import Copy2D, contiguous_strides, plan_copies

needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() or not cuda_copy.available(), reason="needs CUDA and Triton"
)


def test_unaligned_rows_are_left_to_the_copy_engines() -> None:
    # A 2-byte-wide row can't be moved in 16-byte words: no table (on any machine, with or without Triton).
    assert cuda_copy.row_table((Copy2D(0, 64, 0, 2, 2, 3),), 0) is None
    assert cuda_copy.row_table((Copy2D(8, 64, 0, 32, 32, 3),), 0) is None  # a row starting off 16 bytes
    assert cuda_copy.row_table((), 0) is None


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_row_kernel_fills_exactly_the_slot(tokens: int) -> None:
    layers, heads, max_seq, dim = 3, 2, 512, 64
    cache = torch.zeros(layers, 2, 4, heads, max_seq, dim, dtype=torch.bfloat16, device="cuda")
    shape = (layers, 2, heads, tokens, dim)
    src = torch.randn(shape, device="cuda").to(torch.bfloat16)
    dest = cache[:, :, 2, :, :tokens]
    plan = tuple(plan_copies(shape, tuple(dest.stride()), contiguous_strides(shape), 2))
    table = cuda_copy.row_table(plan, 0)
    assert table is not None and table.num_rows == layers * 2 * heads
    assert cuda_copy.row_table(plan, 0) is table  # cached per layout
    assert cuda_copy.copy_rows(table, dest.data_ptr(), src.data_ptr(), 0)
    torch.cuda.synchronize()
    assert torch.equal(dest, src)
    others = cache.clone()
    others[:, :, 2, :, :tokens] = 0
    assert others.abs().sum() == 0  # nothing written outside the slot's first `tokens` positions

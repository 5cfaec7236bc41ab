"""A prefill chunk's blocked causal attention (bf16 on CPU) against SDPA computed in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamo_lite.engines.reference.chunk_attention import block_rows, causal_chunk_attention


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """fp32 SDPA of queries at ``q_start..`` over keys ``0..q_start + n - 1`` -> [n, H * D]."""
    n, nh, hd = q.shape
    end = q_start + n
    mask = torch.ones(n, end, dtype=torch.bool).tril(q_start)
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None],
        k[:, :end].float()[None],
        v[:, :end].float()[None],
        attn_mask=mask,
        scale=scale,
        enable_gqa=True,
    )
    return o[0].transpose(0, 1).reshape(n, nh * hd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("n", "q_start"), [(1, 0), (7, 0), (300, 0), (77, 200), (150, 41)])
def test_blocked_attention_matches_sdpa(dtype: torch.dtype, n: int, q_start: int) -> None:
    torch.manual_seed(n + q_start)
    nh, nkv, hd, length = 6, 2, 32, 512  # GQA: 3 query heads per KV head; the slot longer than the keys used
    q = torch.randn(n, nh, hd).to(dtype)
    k = torch.randn(nkv, length, hd).to(dtype)
    v = torch.randn(nkv, length, hd).to(dtype)
    scale = hd**-0.5
    out = torch.full((n, nh * hd), float("nan"), dtype=dtype)
    causal_chunk_attention(q, k, v, q_start, scale, out)
    ref = _reference(q, k, v, q_start, scale)
    err = float((out.float() - ref).norm() / ref.norm())
    # bf16: scores and probabilities rounded to bf16 (as transformers' eager bf16 attention does)
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-5), err


def test_blocks_are_bounded_and_span_several_for_long_chunks() -> None:
    assert block_rows(9, 1000, 2) * 9 * 1000 * 2 <= 2 << 20  # one block's scores fit the budget
    assert block_rows(9, 1000, 2) % 16 == 0
    assert block_rows(9, 100_000, 2) == 32  # never fewer rows than MIN_BLOCK
    torch.manual_seed(0)
    n, nh, nkv, hd = 1000, 3, 1, 16
    q, k, v = torch.randn(n, nh, hd), torch.randn(nkv, n, hd), torch.randn(nkv, n, hd)
    assert block_rows(nh, n, 4) < n  # several blocks here
    out = torch.empty(n, nh * hd)
    causal_chunk_attention(q, k, v, 0, 0.25, out)
    torch.testing.assert_close(out, _reference(q, k, v, 0, 0.25), atol=1e-5, rtol=1e-4)

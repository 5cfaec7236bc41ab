"""gpt-oss's rotary embedding applied in place to the q and k heads of a fused qkv projection's output.

Rotate-half as one multiply-add per element: ``x * [cos, cos] + roll(x, half) * [-sin, sin]`` (the tables carry
the sign), each product and the sum rounded to the activations' dtype as torch's elementwise ops round them, so
the Triton kernel (CUDA: one pass over q and k) and the torch form (four passes; every other device) give the same
bits. At a 16k-token prefill step of the 120b shape the torch form took ~1 ms a layer.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: the torch form serves
    HAVE_TRITON = False


def rope_torch_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``qk`` [T, heads, head_dim] rotated in place; ``cos``/``sin`` [T, 1, head_dim]."""
    rotated = torch.roll(qk, qk.shape[-1] // 2, dims=-1).mul_(sin)
    qk.mul_(cos).add_(rotated)


if HAVE_TRITON:

    @triton.jit
    def _rope_kernel(
        x_ptr,
        stride_t,
        cos_ptr,
        sin_ptr,
        stride_c,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """One token's ``HEADS`` heads (contiguous, ``HEAD_DIM`` each) rotated in place."""
        t = tl.program_id(0)
        d = tl.arange(0, HEAD_DIM)
        rolled = (d + HEAD_DIM // 2) % HEAD_DIM  # torch.roll by half: out[d] = x[(d - half) mod head_dim]
        cos = tl.load(cos_ptr + t.to(tl.int64) * stride_c + d).to(tl.float32)
        sin = tl.load(sin_ptr + t.to(tl.int64) * stride_c + d).to(tl.float32)
        row = x_ptr + t.to(tl.int64) * stride_t
        dtype = x_ptr.dtype.element_ty
        for h0 in tl.static_range(0, HEADS, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            ok = (h < HEADS)[:, None]
            x = tl.load(row + h[:, None] * HEAD_DIM + d[None, :], mask=ok, other=0.0)
            xr = tl.load(row + h[:, None] * HEAD_DIM + rolled[None, :], mask=ok, other=0.0)
            a = (xr.to(tl.float32) * sin[None, :]).to(dtype)
            b = (x.to(tl.float32) * cos[None, :]).to(dtype)
            out = (b.to(tl.float32) + a.to(tl.float32)).to(dtype)
            tl.store(row + h[:, None] * HEAD_DIM + d[None, :], out, mask=ok)


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``qk`` [T, heads, head_dim] (heads contiguous; rows may be strided, e.g. a view of qkv) rotated in place
    by ``cos``/``sin`` [T, 1, head_dim]: one Triton kernel on CUDA, the torch form elsewhere."""
    t, heads, head_dim = qk.shape
    fits = (
        qk.stride(2) == 1 and qk.stride(1) == head_dim and cos.stride(2) == 1 and sin.stride() == cos.stride()
    )
    if not (HAVE_TRITON and qk.is_cuda and fits and head_dim & (head_dim - 1) == 0) or t == 0:
        rope_torch_(qk, cos, sin)
        return
    _rope_kernel[(t,)](
        qk, qk.stride(0), cos, sin, cos.stride(0), HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=16, num_warps=4,
        enable_fp_fusion=False,  # fp32: a product and the sum fused into an FMA would round differently from torch
    )  # fmt: skip

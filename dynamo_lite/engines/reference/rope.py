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
        rows_ptr,
        index_ptr,
        HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        KV_HEADS: tl.constexpr,
    ):
        """One token's ``HEADS`` heads (contiguous, ``HEAD_DIM`` each) rotated in place. ``KV_HEADS > 0``: the
        last ``KV_HEADS`` of them are k heads, followed in the row by as many v heads, and both are also stored
        to ``rows`` [R, HEAD_DIM] at ``index`` [T, 2 * KV_HEADS] (the cache's rows for the token's k|v heads)."""
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
            if KV_HEADS > 0:
                if h0 + BLOCK_H > HEADS - KV_HEADS:  # this block holds k heads
                    kv = h - (HEADS - KV_HEADS)
                    is_k = (kv >= 0) & (h < HEADS)
                    dest = tl.load(index_ptr + t.to(tl.int64) * 2 * KV_HEADS + kv, mask=is_k, other=0)
                    tl.store(rows_ptr + dest[:, None] * HEAD_DIM + d[None, :], out, mask=is_k[:, None])
        if KV_HEADS > 0:
            for j in tl.static_range(KV_HEADS):  # the v heads, as they are
                v = tl.load(row + (HEADS + j) * HEAD_DIM + d)
                dest = tl.load(index_ptr + t.to(tl.int64) * 2 * KV_HEADS + KV_HEADS + j)
                tl.store(rows_ptr + dest * HEAD_DIM + d, v)


def kernel_applies(
    qk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> bool:
    """Whether ``rope_`` runs these tensors through the Triton kernel (else the torch form)."""
    t, heads, head_dim = qk.shape
    fits = (
        qk.stride(2) == 1 and qk.stride(1) == head_dim and cos.stride(2) == 1 and sin.stride() == cos.stride()
    )
    if store is not None:
        kv, rows, index = store
        k_offset = (heads - kv.shape[1] // (2 * head_dim)) * head_dim * qk.element_size()
        fits = (
            fits
            and (t == 1 or kv.stride(0) == qk.stride(0))  # one row: view() may give it any stride
            and kv.stride(1) == 1
            and kv.data_ptr() == qk.data_ptr() + k_offset
            and rows.is_contiguous()
            and index.is_contiguous()
        )
    return HAVE_TRITON and qk.is_cuda and fits and head_dim & (head_dim - 1) == 0 and t > 0


def rope_(
    qk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """``qk`` [T, heads, head_dim] (heads contiguous; rows may be strided, e.g. a view of qkv) rotated in place
    by ``cos``/``sin`` [T, 1, head_dim]: one Triton kernel on CUDA, the torch form elsewhere.

    ``store = (kv, rows, index)``: after the rotation, ``kv`` [T, 2 * kv_heads * head_dim] (the qkv output's k|v
    heads; its k heads are ``qk``'s last ones) goes to ``rows`` [R, head_dim] at ``index`` [T * 2 * kv_heads]
    (``KvCache.store_index``) — in the same kernel on CUDA, by ``index_copy_`` elsewhere."""
    t, heads, head_dim = qk.shape
    if not kernel_applies(qk, cos, sin, store):
        rope_torch_(qk, cos, sin)
        if store is not None:
            kv, rows, index = store
            rows.index_copy_(0, index, kv.reshape(-1, head_dim))
        return
    rows, index = (store[1], store[2]) if store is not None else (qk, qk)
    kv_heads = store[0].shape[1] // (2 * head_dim) if store is not None else 0
    _rope_kernel[(t,)](
        qk, qk.stride(0), cos, sin, cos.stride(0), rows, index, HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=16,
        KV_HEADS=kv_heads, num_warps=4,
        enable_fp_fusion=False,  # fp32: a product and the sum fused into an FMA would round differently from torch
    )  # fmt: skip

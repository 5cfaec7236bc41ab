"""A layer's residual add and the RMSNorm that follows it, in one pass (CUDA, bf16/fp16).

gpt-oss's decode step adds each sub-layer's output to the residual stream and normalizes the sum for the next
sub-layer: torch runs that as an add and an RMSNorm, and the routed experts' output first as a sum over the k
experts (and the split-K slices) and a cast. At a one-token step of gpt-oss-120b those were ~6 kernels a layer
of a few µs each (~20 µs of a ~130 µs layer). Here one Triton program a token does all of it:

- ``add_rms_norm``: ``x + delta`` rounded to the activations' dtype, and its RMSNorm.
- ``moe_add_rms_norm``: the experts' fp32 partial sums ``[slices, T, k, hidden]`` summed in fp32 and rounded to the
  dtype (as ``sum().to(dtype)``), added to ``x``, and the sum's RMSNorm.

The norm is transformers' ``GptOssRMSNorm``: fp32 ``x * rsqrt(mean(x²) + eps)``, times the weight, rounded once.
fp32 models and other devices keep torch's ops (the same calls the model made before, so their bits are unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: torch's ops serve
    HAVE_TRITON = False


def fused_applies(x: torch.Tensor) -> bool:
    """Whether the residual adds and norms of activations like ``x`` run as the fused kernels."""
    return HAVE_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + delta, rms_norm(x + delta) * weight)`` for ``[T, hidden]`` activations."""
    if not fused_applies(x):
        x = x + delta
        return x, F.rms_norm(x, (x.shape[1],), weight, eps)
    return _launch(x, delta.contiguous(), weight, eps, slices=0, top_k=0)


def moe_add_rms_norm(
    parts: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + y, rms_norm(x + y) * weight)`` where ``y = parts.sum((0, 2)).to(x.dtype)``: ``parts`` the routed
    experts' fp32 outputs ``[slices, T, k, hidden]`` (already weighted by the router)."""
    slices, _, top_k, _ = parts.shape
    if not fused_applies(x):
        return add_rms_norm(x, parts.sum(dim=(0, 2)).to(x.dtype), weight, eps)
    return _launch(x, parts.contiguous(), weight, eps, slices=slices, top_k=top_k)


def _launch(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, slices: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, hidden = x.shape
    x = x.contiguous()
    summed = torch.empty_like(x)
    normed = torch.empty_like(x)
    if tokens:
        block = triton.next_power_of_2(hidden)
        _add_rms_norm_kernel[(tokens,)](
            x,
            delta,
            weight,
            summed,
            normed,
            tokens,
            eps,
            HIDDEN=hidden,
            BLOCK=block,
            SLICES=slices,
            TOP_K=top_k,
            num_warps=4 if block <= 4096 else 8,
        )
    return summed, normed


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["tokens"])
    def _add_rms_norm_kernel(
        x_ptr,
        delta_ptr,
        weight_ptr,
        summed_ptr,
        normed_ptr,
        tokens,
        eps,
        HIDDEN: tl.constexpr,
        BLOCK: tl.constexpr,
        SLICES: tl.constexpr,
        TOP_K: tl.constexpr,
    ):
        """One token. ``SLICES == 0``: ``delta`` is ``[T, HIDDEN]`` in x's dtype; else fp32 ``[SLICES, T, TOP_K,
        HIDDEN]``, summed over slices and experts in fp32, then rounded to x's dtype."""
        t = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        ok = offs < HIDDEN
        dtype = x_ptr.dtype.element_ty
        row = t.to(tl.int64) * HIDDEN
        x = tl.load(x_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
        if SLICES == 0:
            delta = tl.load(delta_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            delta = tl.zeros([BLOCK], dtype=tl.float32)
            for s in tl.static_range(SLICES):
                for k in tl.static_range(TOP_K):
                    part = ((s * tokens + t) * TOP_K + k).to(tl.int64) * HIDDEN
                    delta += tl.load(delta_ptr + part + offs, mask=ok, other=0.0)
            delta = delta.to(dtype).to(tl.float32)
        summed = (x + delta).to(dtype)
        tl.store(summed_ptr + row + offs, summed, mask=ok)
        s32 = summed.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(s32 * s32, axis=0) / HIDDEN + eps)
        w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row + offs, (w * (s32 * rstd)).to(dtype), mask=ok)

"""The router's top-k and the softmax over the k picked logits, one Triton program per token (CUDA, bf16/fp16).

torch does it in three kernels (``topk``'s gather and sort, then ``softmax``): at a one-token decode step of
gpt-oss-120b that was ~10 µs a layer of a ~140 µs layer. Same contract as torch's: the k largest logits in
descending order (ties to the lower expert id), their softmax computed in fp32 and rounded to the logits' dtype.
fp32 models keep torch's ops (their results are compared bit for bit with transformers').
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch builds
    HAVE_TRITON = False

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def fused_topk_applies(logits: torch.Tensor) -> bool:
    """Whether the router runs ``topk_softmax`` for these logits (else torch's ops)."""
    return (
        HAVE_TRITON
        and logits.is_cuda
        and logits.dtype in (torch.bfloat16, torch.float16)
        and logits.dim() == 2
    )


def topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k] in the logits' dtype, ids [T, k] int64)`` for router logits ``[T, E]``."""
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _topk_softmax_kernel[(tokens,)](
            logits,
            logits.stride(0),
            weights,
            ids,
            E=experts,
            E_POW2=triton.next_power_of_2(experts),
            K=top_k,
            K_POW2=triton.next_power_of_2(top_k),
            LIBDEVICE=not _INTERPRETED,
            num_warps=1,
        )
    return weights, ids


if HAVE_TRITON:

    @triton.jit
    def _topk_softmax_kernel(
        logits_ptr,
        stride_t,
        weights_ptr,
        ids_ptr,
        E: tl.constexpr,
        E_POW2: tl.constexpr,
        K: tl.constexpr,
        K_POW2: tl.constexpr,
        LIBDEVICE: tl.constexpr,
    ):
        t = tl.program_id(0)
        offs = tl.arange(0, E_POW2)
        x = tl.load(logits_ptr + t.to(tl.int64) * stride_t + offs, mask=offs < E, other=float("-inf"))
        x = x.to(tl.float32)
        slots = tl.arange(0, K_POW2)
        top = tl.full([K_POW2], float("-inf"), tl.float32)
        picked = tl.zeros([K_POW2], tl.int32)
        for j in tl.static_range(K):
            best = tl.max(x, 0)
            at = tl.min(tl.where(x == best, offs, E_POW2), 0)
            top = tl.where(slots == j, best, top)
            picked = tl.where(slots == j, at, picked)
            x = tl.where(offs == at, float("-inf"), x)
        shifted = top - tl.max(top, 0)
        if (
            LIBDEVICE
        ):  # expf as torch's softmax computes it, not the approximate exp2 path (interpreter: numpy's)
            e = libdevice.exp(shifted)
        else:
            e = tl.exp(shifted)
        e = tl.where(slots < K, e, 0.0)
        w = e / tl.sum(e, 0)
        out = t.to(tl.int64) * K + slots
        tl.store(weights_ptr + out, w.to(weights_ptr.dtype.element_ty), mask=slots < K)
        tl.store(ids_ptr + out, picked.to(tl.int64), mask=slots < K)

"""The router's top-k and the softmax over the k picked logits, one Triton program per token (CUDA, bf16/fp16).

torch does it in three kernels (``topk``'s gather and sort, then ``softmax``): at a one-token decode step of
gpt-oss-120b that was ~10 µs a layer of a ~140 µs layer. Same contract as torch's: the k largest logits in
descending order (ties to the lower expert id), their softmax computed in fp32 and rounded to the logits' dtype.
fp32 models keep torch's ops (their results are compared bit for bit with transformers').

For steps of a few tokens the router's logits come from ``router_logits`` too (a product of 0.7 MB of weights,
which cuBLAS split over K and reduced in a second kernel).
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


# Steps of up to this many tokens take ``router_logits`` (CUDA, bf16/fp16): cuBLAS ran a one-token step's router
# (128 x 2880) as a split-K product plus a reduction kernel, ~6 µs a layer for 0.7 MB of weights.
SMALL_ROUTER_TOKENS = 8
_ROUTER_BLOCK_E = 4  # experts a program: 32 programs for gpt-oss's 128, each reading its rows in one load


def small_router_applies(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the router's logits for ``h`` [T, hidden] come from ``router_logits`` (else ``F.linear``)."""
    return (
        fused_topk_applies(h)
        and h.shape[0] <= SMALL_ROUTER_TOKENS
        and weight.dtype == h.dtype
        and weight.is_contiguous()
        and h.stride(1) == 1
    )


def router_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``h @ weight.T + bias`` [T, E] in ``h``'s dtype (fp32 sums, rounded once), one program per token and
    ``_ROUTER_BLOCK_E`` experts, each expert's whole row in one load."""
    tokens, hidden = h.shape
    experts = weight.shape[0]
    logits = torch.empty(tokens, experts, dtype=h.dtype, device=h.device)
    if tokens:
        _router_logits_kernel[(tokens, triton.cdiv(experts, _ROUTER_BLOCK_E))](
            h, h.stride(0), weight, bias, logits, E=experts, HIDDEN=hidden,
            BLOCK_E=_ROUTER_BLOCK_E, BLOCK_K=triton.next_power_of_2(hidden), num_warps=8,
        )  # fmt: skip
    return logits


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

    @triton.jit
    def _router_logits_kernel(
        h_ptr,
        stride_t,
        w_ptr,
        bias_ptr,
        out_ptr,
        E: tl.constexpr,
        HIDDEN: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        t = tl.program_id(0)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        k = tl.arange(0, BLOCK_K)
        k_ok = k < HIDDEN
        e_ok = e < E
        x = tl.load(h_ptr + t.to(tl.int64) * stride_t + k, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * HIDDEN + k[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        acc += tl.load(bias_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * E + e, acc.to(out_ptr.dtype.element_ty), mask=e_ok)

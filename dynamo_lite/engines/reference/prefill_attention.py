"""Flash-style prefill attention for gpt-oss in Triton: learned sinks, an optional sliding window, GQA.

``prefill_attention_triton`` takes exactly the arguments of the eager ``attention.prefill_attention`` (the
reference, and the CPU path): one chunk's queries ``q`` [n, H, D] at positions ``q_start..`` over keys/values
[m, KVH, D] at positions ``k_start..`` (the chunk's own keys, or earlier cached positions followed by them),
causal, limited to the last ``window`` positions when ``window`` > 0 -> [n, H * D] in ``q``'s dtype. Any row and
head strides (``q`` is a view of the fused qkv buffer; a cache slot's keys come transposed); the last dim dense.

One program holds ``BLOCK_M`` queries of one head and walks the keys they can see in blocks of ``BLOCK_N`` with
an online softmax (running max, running sum, rescaled accumulator): the scores never leave registers. The sink
joins the softmax's denominator only, so it is simply the running state a program starts from: max = sink,
sum = exp(sink - sink) = 1, accumulator 0. That also keeps the running max finite, so a key block that is fully
masked for a row (a window's edge) cannot produce ``exp(-inf - -inf)``.

The keys of a query block split in three ranges: the leading keys at a window's edge (masked), the keys every
query of the block sees (no mask arithmetic: the bulk of a full-attention layer's work), and the trailing keys at
the causal diagonal (masked). Exponentials run in base 2 with ``scale * log2(e)`` folded into the scores.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: the eager reference serves
    HAVE_TRITON = False

LOG2E = 1.0 / math.log(2.0)
# Triton's interpreter (TRITON_INTERPRET=1, how the kernel is tested on CPUs) multiplies bf16 operands of tl.dot
# as their raw bits: under it the products run in fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True, slots=True)
class FlashConfig:
    """Launch settings: queries per program, keys per inner step, warps, software-pipelining stages."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = FlashConfig()
# Settings the GPU benchmark compares (benchmarks/gpu/prefill_attention.py); the default is the first.
CANDIDATE_CONFIGS = (
    DEFAULT_CONFIG,
    FlashConfig(128, 64, 8, 2),
    FlashConfig(128, 32, 4, 3),
    FlashConfig(64, 64, 4, 3),
    FlashConfig(128, 128, 8, 2),
)


if HAVE_TRITON:

    @triton.jit
    def _attend_block(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        q_pos,
        n0,
        end,
        k_start,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        WINDOWED: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Fold the keys at positions ``n0..n0 + BLOCK_N - 1`` (those before ``end``) into the running softmax
        state. Unmasked: a whole block of keys every query of the program sees."""
        d = tl.arange(0, HEAD_DIM)
        k_pos = n0 + tl.arange(0, BLOCK_N)
        rows = (k_pos - k_start).to(tl.int64)
        if MASKED:
            in_range = k_pos < end
            k = tl.load(k_base + rows[:, None] * stride_kn + d[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * stride_vn + d[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_base + rows[:, None] * stride_kn + d[None, :])
            v = tl.load(v_base + rows[:, None] * stride_vn + d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:  # fp32: exact products, not tf32
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            visible = (k_pos[None, :] <= q_pos[:, None]) & in_range[None, :]
            if WINDOWED:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_i

    @triton.jit
    def _attend(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        q_pos,
        start,
        end,
        k_start,
        window,
        qk_scale,
        stride_kn,
        stride_vn,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        MASKED: tl.constexpr,
        WINDOWED: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        """Keys ``start..end - 1`` in blocks of ``BLOCK_N``. Compiled: a ``range`` loop (software-pipelined by
        ``num_stages``). The interpreter keeps scalars as 1-element arrays that numpy 2 will not turn into a
        ``range`` bound: there the same blocks run in a ``while`` loop."""
        if INTERPRETED:
            n0 = start
            while n0 < end:
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_base, v_base, q_pos, n0, end, k_start, window, qk_scale, stride_kn,
                    stride_vn, HEAD_DIM, BLOCK_N, MASKED, WINDOWED, IEEE, UPCAST,
                )  # fmt: skip
                n0 += BLOCK_N
        else:
            for n0 in range(start, end, BLOCK_N):
                acc, m_i, l_i = _attend_block(
                    acc, m_i, l_i, q, k_base, v_base, q_pos, n0, end, k_start, window, qk_scale, stride_kn,
                    stride_vn, HEAD_DIM, BLOCK_N, MASKED, WINDOWED, IEEE, UPCAST,
                )  # fmt: skip
        return acc, m_i, l_i

    # Lengths and offsets change with every chunk: not specialized on (else a compile per divisibility class of
    # each, on first use, while serving).
    @triton.jit(do_not_specialize=["n", "q_start", "k_start", "window"])
    def _prefill_kernel(
        Q,
        K,
        V,
        Sinks,
        Out,
        n,
        q_start,
        k_start,
        window,
        qk_scale,
        stride_qn,
        stride_qh,
        stride_kn,
        stride_kh,
        stride_vn,
        stride_vh,
        stride_on,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        WINDOWED: tl.constexpr,
        HAS_SINKS: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):
        block = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        offs = block * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        real = offs < n
        q_pos = q_start + offs
        q = tl.load(
            Q + offs[:, None].to(tl.int64) * stride_qn + h * stride_qh + d[None, :], mask=real[:, None]
        )
        if UPCAST:
            q = q.to(tl.float32)
        if HAS_SINKS:  # the sink's column, already folded in: max = sink, sum = 1, nothing added to acc
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + h).to(tl.float32) * 1.4426950408889634
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:  # finite, so exp2(m_i - m_new) never sees -inf - -inf
            m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        first = q_start + block * BLOCK_M
        last = tl.minimum(first + BLOCK_M, q_start + n) - 1
        lo = k_start
        inner_lo = k_start
        if WINDOWED:
            lo = tl.maximum(k_start, first - window + 1)
            inner_lo = tl.maximum(lo, last - window + 1)  # from here the last query's window reaches
        hi = last + 1  # causal: nothing after the last query
        inner_hi = first + 1  # up to here the first query sees every key
        # [lo, a) masked, [a, b) whole unmasked blocks, [b, hi) masked; a and b sit on block steps from lo.
        a = tl.minimum(lo + (tl.maximum(inner_lo - lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
        b = a + tl.maximum(inner_hi - a, 0) // BLOCK_N * BLOCK_N
        k_base = K + kvh * stride_kh
        v_base = V + kvh * stride_vh
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_base, v_base, q_pos, lo, a, k_start, window, qk_scale, stride_kn, stride_vn,
            HEAD_DIM, BLOCK_N, True, WINDOWED, IEEE, UPCAST, INTERPRETED,
        )  # fmt: skip
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_base, v_base, q_pos, a, b, k_start, window, qk_scale, stride_kn, stride_vn,
            HEAD_DIM, BLOCK_N, False, WINDOWED, IEEE, UPCAST, INTERPRETED,
        )  # fmt: skip
        acc, m_i, l_i = _attend(
            acc, m_i, l_i, q, k_base, v_base, q_pos, b, hi, k_start, window, qk_scale, stride_kn, stride_vn,
            HEAD_DIM, BLOCK_N, True, WINDOWED, IEEE, UPCAST, INTERPRETED,
        )  # fmt: skip
        out = acc / l_i[:, None]
        o_ptr = Out + offs[:, None].to(tl.int64) * stride_on + h * HEAD_DIM + d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=real[:, None])


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    k_start: int,
    window: int,
    sinks: torch.Tensor | None,
    scale: float,
    *,
    config: FlashConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """The eager ``prefill_attention``'s contract, computed flash-style (see the module docstring)."""
    n, nh, hd = q.shape
    m, nkv, _ = k.shape
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("prefill attention needs a dense head dim")
    if q_start < k_start or q_start + n > k_start + m:
        raise ValueError(f"keys at {k_start}..{k_start + m - 1} do not cover queries at {q_start}..")
    out = torch.empty(n, nh * hd, dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    block_m = config.block_m
    if _INTERPRETED:  # the interpreter pays per program, not per element: small tiles only cost time
        block_m = min(block_m, max(16, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block_m), nh)
    _prefill_kernel[grid](
        q,
        k,
        v,
        sinks if sinks is not None else q,  # never read without sinks
        out,
        n,
        q_start,
        k_start,
        window,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        GROUP=nh // nkv,
        HEAD_DIM=hd,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        WINDOWED=window > 0,
        HAS_SINKS=sinks is not None,
        IEEE=q.dtype == torch.float32,
        UPCAST=_INTERPRETED and q.dtype != torch.float32,
        INTERPRETED=_INTERPRETED,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def triton_supported(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether ``prefill_attention_triton`` can run here for this shape (it is also checked numerically)."""
    return (
        HAVE_TRITON
        and device.type == "cuda"
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def self_check(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device, window: int
) -> float:
    """Largest relative error of the Triton path against the eager reference (in fp32) on random data: a first
    chunk, and a chunk continuing after cached positions, full and windowed; the caller decides whether to trust
    it."""
    from dynamo_lite.engines.reference.attention import prefill_attention

    gen = torch.Generator(device="cpu").manual_seed(0)
    worst = 0.0
    sinks = (torch.randn(num_heads, generator=gen) * 2).to(device)
    for n, q_start, layer_window in ((300, 0, 0), (300, 0, window), (77, 200, 0), (77, 200, window)):
        k_start = max(0, q_start - layer_window + 1) if layer_window and q_start else 0
        m = q_start + n - k_start
        fused = torch.randn(n, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
        q = fused[:, :num_heads].to(device, dtype)  # the fused buffer's row stride, as the model passes it
        k = torch.randn(m, num_kv_heads, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(m, num_kv_heads, head_dim, generator=gen).to(device, dtype)
        scale = head_dim**-0.5
        ref = prefill_attention(q.float(), k.float(), v.float(), q_start, k_start, layer_window, sinks, scale)
        got = prefill_attention_triton(q, k, v, q_start, k_start, layer_window, sinks, scale).float()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    return worst

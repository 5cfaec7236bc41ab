"""Attention of decode tokens over their own slots of the KV cache, each up to its own length.

``decode_attention_torch`` is the reference (any device; one SDPA over the longest length, with a mask).
``decode_attention_triton`` is the CUDA path: flash-decoding in two Triton kernels, reading each sequence's
keys only up to its length, with shapes that depend on the batch size alone, so a decode step can be
captured in a CUDA graph (the lengths are device data, never a host value).

Shapes: ``q`` [B, heads, head_dim] (any row stride, dense last dim); ``k_cache``/``v_cache`` one layer of the
cache, [slots, kv_heads, max_seq, head_dim]; ``slots``/``lens`` [B] int64 on the device. Output [B, heads *
head_dim] in ``q``'s dtype; the query heads ``h*group .. h*group+group-1`` share kv head ``h``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: the torch reference serves
    HAVE_TRITON = False

SPLITS = 16  # key ranges per (sequence, kv head) worked on in parallel; must be a power of 2
BLOCK_N = 32  # keys per inner iteration (products on the CUDA cores)
DOT_GROUP = 8  # query heads per kv head from which the products run as matrix products (tensor cores)
DOT_ROWS = 16  # a matrix product's smallest M: the group's query rows padded to it
DOT_BLOCK_N = 64  # keys per inner iteration of the matrix-product form


def uses_dot(group: int) -> bool:
    """Whether the kernel computes q·k and p·v as matrix products (``tl.dot``): for 8 or more query heads per kv
    head. Broadcast products held group x keys x head_dim values per program, which at gpt-oss's 8 heads per kv
    head ran at ~0.4 TB/s on an H200 (7.6 ms of a 22.5 ms decode step at batch 64)."""
    return group >= DOT_GROUP


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Reference: gather each row's slot, mask keys at or past its length (syncs on ``lens.max()``)."""
    b, nh, hd = q.shape
    nkv = k_cache.shape[1]
    length = int(lens.max())
    k = k_cache[slots, :, :length]
    v = v_cache[slots, :, :length]
    mask = (torch.arange(length, device=q.device)[None, :] < lens[:, None]).view(b, 1, 1, length)
    o = F.scaled_dot_product_attention(q.reshape(b, nkv, nh // nkv, hd), k, v, attn_mask=mask, scale=scale)
    return o.reshape(b, nh * hd)


if HAVE_TRITON:

    @triton.jit
    def _partial_kernel(
        Q,
        K,
        V,
        Slots,
        Lens,
        Acc,
        Ml,
        scale,
        stride_qb,
        stride_qh,
        stride_ks,
        stride_kh,
        stride_kt,
        stride_vs,
        stride_vh,
        stride_vt,
        GROUP: tl.constexpr,
        GROUP_P: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        USE_DOT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lens + b).to(tl.int32)
        slot = tl.load(Slots + b).to(tl.int64)
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(length, start + per_split)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, HEAD_DIM)
        head = kvh * GROUP + g
        gmask = g < GROUP
        q_ptr = Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr, mask=gmask[:, None], other=0.0)
        if not USE_DOT:
            q = q.to(tl.float32)
        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, HEAD_DIM], tl.float32)
        k_base = K + slot * stride_ks + kvh * stride_kh
        v_base = V + slot * stride_vs + kvh * stride_vh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            rows = n[:, None].to(tl.int64)
            k = tl.load(k_base + rows * stride_kt + d[None, :], mask=nmask[:, None], other=0.0)
            if USE_DOT:
                if IEEE:  # fp32: exact products, not tf32
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    s = tl.dot(q, tl.trans(k)) * scale
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_base + rows * stride_vt + d[None, :], mask=nmask[:, None], other=0.0)
            if USE_DOT:
                if IEEE:
                    pv = tl.dot(p, v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
            else:
                pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        row = (b.to(tl.int64) * NUM_HEADS + head) * SPLITS + split
        tl.store(Acc + row[:, None] * HEAD_DIM + d[None, :], acc, mask=gmask[:, None])
        tl.store(Ml + row * 2, m_i, mask=gmask)
        tl.store(Ml + row * 2 + 1, l_i, mask=gmask)

    @triton.jit
    def _combine_kernel(
        Acc,
        Ml,
        Out,
        Sinks,
        stride_ob,
        HEAD_DIM: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        SPLITS: tl.constexpr,
        HAS_SINKS: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM)
        row = (b.to(tl.int64) * NUM_HEADS + h) * SPLITS + s
        m = tl.load(Ml + row * 2)
        l_s = tl.load(Ml + row * 2 + 1)
        acc = tl.load(Acc + row[:, None] * HEAD_DIM + d[None, :])
        m_max = tl.max(m, axis=0)
        if HAS_SINKS:  # the head's sink joins the softmax's denominator only (it has no value)
            sink = tl.load(Sinks + h).to(tl.float32)
            m_max = tl.maximum(m_max, sink)
        w = tl.exp(m - m_max)  # empty ranges have m = -inf: weight 0
        denominator = tl.sum(l_s * w, axis=0)
        if HAS_SINKS:
            denominator += tl.exp(sink - m_max)
        out = tl.sum(acc * w[:, None], axis=0) / denominator
        tl.store(Out + b.to(tl.int64) * stride_ob + h * HEAD_DIM + d, out.to(Out.dtype.element_ty))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None = None,
    *,
    keys_per_block: int = 0,
    num_warps: int = 4,
    dot: bool | None = None,
) -> torch.Tensor:
    """Flash-decoding over each row's slot up to its length (no host sync; CUDA-graph safe). ``sinks`` [heads]
    (gpt-oss): a learned logit per head that takes part in the softmax without a value. ``keys_per_block``,
    ``num_warps``, ``dot``: launch settings (defaults: ``uses_dot``'s choice; benchmarks compare others)."""
    b, nh, hd = q.shape
    nkv = k_cache.shape[1]
    group = nh // nkv
    dot = uses_dot(group) if dot is None else dot
    acc = torch.empty(b, nh, SPLITS, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, nh, SPLITS, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(b, nh * hd, dtype=q.dtype, device=q.device)
    _partial_kernel[(b, nkv, SPLITS)](
        q,
        k_cache,
        v_cache,
        slots,
        lens,
        acc,
        ml,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        GROUP=group,
        GROUP_P=max(DOT_ROWS, triton.next_power_of_2(group)) if dot else triton.next_power_of_2(group),
        HEAD_DIM=hd,
        NUM_HEADS=nh,
        SPLITS=SPLITS,
        BLOCK_N=keys_per_block or (DOT_BLOCK_N if dot else BLOCK_N),
        USE_DOT=dot,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
    )
    _combine_kernel[(b, nh)](
        acc,
        ml,
        out,
        sinks if sinks is not None else ml,  # never read without sinks
        out.stride(0),
        HEAD_DIM=hd,
        NUM_HEADS=nh,
        SPLITS=SPLITS,
        HAS_SINKS=sinks is not None,
        num_warps=1,
    )
    return out


def triton_supported(q_dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Whether ``decode_attention_triton`` can run here for this shape (it is also checked numerically)."""
    return (
        HAVE_TRITON
        and device.type == "cuda"
        and head_dim & (head_dim - 1) == 0
        and q_dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def self_check(
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    device: torch.device,
    sinks: bool = False,
) -> float:
    """Largest relative error of the Triton path against the reference on random data (ragged lengths,
    scattered slots; with random ``sinks`` if asked); the caller decides whether to trust it."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    slots_n, max_seq = 6, 300
    k = torch.randn(slots_n, num_kv_heads, max_seq, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(slots_n, num_kv_heads, max_seq, head_dim, generator=gen).to(device, dtype)
    q_full = torch.randn(4, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    q = q_full[:, :num_heads]  # strided rows, as in the fused qkv buffer
    slots = torch.tensor([4, 0, 5, 2], device=device)
    lens = torch.tensor([1, 37, 300, 129], device=device)
    scale = head_dim**-0.5
    if sinks:
        from dynamo_lite.engines.reference.attention import decode_attention_sinks

        sink = torch.randn(num_heads, generator=gen).to(device) * 2
        ref = decode_attention_sinks(q.float(), k.float(), v.float(), slots, lens, scale, sink)
        got = decode_attention_triton(q, k, v, slots, lens, scale, sink).float()
    else:
        ref = decode_attention_torch(q.float(), k.float(), v.float(), slots, lens, scale)
        got = decode_attention_triton(q, k, v, slots, lens, scale).float()
    return float((got - ref).norm() / ref.norm())

"""A prefill chunk's causal attention on CPU for bf16/fp16 models: query blocks, bf16 matmuls, no full matrix.

torch's CPU SDPA kernel (flash-style, fp32 inside) ran SmolLM2's 1000-token prompt at ~50 GFLOP/s on an
AVX512-BF16 EPYC (one thread: 19-23 ms per layer, half of the whole prefill) while oneDNN's bf16 GEMMs ran the
linears at ~400. Here each block of queries is two batched bf16 matmuls and a softmax: the queries of the heads
that share a KV head stacked as rows (GQA without repeating K or V), scores ``q·kᵀ`` and probabilities in the
model's dtype (the softmax accumulates in fp32 inside), ``p·v``. That is transformers' eager attention in bf16;
SDPA's kernel keeps the scores in fp32. Teacher-forced over 1000 tokens of real text, SmolLM2 bf16 against fp32:
KL 0.00118 vs SDPA's 0.00112, argmax agreement 0.984 vs 0.982 (fp32 scores cost 1.4x the time here: torch's fp32
GEMM runs ~90 GFLOP/s on this CPU). A block sees only the keys up to its last query, and only its diagonal square
is masked. One thread, 1000 tokens: ~10 ms per layer against SDPA's 19-23.

Blocks are sized so that one block's scores stay near ``SCORE_BLOCK_BYTES`` (cache-resident: larger blocks were
slower, not faster), never below ``MIN_BLOCK`` queries (per-op overhead). Keys and values are read from the
slot's cache (``[kv_heads, positions, head_dim]``), which already holds the chunk's own.
"""

from __future__ import annotations

import functools

import torch

SCORE_BLOCK_BYTES = 2 << 20
MIN_BLOCK = 32


@functools.cache
def _causal_edge(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[rows, rows]: 0 on and below the diagonal, -inf above (key j after query i)."""
    return torch.full((rows, rows), float("-inf"), dtype=dtype, device=device).triu_(1)


def block_rows(num_heads: int, num_keys: int, itemsize: int) -> int:
    """Queries per block for ``num_keys`` keys: a multiple of 16, at least ``MIN_BLOCK``."""
    rows = SCORE_BLOCK_BYTES // (itemsize * num_heads * max(1, num_keys))
    return max(MIN_BLOCK, rows // 16 * 16)


def causal_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float, out: torch.Tensor
) -> None:
    """Queries ``q`` [n, H, D] at positions ``q_start..q_start+n-1`` over a slot's keys/values ``k``, ``v``
    [KVH, m, D] at positions ``0..m-1`` (``m >= q_start + n``), causal; writes ``out`` [n, H * D]."""
    n, nh, hd = q.shape
    nkv = k.shape[0]
    groups = nh // nkv
    end = q_start + n
    kt = k[:, :end].transpose(1, 2)  # [KVH, D, end]
    block = block_rows(nh, end, q.element_size())
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        rows = b1 - b0
        hi = q_start + b1  # causal: no key after the block's last query
        # [KVH, groups * rows, D]: the queries of the heads reading one KV head as rows of one matmul
        qg = (q[b0:b1] * scale).view(rows, nkv, groups, hd).permute(1, 2, 0, 3)
        scores = torch.bmm(qg.reshape(nkv, groups * rows, hd), kt[:, :, :hi])
        scores.view(nkv, groups, rows, hi)[..., q_start + b0 :].add_(_causal_edge(rows, q.dtype, q.device))
        probs = torch.softmax(scores, dim=-1)  # accumulated in fp32 inside, rounded to the model's dtype
        o = torch.bmm(probs, v[:, :hi])  # [KVH, groups * rows, D]
        out[b0:b1] = o.view(nkv, groups, rows, hd).permute(2, 0, 1, 3).reshape(rows, nh * hd)

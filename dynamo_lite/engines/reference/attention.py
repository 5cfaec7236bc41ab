"""Attention with learned sinks and an optional sliding window (gpt-oss), in plain PyTorch.

gpt-oss gives every query head a learned logit (its "sink") that joins the softmax as one more column and is
then dropped: the weights of the real keys sum to less than one. The arithmetic here is transformers'
``eager_attention_forward`` step for step (scores = q·kᵀ × scale, masked, the sink column appended, the row
maximum subtracted, softmax, the sink dropped, times V), so fp32 results match it.

``prefill_attention`` runs a chunk of one sequence's queries over keys at known positions, causal and windowed,
in blocks of queries so that the score matrix stays bounded (an 8k-token prompt would otherwise need
heads x 8k x 8k floats); a block of a windowed layer only looks at the keys its window reaches.
``decode_attention_sinks`` is the decode step's reference (one query per row, each over its own slot).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QUERY_BLOCK = 1024  # queries per score matrix: heads x 1024 x keys floats at a time

# (q, k, v, q_start, k_start, window, sinks, scale) -> [n, H * D]: ``prefill_attention`` below, or the Triton
# flash kernel with the same contract (``prefill_attention.prefill_attention_triton``).
PrefillAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, torch.Tensor, float], torch.Tensor
]


def _softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """``scores`` [..., H, q, k] (masked entries -inf) -> probabilities over the keys, the sink's share
    dropped. ``sinks`` [H]."""
    shape = (*scores.shape[:-1], 1)
    sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(shape)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)
    return probs[..., :-1]


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[kv_heads, m, D] -> [kv_heads * groups, m, D], head h reading kv head h // groups (as transformers)."""
    if groups == 1:
        return x
    kvh, m, d = x.shape
    return x[:, None].expand(kvh, groups, m, d).reshape(kvh * groups, m, d)


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    k_start: int,
    window: int,
    sinks: torch.Tensor,
    scale: float,
    block: int = QUERY_BLOCK,
) -> torch.Tensor:
    """Queries ``q`` [n, H, D] at positions ``q_start..`` over keys/values [m, KVH, D] at positions
    ``k_start..k_start+m-1`` (which must cover what the queries see), causal, limited to the last ``window``
    positions when ``window`` > 0 -> [n, H * D]."""
    n, nh, hd = q.shape
    m, nkv, _ = k.shape
    groups = nh // nkv
    out = torch.empty(n, nh * hd, dtype=q.dtype, device=q.device)
    kt = k.transpose(0, 1)  # [KVH, m, D]
    vt = v.transpose(0, 1)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        first, last = q_start + b0, q_start + b1 - 1  # positions of the block's queries
        lo = max(k_start, first - window + 1) if window else k_start
        hi = last + 1  # causal: nothing after the last query
        keys = _repeat_kv(kt[:, lo - k_start : hi - k_start], groups)  # [H, kb, D]
        values = _repeat_kv(vt[:, lo - k_start : hi - k_start], groups)
        qb = q[b0:b1].transpose(0, 1)  # [H, qb, D]
        scores = torch.matmul(qb, keys.transpose(1, 2)) * scale  # [H, qb, kb]
        q_pos = torch.arange(first, last + 1, device=q.device)[:, None]
        k_pos = torch.arange(lo, hi, device=q.device)[None, :]
        hidden = k_pos > q_pos
        if window:
            hidden |= k_pos <= q_pos - window
        scores = scores.masked_fill(hidden, float("-inf"))
        probs = _softmax_with_sinks(scores, sinks).to(values.dtype)
        o = torch.matmul(probs, values)  # [H, qb, D]
        out[b0:b1] = o.transpose(0, 1).reshape(b1 - b0, nh * hd)
    return out


def decode_attention_sinks(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    sinks: torch.Tensor,
) -> torch.Tensor:
    """One query per row ``q`` [B, H, D] over its slot of ``k_cache``/``v_cache`` [slots, KVH, length, D] up to
    ``lens`` [B] keys (a ring's order does not matter: keys are summed over) -> [B, H * D]. Syncs on
    ``lens.max()``; the reference for the Triton kernel and the CPU path."""
    b, nh, hd = q.shape
    nkv = k_cache.shape[1]
    groups = nh // nkv
    length = int(lens.max())
    k = k_cache[slots, :, :length]  # [B, KVH, L, D]
    v = v_cache[slots, :, :length]
    if groups > 1:
        k = k[:, :, None].expand(b, nkv, groups, length, hd).reshape(b, nh, length, hd)
        v = v[:, :, None].expand(b, nkv, groups, length, hd).reshape(b, nh, length, hd)
    scores = torch.matmul(q[:, :, None, :], k.transpose(2, 3)) * scale  # [B, H, 1, L]
    hidden = torch.arange(length, device=q.device)[None, :] >= lens[:, None]  # [B, L]
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = _softmax_with_sinks(scores, sinks).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, nh * hd)

"""The llama forward pass in plain PyTorch, over a flat batch of tokens from many sequences.

One engine step is one call of ``LlamaModel.forward``. All tokens of the step (one per decoding sequence, a
chunk per prefilling one) are concatenated, so every matmul runs once per layer for the whole batch; only
attention is split: decode tokens attend together (one SDPA over their slots' caches with a length mask),
each prefill chunk attends alone (causal; bf16 on a CPU in query blocks, ``chunk_attention``). K and V of
every token are written straight into the preallocated slot cache with one indexed store per layer; nothing
else of the cache is copied.

The arithmetic follows transformers' llama step for step (RMSNorm in fp32, rotate-half RoPE with the same
frequency table, SDPA), so fp32 greedy output matches ``generate`` token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynamo_lite.engines.reference.chunk_attention import causal_chunk_attention
from dynamo_lite.engines.reference.collectives import ONE_RANK, Collectives
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.linear import LinearFn, make_linear
from dynamo_lite.engines.reference.loader import LlamaConfig, LlamaWeights, inverse_rope_frequencies


@dataclass(slots=True)
class PrefillChunk:
    """A run of ``length`` prompt tokens of the sequence in ``slot``, at positions ``start..start+length``."""

    offset: int  # first row in the step's flat token batch
    length: int
    slot: int
    start: int


@dataclass(slots=True)
class StepBatch:
    """The tensors one forward step needs, built once per step and shared by every layer.

    Rows ``0..num_decode`` are decode tokens (one per sequence, ordered by slot); prefill chunks follow.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slots: torch.Tensor  # [T] int64: the cache slot each token's K/V goes to
    num_decode: int = 0
    decode_lo: int = 0  # decode slots span lo..hi: attention runs over that range of the cache, with no copy
    decode_hi: int = 0
    decode_rows: torch.Tensor | None = (
        None  # slot - lo of each decode token; None when slots are lo..hi exactly
    )
    decode_mask: torch.Tensor | None = None  # [span, 1, 1, max_len] bool (key j visible); None: all see all
    decode_max_len: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)
    prefill_masks: list[torch.Tensor | None] = field(default_factory=list)  # None: causal from position 0
    sample_rows: torch.Tensor | None = None  # [S] rows whose next-token logits are wanted


def build_step(
    decode: list[tuple[int, int, int]],
    prefill: list[tuple[int, int, list[int]]],
    sample_rows: list[int],
    device: torch.device,
) -> StepBatch:
    """Assemble a step from ``decode`` = [(slot, position, token)] and ``prefill`` = [(slot, start, tokens)].

    ``sample_rows`` are indexes into the flat batch (decode rows first, then each chunk's rows in order).
    """
    decode = sorted(decode)
    ids: list[int] = [t for _, _, t in decode]
    pos: list[int] = [p for _, p, _ in decode]
    slots: list[int] = [s for s, _, _ in decode]
    chunks: list[PrefillChunk] = []
    for slot, start, tokens in prefill:
        chunks.append(PrefillChunk(offset=len(ids), length=len(tokens), slot=slot, start=start))
        ids.extend(tokens)
        pos.extend(range(start, start + len(tokens)))
        slots.extend([slot] * len(tokens))
    cpu = torch.device("cpu")
    batch = StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=cpu),
        positions=torch.tensor(pos, dtype=torch.int64, device=cpu),
        slots=torch.tensor(slots, dtype=torch.int64, device=cpu),
        num_decode=len(decode),
        prefills=chunks,
        sample_rows=torch.tensor(sample_rows, dtype=torch.int64, device=cpu),
    )
    if decode:
        lo, hi = decode[0][0], decode[-1][0] + 1
        span = hi - lo
        max_len = max(p for _, p, _ in decode) + 1
        batch.decode_lo, batch.decode_hi, batch.decode_max_len = lo, hi, max_len
        d_slots = torch.tensor([s for s, _, _ in decode], dtype=torch.int64)
        if span != len(decode):
            batch.decode_rows = d_slots - lo
        if span != len(decode) or any(p + 1 != max_len for _, p, _ in decode):
            lengths = torch.ones(span, dtype=torch.int64)  # rows of slots not decoding see one (ignored) key
            lengths[d_slots - lo] = torch.tensor([p + 1 for _, p, _ in decode], dtype=torch.int64)
            batch.decode_mask = (torch.arange(max_len)[None, :] < lengths[:, None]).view(span, 1, 1, max_len)
    for chunk in chunks:
        if chunk.start == 0:
            batch.prefill_masks.append(None)
        else:
            total = chunk.start + chunk.length
            batch.prefill_masks.append(torch.ones(chunk.length, total, dtype=torch.bool).tril(chunk.start))
    if device.type != "cpu":
        batch = _to_device(batch, device)
    return batch


def _to_device(batch: StepBatch, device: torch.device) -> StepBatch:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, non_blocking=True)

    batch.input_ids, batch.positions, batch.slots = (
        move(batch.input_ids),
        move(batch.positions),
        move(batch.slots),
    )  # type: ignore[assignment]
    batch.decode_rows, batch.decode_mask, batch.sample_rows = (
        move(batch.decode_rows),
        move(batch.decode_mask),
        move(batch.sample_rows),
    )
    batch.prefill_masks = [move(m) for m in batch.prefill_masks]
    return batch


def rms_norm_reduced(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm for a bf16/fp16 ``x`` on a CPU, the same steps: the mean square in fp32,
    ``x * rstd`` rounded to ``x``'s dtype, then times the weight in that dtype (equal to it but for a rare ulp:
    the mean square comes from the fp32 norm, squared).

    torch's CPU ``rms_norm`` decomposes into ~8 ops for reduced dtypes (fp32 copies, pow, mean, rsqrt, casts):
    286 us for 512x576 bf16 on one thread, here 167 (a read for the norm, one pass for ``x * rstd`` computed
    in fp32 and stored rounded, one for the weight), and rounds where transformers does (``rms_norm`` rounds
    once, after the weight: 26 % of a bf16 output's elements differed from transformers')."""
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
    rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return torch.mul(x, rstd, out=torch.empty_like(x)).mul_(weight)


DecodeAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]
"""``(q [B, heads, D], k_cache, v_cache, slots [B], lens [B], scale[, sinks=[heads]]) -> [B, heads * D]``: see
``decode_attention`` (``sinks``: gpt-oss's per-head attention sinks)."""


@dataclass(slots=True)
class _LayerOps:
    qkv: LinearFn
    o: LinearFn
    gate_up: LinearFn
    down: LinearFn

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class LlamaModel:
    """Weights plus the RoPE tables; ``forward`` runs one step and returns logits of the sampled rows.

    ``quantization="int8" | "int4"``: weight-only quantized linears (see ``linear``).
    ``decode_attention`` (optional) replaces the SDPA over a slot range for decode tokens: each token then
    attends to its own slot up to its own length, and ``decode_forward`` (a decode-only step with shapes fixed
    by the batch size, for CUDA graphs) becomes available.
    """

    def __init__(
        self,
        config: LlamaConfig,
        weights: LlamaWeights,
        max_seq_len: int,
        decode_attention: DecodeAttention | None = None,
        quantization: str = "none",
        comm: Collectives = ONE_RANK,
    ) -> None:
        self.config = config  # a rank's: its number of heads (``ranks.RankShard``)
        self.comm = comm
        self.decode_attention = decode_attention
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.scale = config.head_dim**-0.5
        inv_freq = inverse_rope_frequencies(config)
        # positions × inv_freq is one multiplication per entry, as in transformers' outer product.
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        half = config.head_dim // 2
        cos, sin = emb.cos(), emb.sin()
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi], exactly (sign flips are exact).
        sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.cos = cos.to(device=self.device, dtype=self.dtype)
        self.sin = sin_signed.to(device=self.device, dtype=self.dtype)
        self._layers = [
            _LayerOps(
                make_linear(lw.qkv, lw.qkv_bias, quantization),
                make_linear(lw.o, lw.o_bias, quantization),
                make_linear(lw.gate_up, lw.gate_up_bias, quantization),
                make_linear(lw.down, lw.down_bias, quantization),
            )
            for lw in weights.layers
        ]
        # The output projection is the (tied) embedding table, kept at 6-8 bits even in 4-bit GGUFs, and logits are
        # what sampling sees: under int4 it stays int8 (as int4 it made the KL divergence from fp32 20x larger on
        # SmolLM2: 0.058 vs 0.003 per token).
        self._lm_head = make_linear(weights.lm_head, None, "int8" if quantization == "int4" else quantization)
        self._norm_shape = (config.hidden_size,)
        # bf16/fp16 on a CPU: prefill chunks attend in query blocks of bf16 matmuls (``chunk_attention``: 2x faster
        # than torch's CPU SDPA kernel) and RMSNorm takes fewer passes (``rms_norm_reduced``); fp32 keeps SDPA and
        # ``F.rms_norm``, the path whose outputs equal transformers' token for token.
        self._reduced_cpu = self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16)
        self._chunk_attention = self._reduced_cpu

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._reduced_cpu:
            return rms_norm_reduced(x, weight, self.config.rms_norm_eps)
        # One fused op; in fp32 it is bit-identical to transformers' pow/mean/rsqrt sequence.
        return F.rms_norm(x, self._norm_shape, weight, self.config.rms_norm_eps)

    def forward(self, batch: StepBatch, cache: KvCache) -> torch.Tensor:
        """Run every layer over the step's tokens, storing their K/V in ``cache``; fp32 logits [S, vocab]."""
        cfg, w = self.config, self.weights
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        half = hd // 2
        q_dim, kv_dim = nh * hd, nkv * hd
        num_tokens = batch.input_ids.shape[0]
        nd = batch.num_decode
        decode_only = nd == num_tokens and nd > 0  # an attention-DP rank may have no tokens in a step

        x = F.embedding(batch.input_ids, w.embed)
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]: broadcast over heads
        sin = self.sin[batch.positions].unsqueeze(1)
        store = cache.store_index(batch.slots, batch.positions)  # K and V rows of every token, all kv heads
        decode_mask = None
        if batch.decode_mask is not None:  # additive, built once per step rather than per layer by SDPA
            decode_mask = torch.zeros(batch.decode_mask.shape, dtype=self.dtype, device=self.device)
            decode_mask.masked_fill_(~batch.decode_mask, float("-inf"))
        attn = None if decode_only else torch.empty(num_tokens, q_dim, dtype=self.dtype, device=self.device)
        decode_fn = self.decode_attention if nd else None
        d_slots, d_lens = batch.slots[:nd], batch.positions[:nd] + 1

        for layer, ops, (k_cache, v_cache), rows in zip(
            w.layers, self._layers, cache.layers, cache.layer_rows, strict=True
        ):
            h = self._rms_norm(x, layer.input_norm)
            qkv = ops.qkv(h)
            # RoPE on q and k heads together, in place in the qkv buffer.
            qk = qkv[:, : q_dim + kv_dim].view(num_tokens, nh + nkv, hd)
            rotated = torch.roll(qk, half, dims=-1).mul_(sin)
            qk.mul_(cos).add_(rotated)
            rows.index_copy_(0, store, qkv[:, q_dim:].reshape(-1, hd))  # K and V in one indexed store
            q = qkv[:, :q_dim].view(num_tokens, nh, hd)

            if decode_fn is not None:
                decoded = decode_fn(q[:nd], k_cache, v_cache, d_slots, d_lens, self.scale)
            elif nd:
                decoded = self._decode_attention(batch, q[:nd], k_cache, v_cache, decode_mask)
            if decode_only:
                out = decoded
            else:
                assert attn is not None
                if nd:
                    attn[:nd] = decoded
                k = qkv[:, q_dim : q_dim + kv_dim].view(num_tokens, nkv, hd)
                v = qkv[:, q_dim + kv_dim :].view(num_tokens, nkv, hd)
                for chunk, mask in zip(batch.prefills, batch.prefill_masks, strict=True):
                    sl = slice(chunk.offset, chunk.offset + chunk.length)
                    if self._chunk_attention:  # its keys (the chunk's own too) are in the slot's cache now
                        ks, vs = k_cache[chunk.slot], v_cache[chunk.slot]
                        causal_chunk_attention(q[sl], ks, vs, chunk.start, self.scale, attn[sl])
                        continue
                    qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
                    if mask is None:
                        ks, vs = k[sl].transpose(0, 1), v[sl].transpose(0, 1)
                    else:
                        end = chunk.start + chunk.length
                        ks, vs = k_cache[chunk.slot, :, :end], v_cache[chunk.slot, :, :end]
                    o = F.scaled_dot_product_attention(
                        qs,
                        ks.unsqueeze(0),
                        vs.unsqueeze(0),
                        attn_mask=mask,
                        is_causal=mask is None,
                        scale=self.scale,
                        enable_gqa=True,
                    )
                    attn[sl] = o[0].transpose(0, 1).reshape(chunk.length, q_dim)
                out = attn

            x.add_(self.comm.attention_out(ops.o(out)))
            h = self._rms_norm(x, layer.post_norm)
            x.add_(self.comm.ffn(h, ops.mlp))

        x = x[batch.sample_rows]
        x = self._rms_norm(x, w.norm)
        return self._lm_head(x).float()

    def decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KvCache
    ) -> torch.Tensor:
        """One decode token per row (``[B]`` each, on the device): store its K/V at ``positions`` of its slot,
        attend up to it, return fp32 logits ``[B, vocab]``. No host syncs and no shape depends on the data, so
        a CUDA graph can capture it. Needs ``decode_attention``."""
        assert self.decode_attention is not None, "decode_forward needs a decode_attention"
        cfg, w = self.config, self.weights
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        half = hd // 2
        q_dim, kv_dim = nh * hd, nkv * hd
        num_tokens = input_ids.shape[0]
        x = F.embedding(input_ids, w.embed)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        store = cache.store_index(slots, positions)
        lens = positions + 1
        for layer, ops, (k_cache, v_cache), rows in zip(
            w.layers, self._layers, cache.layers, cache.layer_rows, strict=True
        ):
            h = self._rms_norm(x, layer.input_norm)
            qkv = ops.qkv(h)
            qk = qkv[:, : q_dim + kv_dim].view(num_tokens, nh + nkv, hd)
            rotated = torch.roll(qk, half, dims=-1).mul_(sin)
            qk.mul_(cos).add_(rotated)
            rows.index_copy_(0, store, qkv[:, q_dim:].reshape(-1, hd))
            q = qkv[:, :q_dim].view(num_tokens, nh, hd)
            out = self.decode_attention(q, k_cache, v_cache, slots, lens, self.scale)
            x.add_(self.comm.attention_out(ops.o(out)))
            h = self._rms_norm(x, layer.post_norm)
            x.add_(self.comm.ffn(h, ops.mlp))
        x = self._rms_norm(x, w.norm)
        return self._lm_head(x).float()

    def _decode_attention(
        self,
        batch: StepBatch,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One SDPA for all decode tokens, ``[nd, heads * head_dim]``. The query heads sharing a kv head
        become that head's query rows, so K/V are read in place from the cache (a view over the slot range),
        never repeated or gathered."""
        lo, hi, length = batch.decode_lo, batch.decode_hi, batch.decode_max_len
        nd, nh, hd = q.shape
        nkv = k_cache.shape[1]
        span = hi - lo
        if batch.decode_rows is None:
            qd = q.reshape(span, nkv, nh // nkv, hd)
        else:
            qd = q.new_zeros(span, nh, hd)
            qd[batch.decode_rows] = q
            qd = qd.view(span, nkv, nh // nkv, hd)
        o = F.scaled_dot_product_attention(
            qd, k_cache[lo:hi, :, :length], v_cache[lo:hi, :, :length], attn_mask=mask, scale=self.scale
        )
        o = o.reshape(span, nh * hd)
        return o if batch.decode_rows is None else o[batch.decode_rows]

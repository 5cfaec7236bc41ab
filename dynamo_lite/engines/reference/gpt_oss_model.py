"""The gpt-oss forward pass in plain PyTorch, over the same flat step batches as the llama model.

Per layer: RMSNorm; fused q|k|v with biases; YaRN rope; attention with learned sinks, over all positions in
full-attention layers and over the last ``window`` positions in sliding-window layers; o with bias; RMSNorm; the
top-k routed experts (``moe``). A sliding layer's cache is a ring of ``window`` positions (``KvCache``): a step
writes only the last ``window`` tokens of each prefill chunk there, and a chunk that continues a sequence reads
the positions its window reaches from the ring *before* the step's own writes can overwrite them.

The arithmetic follows transformers' ``GptOssForCausalLM`` (eager attention, grouped_mm experts): fp32 greedy
output matches its ``generate`` token for token. ``decode_forward`` (decode-only, shapes fixed by the batch, no
host sync) is what the CUDA graphs capture; it needs the Triton decode attention and experts run without a host
sync (``moe``: grouped_mm, or dense).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynamo_lite.engines.reference import moe, residual_norm
from dynamo_lite.engines.reference.attention import (
    PrefillAttention,
    decode_attention_sinks,
    prefill_attention,
)
from dynamo_lite.engines.reference.collectives import ONE_RANK, Collectives
from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, GptOssWeights, yarn_rope
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.linear import make_linear
from dynamo_lite.engines.reference.model import DecodeAttention, StepBatch
from dynamo_lite.engines.reference.rope import rope_

_eager_prefill = prefill_attention  # the reference, and the CPU path


class GptOssModel:
    """Weights plus the rope tables; ``forward`` runs one step and returns the sampled rows' logits.

    ``decode_attention`` (the Triton kernel, taking ``sinks=``) replaces the torch decode attention and, when
    the experts run as one grouped product, makes ``decode_forward`` capturable (``graph_safe``).
    ``prefill_attention`` (the Triton flash kernel on CUDA) replaces the eager chunked prefill attention.
    """

    def __init__(
        self,
        config: GptOssConfig,
        weights: GptOssWeights,
        max_seq_len: int,
        decode_attention: DecodeAttention | None = None,
        comm: Collectives = ONE_RANK,
        first_expert: int = 0,
        prefill_attention: PrefillAttention | None = None,
    ) -> None:
        self.config = config  # a rank's: its number of heads (``ranks.RankShard``)
        self.comm = comm
        self.first_expert = first_expert  # this rank's experts are first_expert.. (expert parallel)
        self.weights = weights
        self.decode_attention = decode_attention
        self.prefill_attention = prefill_attention
        self._prefill = prefill_attention or _eager_prefill
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.scale = config.head_dim**-0.5
        self.windows = config.layer_windows
        self.window = config.sliding_window
        inv_freq, attention_factor = yarn_rope(config)
        freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos, sin = freqs.cos() * attention_factor, freqs.sin() * attention_factor
        # rotate-half as one multiply-add: x * [cos, cos] + roll(x, half) * [-sin, sin], exactly transformers'
        # (first * cos - second * sin, second * cos + first * sin) since sign flips are exact.
        self.cos = torch.cat([cos, cos], dim=-1).to(device=self.device, dtype=self.dtype)
        self.sin = torch.cat([-sin, sin], dim=-1).to(device=self.device, dtype=self.dtype)
        lw = weights.layers[0]
        sample = (lw.router, lw.router_bias, lw.gate_up, lw.gate_up_bias, lw.down, lw.down_bias)
        self.experts_plan = moe.pick_experts(
            self.dtype,
            self.device,
            sample,
            config.experts_per_token,
            config.swiglu_limit,
            config.swiglu_alpha,
        )
        self.moe_impl = self.experts_plan.name
        self._experts = self.experts_plan.fn
        self._qkv = [make_linear(lw.qkv, lw.qkv_bias) for lw in weights.layers]
        self._o = [make_linear(lw.o, lw.o_bias) for lw in weights.layers]
        self._lm_head = make_linear(weights.lm_head)
        self._norm_shape = (config.hidden_size,)

    @property
    def graph_safe(self) -> bool:
        """Whether ``decode_forward`` can be captured in a CUDA graph."""
        return self.decode_attention is not None and self.experts_plan.graph_safe

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self._norm_shape, weight, self.config.rms_norm_eps)

    def _qkv_rope(
        self,
        i: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        store: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Layer ``i``'s q|k|v for ``h``, q and k rotated; ``store = (rows, index)``: K and V also stored there."""
        cfg = self.config
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = self._qkv[i](h)
        qk = qkv[:, : (nh + nkv) * hd].view(h.shape[0], nh + nkv, hd)
        rope_(qk, cos, sin, None if store is None else (qkv[:, nh * hd :], *store))
        return qkv

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        lw = self.weights.layers[i]
        h = self._rms_norm(x, lw.post_norm)
        return x + self.comm.ffn(h, lambda rows: self._routed_experts(i, rows))

    def _route(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights and ids of layer ``i``'s experts for ``h``, in this rank's expert numbering."""
        cfg, lw = self.config, self.weights.layers[i]
        weights, ids = moe.route(h, lw.router, lw.router_bias, cfg.experts_per_token)
        held = lw.gate_up_bias.shape[0]
        if held != cfg.num_experts:
            # Expert parallel: pairs routed to another rank's expert weigh 0 here (that rank adds them); their id
            # points at a local expert so every kernel sees valid ids, at the cost of computing a row it drops.
            local = ids - self.first_expert
            mine = (local >= 0) & (local < held)
            weights = weights * mine
            ids = torch.where(mine, local, torch.zeros_like(local))
        return weights, ids

    def _routed_experts(self, i: int, h: torch.Tensor, fn: moe.ExpertsFn | None = None) -> torch.Tensor:
        cfg, lw = self.config, self.weights.layers[i]
        weights, ids = self._route(i, h)
        return (fn or self._experts)(
            h,
            weights,
            ids,
            lw.gate_up,
            lw.gate_up_bias,
            lw.down,
            lw.down_bias,
            cfg.swiglu_limit,
            cfg.swiglu_alpha,
        )

    def _mlp_add_norm(
        self, i: int, x: torch.Tensor, h: torch.Tensor, norm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` plus layer ``i``'s experts' output for ``h`` (its post-attention norm), and that sum normed by
        ``norm`` (the next layer's input norm, or the final one)."""
        eps, partials = self.config.rms_norm_eps, self.experts_plan.partials
        if partials is not None and self.comm is ONE_RANK and residual_norm.fused_applies(x):
            parts = self._routed_experts(i, h, partials)
            return residual_norm.moe_add_rms_norm(parts, x, norm, eps)
        y = self.comm.ffn(h, lambda rows: self._routed_experts(i, rows))
        return residual_norm.add_rms_norm(x, y, norm, eps)

    def _decode(
        self, q: torch.Tensor, i: int, cache: KvCache, slots: torch.Tensor, lens: torch.Tensor
    ) -> torch.Tensor:
        k_cache, v_cache = cache.layers[i]
        sinks = self.weights.layers[i].sinks
        if self.decode_attention is not None:
            return self.decode_attention(q, k_cache, v_cache, slots, lens, self.scale, sinks=sinks)
        return decode_attention_sinks(q, k_cache, v_cache, slots, lens, self.scale, sinks)

    def forward(self, batch: StepBatch, cache: KvCache) -> torch.Tensor:
        """Run every layer over the step's tokens, storing their K/V in ``cache``; fp32 logits [S, vocab]."""
        cfg, w = self.config, self.weights
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_dim, kv_dim = nh * hd, nkv * hd
        num_tokens = batch.input_ids.shape[0]
        nd = batch.num_decode
        window = self.window
        x = F.embedding(batch.input_ids, w.embed)
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin[batch.positions].unsqueeze(1)
        store = cache.store_index(batch.slots, batch.positions) if cache.full_layers else None
        ring_rows, ring_store = None, None
        if cache.windowed_layers:
            # A chunk longer than the window: only its last `window` tokens land in the ring (the others would be
            # overwritten in the same step, and index_copy_ with repeated targets keeps an arbitrary one).
            keep = [*range(nd)]
            for c in batch.prefills:
                keep.extend(range(c.offset + max(0, c.length - window), c.offset + c.length))
            if len(keep) != num_tokens:
                ring_rows = torch.tensor(keep, dtype=torch.int64, device=self.device)
            rows = ring_rows if ring_rows is not None else slice(None)
            ring_store = cache.store_index(batch.slots[rows], batch.positions[rows], window)
        d_slots = batch.slots[:nd]
        d_lens = batch.positions[:nd] + 1
        d_lens_window = d_lens.clamp(max=window) if window else d_lens
        # Positions a continuing chunk's window reaches before the chunk: read from the ring before writing.
        priors = [
            (c, torch.arange(max(0, c.start - window + 1), c.start, device=self.device) % window)
            for c in batch.prefills
            if c.start > 0
        ]

        for i, layer in enumerate(w.layers):
            layer_window = self.windows[i]
            k_cache, v_cache = cache.layers[i]
            h = self._rms_norm(x, layer.input_norm)
            qkv = self._qkv_rope(i, h, cos, sin)
            prior = {}
            if layer_window:
                for c, ring_idx in priors:
                    prior[c.offset] = (
                        k_cache[c.slot, :, ring_idx].transpose(0, 1),
                        v_cache[c.slot, :, ring_idx].transpose(0, 1),
                    )
                new_kv = qkv[:, q_dim:] if ring_rows is None else qkv[ring_rows, q_dim:]
                cache.layer_rows[i].index_copy_(0, ring_store, new_kv.reshape(-1, hd))
            else:
                cache.layer_rows[i].index_copy_(0, store, qkv[:, q_dim:].reshape(-1, hd))
            q = qkv[:, :q_dim].view(num_tokens, nh, hd)
            attn = torch.empty(num_tokens, q_dim, dtype=self.dtype, device=self.device)
            if nd:
                attn[:nd] = self._decode(q[:nd], i, cache, d_slots, d_lens_window if layer_window else d_lens)
            k = qkv[:, q_dim : q_dim + kv_dim].view(num_tokens, nkv, hd)
            v = qkv[:, q_dim + kv_dim :].view(num_tokens, nkv, hd)
            for c in batch.prefills:
                sl = slice(c.offset, c.offset + c.length)
                k_start = 0
                if c.start == 0:
                    ks, vs = k[sl], v[sl]
                elif layer_window:
                    pk, pv = prior[c.offset]
                    ks, vs = torch.cat([pk, k[sl]]), torch.cat([pv, v[sl]])
                    k_start = c.start - pk.shape[0]
                else:
                    end = c.start + c.length
                    ks, vs = (
                        k_cache[c.slot, :, :end].transpose(0, 1),
                        v_cache[c.slot, :, :end].transpose(0, 1),
                    )
                attn[sl] = self._prefill(
                    q[sl], ks, vs, c.start, k_start, layer_window, layer.sinks, self.scale
                )
            x = x + self.comm.attention_out(self._o[i](attn))
            x = self._mlp(i, x)

        x = x[batch.sample_rows]
        x = self._rms_norm(x, w.norm)
        return self._lm_head(x).float()

    def decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, cache: KvCache
    ) -> torch.Tensor:
        """One decode token per row (``[B]`` each, on the device): store its K/V, attend, return fp32 logits
        ``[B, vocab]``. No host syncs, no data-dependent shapes (with the grouped expert product)."""
        cfg, w = self.config, self.weights
        nh, hd = cfg.num_heads, cfg.head_dim
        q_dim = nh * hd
        num_tokens = input_ids.shape[0]
        window = self.window
        x = F.embedding(input_ids, w.embed)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        store = cache.store_index(slots, positions) if cache.full_layers else None
        ring_store = cache.store_index(slots, positions, window) if cache.windowed_layers else None
        lens = positions + 1
        lens_window = lens.clamp(max=window) if window else lens
        layers = w.layers
        eps = cfg.rms_norm_eps
        # Each residual add runs with the norm after it (one kernel on CUDA in bf16: ``residual_norm``).
        h = self._rms_norm(x, layers[0].input_norm)
        for i, layer in enumerate(layers):
            windowed = self.windows[i] > 0
            qkv = self._qkv_rope(i, h, cos, sin, (cache.layer_rows[i], ring_store if windowed else store))
            q = qkv[:, :q_dim].view(num_tokens, nh, hd)
            attn = self._decode(q, i, cache, slots, lens_window if windowed else lens)
            x, h = residual_norm.add_rms_norm(
                x, self.comm.attention_out(self._o[i](attn)), layer.post_norm, eps
            )
            x, h = self._mlp_add_norm(i, x, h, layers[i + 1].input_norm if i + 1 < len(layers) else w.norm)
        return self._lm_head(h).float()

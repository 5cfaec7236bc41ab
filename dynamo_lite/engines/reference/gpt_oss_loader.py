"""Reading a gpt-oss model (``model_type: gpt_oss``) from an HF-format folder into plain tensors.

``GptOssConfig`` holds what the forward pass needs: alternating sliding-window / full attention layers with
learned sinks, YaRN rope, top-k routed experts with a clamped SwiGLU. ``load_gpt_oss_weights`` reads the
safetensors in the checkpoint's own expert layout: bf16/fp32 experts as ``gate_up`` ``[experts, hidden, 2 *
intermediate]`` with gate and up columns interleaved and ``down`` ``[experts, intermediate, hidden]``; MXFP4 blocks
+ scales (the released checkpoints) either kept packed (``mxfp4=True``: ``Mxfp4Experts``, read straight to the
device, no dequantized copy ever made) or dequantized to the model dtype. ``random_gpt_oss_weights`` makes the same
structure from a seed, on the device (``load_format: dummy``: the real shape never touches a disk).
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_lite.engines.reference.moe_mxfp4 import Mxfp4Experts, for_kernels, random_mxfp4
from dynamo_lite.engines.reference.mxfp4 import dequantize_mxfp4
from dynamo_lite.engines.reference.ranks import RankShard

log = logging.getLogger(__name__)

__all__ = ["GptOssConfig", "GptOssWeights", "load_gpt_oss_weights", "random_gpt_oss_weights", "yarn_rope"]


class UnsupportedGptOss(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class GptOssConfig:
    """The architecture facts of a gpt-oss model (transformers' ``GptOssConfig`` defaults are the 120b)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    num_experts: int
    experts_per_token: int
    sliding_window: int
    layer_windows: tuple[int, ...]  # per layer: the window of a sliding-attention layer, 0 for full attention
    swiglu_alpha: float
    swiglu_limit: float
    tie_word_embeddings: bool
    mxfp4: bool  # experts stored as MXFP4 blocks + scales

    @classmethod
    def from_dict(cls, cfg: dict) -> GptOssConfig:
        if cfg.get("model_type") != "gpt_oss":
            raise UnsupportedGptOss(f"model_type {cfg.get('model_type')!r} is not gpt_oss")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        window = int(cfg.get("sliding_window") or 0)
        default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        types = list(cfg.get("layer_types") or default_types)
        if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
            raise UnsupportedGptOss(f"layer_types {types} do not describe {layers} layers")
        windows = tuple(window if t == "sliding_attention" else 0 for t in types)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 150000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "yarn"
        if rope_type not in ("yarn", "default"):
            raise UnsupportedGptOss(f"rope_type {rope_type!r} is not supported for gpt_oss (yarn, default)")
        quant = cfg.get("quantization_config") or {}
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method not in (None, "mxfp4"):
            raise UnsupportedGptOss(f"quantization {method!r} is not supported (mxfp4 experts, or none)")
        return cls(
            model_type="gpt_oss",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": "yarn"},
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 131072),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 128),
            experts_per_token=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 4),
            sliding_window=window,
            layer_windows=windows,
            swiglu_alpha=float(cfg.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            mxfp4=method == "mxfp4",
        )

    @classmethod
    def from_folder(cls, folder: Path) -> GptOssConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))


def yarn_rope(config: GptOssConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies per rotary pair and the cos/sin scale (YaRN's attention factor), computed exactly as
    transformers' ``_compute_yarn_parameters`` does: fp32 parity depends on it."""
    dim = config.head_dim
    base = config.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    scaling = config.rope_scaling
    if scaling is None:
        return 1.0 / pos_freqs, 1.0
    factor = float(scaling.get("factor") or 1.0)
    original = float(scaling["original_max_position_embeddings"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


@dataclass(slots=True)
class GptOssLayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor
    o: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor
    sinks: torch.Tensor  # [heads], fp32
    post_norm: torch.Tensor  # [hidden]
    router: torch.Tensor  # [experts, hidden]
    router_bias: torch.Tensor  # [experts]
    # [experts, hidden, 2 * intermediate] (gate and up columns interleaved), or the same as MXFP4 (2I output rows)
    gate_up: torch.Tensor | Mxfp4Experts
    gate_up_bias: torch.Tensor  # [experts, 2 * intermediate], same order
    down: torch.Tensor | Mxfp4Experts  # [experts, intermediate, hidden], or MXFP4 (hidden output rows)
    down_bias: torch.Tensor  # [experts, hidden]


@dataclass(slots=True)
class GptOssWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[GptOssLayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [vocab, hidden]


def load_gpt_oss_weights(
    folder: Path,
    config: GptOssConfig,
    dtype: torch.dtype,
    device: torch.device,
    mxfp4: bool = False,
    shard: RankShard | None = None,
) -> GptOssWeights:
    """Read ``folder``'s safetensors onto ``device`` in ``dtype``; MXFP4 experts stay packed with ``mxfp4``
    (the checkpoint must store them so), else are dequantized to ``dtype``. ``shard``: only this rank's heads and
    experts are read (``get_slice``: the other ranks' parts never leave the file)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    handles = {}
    where: dict[str, tuple[str, str]] = {}  # name without "model." -> (file, name in the file)
    for path in files:
        f = safe_open(str(path), framework="pt")
        handles[str(path)] = f
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            where[key.removeprefix("model.")] = (str(path), key)

    def raw(key: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        found = where.pop(key, None)
        if found is None:
            raise UnsupportedGptOss(f"{folder}: weight {key!r} is missing")
        if index is None:
            return handles[found[0]].get_tensor(found[1])
        return handles[found[0]].get_slice(found[1])[index]

    def take(
        key: str, as_dtype: torch.dtype | None = None, index: tuple[slice, ...] | None = None
    ) -> torch.Tensor:
        return raw(key, index).to(device=device, dtype=as_dtype or dtype).contiguous()

    hd, every = config.head_dim, slice(None)
    q_rows = kv_rows = e_rows = cols = heads = None
    first_heads = first_ffn = True
    if shard is not None:
        q_rows = (slice(shard.q_heads[0] * hd, shard.q_heads[1] * hd),)
        kv_rows = (slice(shard.kv_heads[0] * hd, shard.kv_heads[1] * hd),)
        e_rows = slice(*shard.experts)
        heads = (slice(*shard.q_heads),)  # the sinks: one per query head
        cols = shard.ffn_cols
        first_heads, first_ffn = shard.first_of_heads, shard.first_of_ffn

    def experts(p: str, name: str) -> torch.Tensor | Mxfp4Experts:
        """``[experts, in, out]`` in ``dtype`` (the bf16/fp32 tensor, or MXFP4 blocks + scales stored as
        ``[experts, out, in / 32, 16]`` dequantized), or with ``mxfp4`` the blocks + scales as they are. A rank
        reads its experts and its share of their intermediate columns (gate_up's outputs, down's inputs; gate
        and up interleave, so a contiguous even range keeps each pair together)."""
        gate_up = name == "gate_up_proj"
        if p + name + "_blocks" in where:
            index = idx_scales = None
            if cols is not None:  # blocks [E, out, in / 32, 16], scales [E, out, in / 32]
                if gate_up:
                    index = idx_scales = (e_rows, slice(2 * cols[0], 2 * cols[1]))
                else:
                    index = idx_scales = (e_rows, every, slice(cols[0] // 32, cols[1] // 32))
            blocks = raw(p + name + "_blocks", index).to(device)
            scales = raw(p + name + "_scales", idx_scales).to(device)
            if mxfp4:
                return for_kernels(Mxfp4Experts.from_checkpoint(blocks.contiguous(), scales.contiguous()))
            return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()
        if mxfp4:
            raise UnsupportedGptOss(f"{folder}: quantization mxfp4 needs MXFP4 experts; {p + name} is dense")
        if cols is None:
            return take(p + name)
        if gate_up:  # [E, hidden, 2I]
            return take(p + name, index=(e_rows, every, slice(2 * cols[0], 2 * cols[1])))
        return take(p + name, index=(e_rows, slice(*cols)))  # down [E, I, hidden]

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        rows = {"q": q_rows, "k": kv_rows, "v": kv_rows}
        o_cols = None if q_rows is None else (every, q_rows[0])
        e_cols = None if cols is None else (e_rows, slice(2 * cols[0], 2 * cols[1]))
        down_bias = take(p + "mlp.experts.down_proj_bias", index=None if e_rows is None else (e_rows,))
        o_bias = take(a + "o_proj.bias")
        layers.append(
            GptOssLayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([take(a + f"{n}_proj.weight", index=rows[n]) for n in "qkv"]).contiguous(),
                qkv_bias=torch.cat([take(a + f"{n}_proj.bias", index=rows[n]) for n in "qkv"]).contiguous(),
                o=take(a + "o_proj.weight", index=o_cols),
                # A row-parallel sum adds a bias once: on the first rank of the ranks that sum it.
                o_bias=o_bias if first_heads else torch.zeros_like(o_bias),
                sinks=take(a + "sinks", torch.float32, index=heads),
                post_norm=take(p + "post_attention_layernorm.weight"),
                router=take(p + "mlp.router.weight"),
                router_bias=take(p + "mlp.router.bias"),
                gate_up=experts(p + "mlp.experts.", "gate_up_proj"),
                gate_up_bias=take(p + "mlp.experts.gate_up_proj_bias", index=e_cols),
                down=experts(p + "mlp.experts.", "down_proj"),
                down_bias=down_bias if first_ffn else torch.zeros_like(down_bias),
            )
        )
    embed = take("embed_tokens.weight")
    if "lm_head.weight" in where and not config.tie_word_embeddings:
        lm_head = take("lm_head.weight")
    else:
        where.pop("lm_head.weight", None)
        lm_head = embed
    norm = take("norm.weight")
    rest = [k for k in where if "rotary_emb" not in k]
    if rest:
        log.warning("%s: ignoring %d unused weights, e.g. %s", folder, len(rest), rest[:3])
    return GptOssWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def random_gpt_oss_weights(
    config: GptOssConfig, dtype: torch.dtype, device: torch.device, seed: int = 0, mxfp4: bool = False
) -> GptOssWeights:
    """Random weights made on ``device`` (``load_format: dummy``), the same in every process for one ``seed``:
    each tensor has its own generator seeded from its name. Scales as ``dynamo_lite.gpt_oss.weights``; with
    ``mxfp4`` the experts are made packed (the 120b shape's 61 GB instead of 229 GB in bf16)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    nh, nkv, hd, num_experts = config.num_heads, config.num_kv_heads, config.head_dim, config.num_experts

    def normal(
        name: str, *shape: int, std: float, mean: float = 0.0, as_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        out = torch.empty(*shape, dtype=as_dtype or dtype, device=device)
        rows = max(1, (1 << 28) // max(1, out[0].numel() if out.dim() > 1 else 1))
        flat = out.view(out.shape[0], -1) if out.dim() > 1 else out.view(1, -1)
        for r0 in range(0, flat.shape[0], rows):  # fp32 draws a chunk at a time: bounded temporaries
            part = flat[r0 : r0 + rows]
            part.copy_(torch.randn(part.shape, generator=gen, device=device).mul_(std).add_(mean))
        return out

    def experts(name: str, e: int, fan_in: int, fan_out: int) -> torch.Tensor | Mxfp4Experts:
        if not mxfp4:
            return normal(name, e, fan_in, fan_out, std=fan_in**-0.5)
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return for_kernels(random_mxfp4(e, fan_out, fan_in, fan_in**-0.5, gen, device))

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        layers.append(
            GptOssLayerWeights(
                input_norm=normal(p + "input_norm", hidden, std=0.1, mean=1.0),
                qkv=normal(p + "qkv", (nh + 2 * nkv) * hd, hidden, std=hidden**-0.5),
                qkv_bias=normal(p + "qkv_bias", (nh + 2 * nkv) * hd, std=0.1),
                o=normal(p + "o", hidden, nh * hd, std=(nh * hd) ** -0.5),
                o_bias=normal(p + "o_bias", hidden, std=0.1),
                sinks=normal(p + "sinks", nh, std=1.0, as_dtype=torch.float32),
                post_norm=normal(p + "post_norm", hidden, std=0.1, mean=1.0),
                router=normal(p + "router", num_experts, hidden, std=hidden**-0.5),
                router_bias=normal(p + "router_bias", num_experts, std=0.1),
                gate_up=experts(p + "gate_up", num_experts, hidden, 2 * inter),
                gate_up_bias=normal(p + "gate_up_bias", num_experts, 2 * inter, std=0.1),
                down=experts(p + "down", num_experts, inter, hidden),
                down_bias=normal(p + "down_bias", num_experts, hidden, std=0.1),
            )
        )
    return GptOssWeights(
        embed=normal("embed", config.vocab_size, hidden, std=1.0),
        layers=layers,
        norm=normal("norm", hidden, std=0.1, mean=1.0),
        lm_head=normal("lm_head", config.vocab_size, hidden, std=hidden**-0.5),
    )

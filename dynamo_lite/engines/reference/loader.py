"""Reading a llama-family model (Llama, SmolLM, Mistral, Qwen2) from an HF-format folder into plain tensors;
``model_config`` also dispatches gpt-oss (``gpt_oss_loader``).

The engine never builds HF modules: it reads ``config.json`` into a ``LlamaConfig`` and the safetensors into a
``LlamaWeights`` with the projections fused (q|k|v and gate|up), so each layer runs two matmuls fewer.
A GGUF is first converted into a cached folder by ``dynamo_lite.model_files``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, UnsupportedGptOss
from dynamo_lite.engines.reference.ranks import RankShard
from dynamo_lite.model_files import ModelFiles, ensure_weights

__all__ = [
    "LlamaConfig",
    "LlamaWeights",
    "UnsupportedModel",
    "checkpoint_quantization",
    "ensure_weights",
    "load_weights",
    "model_config",
]

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """The architecture facts the forward pass needs."""

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
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_dict(cls, cfg: dict) -> LlamaConfig:
        model_type = str(cfg.get("model_type", "llama"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        # transformers 5 keeps rope settings in rope_parameters; 4.x used rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
        sliding = cfg.get("sliding_window")
        if sliding and cfg.get("use_sliding_window", model_type == "mistral"):
            log.warning("sliding_window=%s is ignored: attention runs over the full context", sliding)
        qwen = model_type == "qwen2"
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,  # Qwen2 always has q/k/v bias and no o bias
            o_bias=attention_bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> LlamaConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Every layer attends to every position (a Mistral ``sliding_window`` is ignored, with a warning)."""
        return (0,) * self.num_layers


def model_config(cfg: dict) -> LlamaConfig | GptOssConfig:
    """The architecture ``config.json`` describes: gpt-oss, or a llama-family model; ``UnsupportedModel``
    otherwise."""
    model_type = str(cfg.get("model_type", "llama"))
    if model_type == "gpt_oss":
        try:
            return GptOssConfig.from_dict(cfg)
        except UnsupportedGptOss as e:
            raise UnsupportedModel(str(e)) from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not one of {(*SUPPORTED_MODEL_TYPES, 'gpt_oss')}"
        )
    return LlamaConfig.from_dict(cfg)


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None


@dataclass(slots=True)
class LlamaWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied


def inverse_rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Per-pair inverse frequencies, computed exactly as transformers does (fp32 parity depends on it)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights")
    return files


def load_weights(
    folder: Path,
    config: LlamaConfig,
    dtype: torch.dtype,
    device: torch.device,
    shard: RankShard | None = None,
) -> LlamaWeights:
    """Read ``folder``'s safetensors, fuse the projections, cast to ``dtype`` on ``device``. ``shard``: only this
    rank's part of the sharded matrices is read (``safe_open.get_slice``: the rest never leaves the file)."""
    from safetensors import safe_open

    handles = [safe_open(str(path), framework="pt") for path in _safetensors_files(Path(folder))]
    where = {key.removeprefix("model."): (f, key) for f in handles for key in f.keys()}  # noqa: SIM118
    hd = config.head_dim

    def take(
        key: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        try:
            f, name = where.pop(key)
        except KeyError:
            raise UnsupportedModel(f"{folder}: weight {key!r} is missing") from None
        if rows is None and cols is None:
            t = f.get_tensor(name)
        elif cols is None:
            t = f.get_slice(name)[rows[0] : rows[1]]
        else:
            t = f.get_slice(name)[:, cols[0] : cols[1]]
        return t.to(device=device, dtype=dtype).contiguous()

    def maybe(key: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        return take(key, rows) if key in where else None

    def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
        return None if any(t is None for t in ts) else torch.cat(ts, dim=0).contiguous()  # type: ignore[arg-type]

    q_rows = kv_rows = ffn = None
    first_heads = first_ffn = True
    if shard is not None:
        q_rows = (shard.q_heads[0] * hd, shard.q_heads[1] * hd)
        kv_rows = (shard.kv_heads[0] * hd, shard.kv_heads[1] * hd)
        ffn, first_heads, first_ffn = shard.ffn_cols, shard.first_of_heads, shard.first_of_ffn

    layers = []
    for i in range(config.num_layers):
        p = f"layers.{i}."
        a = p + "self_attn."
        q, k, v = (
            take(a + "q_proj.weight", q_rows),
            take(a + "k_proj.weight", kv_rows),
            take(a + "v_proj.weight", kv_rows),
        )
        qb, kb, vb = (
            maybe(a + "q_proj.bias", q_rows),
            maybe(a + "k_proj.bias", kv_rows),
            maybe(a + "v_proj.bias", kv_rows),
        )
        gate, up = take(p + "mlp.gate_proj.weight", ffn), take(p + "mlp.up_proj.weight", ffn)
        gb, ub = maybe(p + "mlp.gate_proj.bias", ffn), maybe(p + "mlp.up_proj.bias", ffn)
        # A row-parallel projection's bias is added by one rank: the all-reduce sums it in once.
        o_bias, down_bias = maybe(a + "o_proj.bias"), maybe(p + "mlp.down_proj.bias")
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=torch.cat([q, k, v], dim=0).contiguous(),
                qkv_bias=cat(qb, kb, vb),
                o=take(a + "o_proj.weight", cols=q_rows),
                o_bias=o_bias if first_heads else None,
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([gate, up], dim=0).contiguous(),
                gate_up_bias=cat(gb, ub),
                down=take(p + "mlp.down_proj.weight", cols=ffn),
                down_bias=down_bias if first_ffn else None,
            )
        )
        del q, k, v, gate, up
    embed = take("embed_tokens.weight")
    head = where.pop("lm_head.weight", None)
    lm_head = embed
    if head is not None and not config.tie_word_embeddings:
        lm_head = head[0].get_tensor(head[1]).to(device=device, dtype=dtype)
    norm = take("norm.weight")
    rest = [k for k in where if "rotary_emb" not in k]
    if rest:
        log.warning("%s: ignoring %d unused weights, e.g. %s", folder, len(rest), rest[:3])
    return LlamaWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head.contiguous())


# GGUF tensor types by the weight-only format that holds them without losing precision: 4-bit codes in blocks of
# 32 (or sub-blocks of 32) are int4 groups of 32; 5- to 8-bit ones fit int8; anything else (F16, BF16, F32) stays.
_GGUF_INT4 = frozenset({"Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS"})
_GGUF_INT8 = frozenset({"Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K"}) | _GGUF_INT4
_PRECISION_CACHE = "gguf_weight_precision.json"


def checkpoint_quantization(files: ModelFiles) -> str:
    """The weight-only format that holds the checkpoint's layer matrices at their own precision: "int4" for a GGUF
    whose layers are all 4-bit (the default SmolLM2 is Q4_1), "int8" for one with 5- to 8-bit layers, else "none"
    (HF folders, F16/F32 GGUFs). The embedding/output matrix is not counted: the model keeps it at 8 bits.

    Reading a GGUF's tensor table takes seconds, so the answer is cached in its converted folder."""
    if files.gguf_path is None:
        return "none"
    cache = files.folder / _PRECISION_CACHE
    try:
        return str(json.loads(cache.read_text())["quantization"])
    except (OSError, ValueError, KeyError):
        pass
    from gguf import GGUFReader

    kinds = {
        t.tensor_type.name
        for t in GGUFReader(str(files.gguf_path)).tensors
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
    }
    found = "int4" if kinds and kinds <= _GGUF_INT4 else "int8" if kinds and kinds <= _GGUF_INT8 else "none"
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"quantization": found, "gguf_types": sorted(kinds)}))
        tmp.replace(cache)
    except OSError:  # a read-only folder: ask again next time
        pass
    return found

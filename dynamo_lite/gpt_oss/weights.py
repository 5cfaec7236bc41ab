"""Random gpt-oss weights from a fixed seed, in the Hugging Face safetensors layout.

``write_random_weights`` writes ``model.safetensors`` with the names and shapes transformers'
``GptOssForCausalLM`` loads (``model.layers.N.self_attn.{q,k,v,o}_proj``, ``.sinks``, ``.mlp.router``,
``.mlp.experts.gate_up_proj`` ``[experts, hidden, 2 * intermediate]`` with gate and up interleaved, ...), so the
engine and transformers read the very same folder. ``mxfp4=True`` stores the experts as the real checkpoints do:
``*_blocks`` (two FP4 values a byte, 32 values a block) and ``*_scales`` (one power-of-two exponent a block,
biased by 127), plus ``quantization_config`` in ``config.json``.

The scales are chosen so that a random model behaves like a model (activations of order one through every
layer, attention neither uniform nor one-hot, routing spread over the experts, sinks that matter) rather than
collapsing into one repeated token: unit-RMS inputs times N(0, 1/fan_in) weights.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

MXFP4_BLOCK = 32  # values per scale
MXFP4_MODULES_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def random_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight of the model ``config`` describes, fp32 on the CPU, drawn from ``torch.Generator(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    experts, vocab = int(config["num_local_experts"]), int(config["vocab_size"])

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(hidden, std=0.1)

    out = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(int(config["num_hidden_layers"])):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": norm_weight(),
            p + "post_attention_layernorm.weight": norm_weight(),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.q_proj.bias": normal(heads * head_dim, std=0.1),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.k_proj.bias": normal(kv_heads * head_dim, std=0.1),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden, std=hidden**-0.5),
            p + "self_attn.v_proj.bias": normal(kv_heads * head_dim, std=0.1),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim, std=(heads * head_dim) ** -0.5),
            p + "self_attn.o_proj.bias": normal(hidden, std=0.1),
            p + "self_attn.sinks": normal(heads, std=1.0),
            p + "mlp.router.weight": normal(experts, hidden, std=hidden**-0.5),
            p + "mlp.router.bias": normal(experts, std=0.1),
            p + "mlp.experts.gate_up_proj": normal(experts, hidden, 2 * inter, std=hidden**-0.5),
            p + "mlp.experts.gate_up_proj_bias": normal(experts, 2 * inter, std=0.1),
            p + "mlp.experts.down_proj": normal(experts, inter, hidden, std=inter**-0.5),
            p + "mlp.experts.down_proj_bias": normal(experts, hidden, std=0.1),
        }
    out["model.norm.weight"] = norm_weight()
    out["lm_head.weight"] = normal(vocab, hidden, std=hidden**-0.5)
    return out


def quantize_mxfp4(weight: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 blocks and scales shaped like ``weight`` ``[experts, in, out]`` is stored in a checkpoint.

    A checkpoint keeps ``[experts, out, in / 32, 16]`` bytes and ``[experts, out, in / 32]`` exponents; the values
    are random (what matters here is the format, not fidelity to ``weight``), with exponents that give them
    ``weight``'s order of magnitude.
    """
    experts, fan_in, fan_out = weight.shape
    return random_mxfp4_blocks(experts, fan_in, fan_out, float(weight.std()), gen)


def random_mxfp4_blocks(
    experts: int, fan_in: int, fan_out: int, std: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[experts, fan_out, fan_in / 32, 16]`` blocks and ``[experts, fan_out, fan_in / 32]`` exponents
    (a checkpoint's layout) whose values have about ``std``'s order of magnitude."""
    if fan_in % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {MXFP4_BLOCK}, got {fan_in}")
    groups = fan_in // MXFP4_BLOCK
    blocks = torch.randint(
        0, 256, (experts, fan_out, groups, MXFP4_BLOCK // 2), generator=gen, dtype=torch.uint8
    )
    # FP4 values have mean |x| ~ 2.3: an exponent of log2(std / 2.3) keeps the magnitude, +-1 spreads it.
    centre = 127 + round(math.log2(std / 2.3))
    scales = torch.randint(centre - 1, centre + 2, (experts, fan_out, groups), generator=gen).to(torch.uint8)
    return blocks, scales


def write_random_weights(
    folder: str | Path,
    config: dict,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.bfloat16,
    mxfp4: bool = False,
) -> Path:
    """Write ``model.safetensors`` of random weights for ``config`` into ``folder`` (bf16 by default: half the
    bytes, and exact in fp32 for whoever upcasts them). ``mxfp4``: experts as blocks + scales, and
    ``config.json`` (rewritten) says so."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = random_tensors(config, seed)
    if mxfp4:
        gen = torch.Generator().manual_seed(seed + 1)
        for name in [n for n in tensors if n.endswith(("gate_up_proj", "down_proj"))]:
            blocks, scales = quantize_mxfp4(tensors.pop(name), gen)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        config = {
            **config,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED,
            },
        }
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {k: v if v.dtype == torch.uint8 else v.to(dtype).contiguous() for k, v in tensors.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    return folder


def write_mxfp4_checkpoint(folder: str | os.PathLike[str], config: dict, seed: int = 0) -> Path:
    """Write random weights for ``config`` as the published gpt-oss checkpoints are laid out: bf16 attention,
    router, embeddings and head; experts as MXFP4 ``*_blocks`` + ``*_scales``; one safetensors shard per layer
    plus ``model.safetensors.index.json``. Made a layer at a time, so the 20b shape (~13 GB) is written within a
    few GB of memory; no dequantized expert is ever made."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    experts, vocab_size = int(config["num_local_experts"]), int(config["vocab_size"])
    layers = int(config["num_hidden_layers"])
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    def mxfp4(fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        return random_mxfp4_blocks(experts, fan_in, fan_out, fan_in**-0.5, gen)

    head = {
        "model.embed_tokens.weight": normal(vocab_size, hidden, std=1.0),
        "model.norm.weight": normal(hidden, std=0.1, mean=1.0),
        "lm_head.weight": normal(vocab_size, hidden, std=hidden**-0.5),
    }
    weight_map: dict[str, str] = {}
    total = 0
    for i in [-1, *range(layers)]:
        if i < 0:
            name, tensors, head = "model-embeddings.safetensors", head, {}
        else:
            p = f"model.layers.{i}."
            gu_blocks, gu_scales = mxfp4(hidden, 2 * inter)
            dn_blocks, dn_scales = mxfp4(inter, hidden)
            name = f"model-layer-{i:03d}.safetensors"
            tensors = {
                p + "input_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
                p + "post_attention_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
                p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden, std=hidden**-0.5),
                p + "self_attn.q_proj.bias": normal(heads * head_dim, std=0.1),
                p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden, std=hidden**-0.5),
                p + "self_attn.k_proj.bias": normal(kv_heads * head_dim, std=0.1),
                p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden, std=hidden**-0.5),
                p + "self_attn.v_proj.bias": normal(kv_heads * head_dim, std=0.1),
                p + "self_attn.o_proj.weight": normal(
                    hidden, heads * head_dim, std=(heads * head_dim) ** -0.5
                ),
                p + "self_attn.o_proj.bias": normal(hidden, std=0.1),
                p + "self_attn.sinks": normal(heads, std=1.0),
                p + "mlp.router.weight": normal(experts, hidden, std=hidden**-0.5),
                p + "mlp.router.bias": normal(experts, std=0.1),
                p + "mlp.experts.gate_up_proj_blocks": gu_blocks,
                p + "mlp.experts.gate_up_proj_scales": gu_scales,
                p + "mlp.experts.gate_up_proj_bias": normal(experts, 2 * inter, std=0.1),
                p + "mlp.experts.down_proj_blocks": dn_blocks,
                p + "mlp.experts.down_proj_scales": dn_scales,
                p + "mlp.experts.down_proj_bias": normal(experts, hidden, std=0.1),
            }
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map |= dict.fromkeys(tensors, name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {
        **config,
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": MXFP4_MODULES_NOT_CONVERTED,
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder

"""A small random-weight llama model folder for tests and demos of the torch engine's ranks, made offline:
``python -m dynamo_lite prepare --tiny-llama DIR``.

Its heads divide evenly over 2 and 4 ranks (8 query / 4 KV heads of 16; the default SmolLM2's 9 / 3 do not), so
tensor-parallel runs can be compared with one rank. 2 layers, hidden 128, intermediate 256, an untied output
matrix, and gpt-oss's o200k tokenizer (``tokenizer.json``, any token id of its 201,088 is a valid input) so that
it needs no download. The weights are drawn from a fixed seed with the scales that keep a random model's
activations of order one (``gpt_oss.weights``), so greedy tokens are not ties.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dynamo_lite.gpt_oss import vocab

TINY_LLAMA: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "vocab_size": vocab.VOCAB_SIZE,
    "bos_token_id": vocab.STARTOFTEXT,
    "eos_token_id": vocab.RETURN,
}


def write_model_folder(folder: str | os.PathLike[str], seed: int = 0, **shape: int) -> Path:
    """Write the tiny llama (``shape`` overrides ``TINY_LLAMA``'s sizes) into ``folder``: config, tokenizer,
    generation config and one fp32 ``model.safetensors``."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_LLAMA, **shape}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab.RETURN]}, indent=1))
    if not (folder / "tokenizer.json").exists():
        vocab.write_tokenizer(folder)
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg["head_dim"]
    q_dim, kv_dim = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).mul_(std).add_(mean)

    tensors = {
        "model.embed_tokens.weight": normal(cfg["vocab_size"], hidden, std=1.0),
        "model.norm.weight": normal(hidden, std=0.1, mean=1.0),
        "lm_head.weight": normal(cfg["vocab_size"], hidden, std=hidden**-0.5),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
            p + "post_attention_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
            p + "self_attn.q_proj.weight": normal(q_dim, hidden, std=hidden**-0.5),
            p + "self_attn.k_proj.weight": normal(kv_dim, hidden, std=hidden**-0.5),
            p + "self_attn.v_proj.weight": normal(kv_dim, hidden, std=hidden**-0.5),
            p + "self_attn.o_proj.weight": normal(hidden, q_dim, std=q_dim**-0.5),
            p + "mlp.gate_proj.weight": normal(inter, hidden, std=hidden**-0.5),
            p + "mlp.up_proj.weight": normal(inter, hidden, std=hidden**-0.5),
            p + "mlp.down_proj.weight": normal(hidden, inter, std=inter**-0.5),
        }
    save_file(tensors, str(folder / "model.safetensors"))
    return folder

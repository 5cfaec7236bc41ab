"""A small gpt-oss model folder for tests and demos, made offline: ``python -m dynamo_lite prepare --tiny-gpt-oss DIR``.

It has the real gpt-oss layout — ``config.json`` of ``model_type: gpt_oss`` (alternating sliding/full attention,
attention sinks, YaRN rope, top-k experts), the o200k_harmony ``tokenizer.json`` and gpt-oss's
``generation_config.json`` — at a shape small enough for a CPU. ``metadata_only`` leaves out the weights (what a
frontend or the mocker needs).

The shape (``TINY_SHAPE``): 4 layers (sliding, full, sliding, full), hidden 64, 4 query / 2 KV heads of 16,
4 experts top-2, intermediate 64, sliding window 16 (shorter than the test prompts), the full 201,088-token
vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dynamo_lite.gpt_oss import vocab

TINY_SHAPE: dict = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "sliding_window": 16,
}


SHAPES: dict[str, dict] = {
    "tiny": TINY_SHAPE,
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {},  # the architecture constants below are the 120b's
}
"""Model shapes by name: ``gpt_oss_config(**SHAPES[name])``."""


def gpt_oss_config(**shape: int) -> dict:
    """``config.json`` of a gpt-oss model: the 120b's architecture constants with ``shape`` overriding sizes."""
    layers = int(shape.get("num_hidden_layers", 36))
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 2880,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab.VOCAB_SIZE,
        "eos_token_id": vocab.RETURN,
        "pad_token_id": vocab.ENDOFTEXT,
    }
    cfg.update(shape)
    cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    cfg["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return cfg


GENERATION_CONFIG = {
    "bos_token_id": vocab.STARTOFTEXT,
    "do_sample": True,
    "eos_token_id": [vocab.RETURN, vocab.ENDOFTEXT, vocab.CALL],
    "pad_token_id": vocab.ENDOFTEXT,
}


def write_model_folder(
    folder: str | os.PathLike[str],
    *,
    metadata_only: bool = False,
    seed: int = 0,
    shape: str = "tiny",
    mxfp4: bool = False,
) -> Path:
    """Write a gpt-oss folder of ``shape`` (config, tokenizer, generation config; weights unless
    ``metadata_only``). ``mxfp4``: the weights as the published checkpoints store them (MXFP4 experts, one shard
    a layer, written a layer at a time); otherwise one bf16 file (the tiny shape)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = gpt_oss_config(**SHAPES[shape])
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=1))
    if not (folder / "tokenizer.json").exists():
        vocab.write_tokenizer(folder)
    if metadata_only:
        return folder
    from dynamo_lite.gpt_oss.weights import write_mxfp4_checkpoint, write_random_weights

    if mxfp4:
        write_mxfp4_checkpoint(folder, config, seed=seed)
    else:
        write_random_weights(folder, config, seed=seed)
    return folder

"""Shared pieces of the gpt-oss tests: the tiny model folder (made once per test session), its test prompts,
and transformers' greedy tokens for them (computed once per session and kept next to the folder)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NEW_TOKENS = 20
WINDOW = 16  # TINY_SHAPE's sliding window
PROMPT_LENGTHS = (5, 11, 16, 17, 29, 40, 57, 70)
"""Eight prompts; five of them longer than the window (17..70), one exactly the window."""


def prompts() -> list[list[int]]:
    """Random token ids over the whole o200k vocabulary (ordinary tokens; the tokenizer is not involved)."""
    rng = random.Random(5)
    return [[rng.randrange(199_998) for _ in range(n)] for n in PROMPT_LENGTHS]


def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gpt-oss folder (``prepare --tiny-gpt-oss``), written once per test session."""
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    folder = tmp_path_factory.getbasetemp() / "tiny-gpt-oss"
    if not (folder / "model.safetensors").exists():
        write_model_folder(folder)
    return folder


def hf_greedy(folder: Path, device: str = "cpu") -> list[list[int]]:
    """transformers' ``GptOssForCausalLM.generate`` (fp32, greedy, ``NEW_TOKENS`` each, EOS ignored) on
    ``prompts()``; cached in the folder."""
    cache = folder / f"hf_greedy_{device}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    out = []
    with torch.inference_mode():
        for ids in prompts():
            gen = model.generate(
                torch.tensor([ids], device=device),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            out.append(gen[0, len(ids) :].tolist())
    cache.write_text(json.dumps(out))
    return out

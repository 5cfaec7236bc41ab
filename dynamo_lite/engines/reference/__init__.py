"""The torch reference engine (``--engine torch``): a llama-family model in plain PyTorch with continuous
batching, a preallocated slot KV cache, chunked prefill, and KV export/import for disaggregated serving.

>>> engine = build_engine(EngineSettings(mode="agg", dtype="bfloat16", threads=2))
>>> await engine.start()
>>> async for chunk in engine.generate(request): ...
"""

from __future__ import annotations

import os
import sys

# Idle OpenMP threads should sleep, not spin: the engine thread shares its cores with the event loop (and, in
# the embedded mode, with another engine), and spinning workers stole enough CPU to slow decode by 20-40 %.
# libgomp reads this once, when torch loads: it only helps if nothing imported torch before us.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference.config import ConfigError, ReferenceConfig, from_settings
from dynamo_lite.engines.reference.engine import TorchEngine
from dynamo_lite.model_files import resolve_model

__all__ = ["ConfigError", "ReferenceConfig", "TorchEngine", "build_engine"]


def build_engine(settings: EngineSettings) -> TorchEngine:
    """Build (not start) the engine. Resolves the model's files now (tokenizer/config; ~12 s the very first
    time for a GGUF, then cached) so ``engine.model_files`` is ready for the model card; weights load in
    ``start()``."""
    config = from_settings(settings)
    engine = TorchEngine(config, resolve_model(config.model_path))
    engine.pacing = settings.pacing
    return engine

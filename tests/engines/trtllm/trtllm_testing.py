"""Helpers for the TensorRT-LLM adapter's tests (the fixtures are in ``conftest.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.trtllm import TrtllmEngine, build_engine

STANDIN_PATH = Path(__file__).resolve().parent / "standin"
"""The stand-in ``tensorrt_llm`` package lives here: put it on ``PYTHONPATH`` for other processes."""
VOCAB_SIZE = 1000
EOS_ID = 2


def forget_tensorrt_llm() -> None:
    """Drop every imported ``tensorrt_llm`` module: the next import finds whatever ``sys.path`` says now."""
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


def make_engine(
    model_dir: Path, mode: str = "agg", extra: dict | None = None, **settings: object
) -> TrtllmEngine:
    """``build_engine`` as the worker calls it (the test must hold the ``standin`` fixture)."""
    return build_engine(
        EngineSettings(
            role=mode, model_path=str(model_dir), extra=extra or {}, extra_source="test.yaml", **settings
        )
    )

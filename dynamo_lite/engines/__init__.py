"""Engines behind one interface (``dynamo_lite.engines.base.Engine``); each imports its heavy deps itself."""

from __future__ import annotations

from dynamo_lite.engines.base import Engine, EngineSettings, EngineUnavailable

ENGINES = ("torch", "mocker", "trtllm")


def build_engine(name: str, settings: EngineSettings) -> Engine:
    """Build the engine ``name``; raises ``EngineUnavailable`` when its library is missing."""
    if name == "mocker":
        from dynamo_lite.engines.mocker import build_engine as build
    elif name == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise EngineUnavailable(
                "--engine torch needs PyTorch: pip install 'dynamo_lite[torch]' (CPU: pip install torch==2.13.0)"
            ) from None
        from dynamo_lite.engines.reference import build_engine as build
    elif name == "trtllm":
        from dynamo_lite.engines.trtllm import build_engine as build
    else:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return build(settings)

"""Engines behind one interface (``dynamo_lite.engines.base.Engine``); each imports its heavy deps itself."""

from __future__ import annotations

import importlib.util
import logging
import os

from dynamo_lite.engines.base import Engine, EngineSettings, EngineUnavailable
from dynamo_lite.protocol import EngineKind

ENGINES = tuple(k.value for k in EngineKind if k is not EngineKind.UNRECOGNIZED)  # --engine choices

log = logging.getLogger(__name__)


def _gpu_present() -> bool:
    """An NVIDIA GPU is visible to this process (without importing torch when it isn't installed)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch.cuda.is_available()
    return os.path.isdir("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus"))


def default_engine() -> str:
    """The engine a worker runs when ``--engine`` is omitted: TensorRT-LLM where it imports and a GPU is
    present, else the reference engine (``torch``). Logs which one and why."""
    from dynamo_lite.engines.trtllm.api import import_tensorrt_llm

    try:
        api = import_tensorrt_llm()
    except EngineUnavailable as e:
        log.info(
            "engine: torch (no --engine given; TensorRT-LLM unavailable: %s)", str(e).rsplit("(", 1)[-1][:-1]
        )
        return "torch"
    if not _gpu_present():
        log.info(
            "engine: torch (no --engine given; tensorrt_llm %s imports but no GPU is visible)", api.version
        )
        return "torch"
    log.info("engine: trtllm (no --engine given; tensorrt_llm %s and a GPU are present)", api.version)
    return "trtllm"


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
    elif name == "llamacpp":
        from dynamo_lite.engines.llamacpp import build_engine as build
    else:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return build(settings)

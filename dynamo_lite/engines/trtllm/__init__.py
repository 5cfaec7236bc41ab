"""``--engine trtllm``: TensorRT-LLM's LLM API (PyTorch backend) behind the ``Engine`` protocol.

Needs the optional extra ``pip install 'dynamo_lite[trtllm]'`` (an NVIDIA GPU); without it
:func:`build_engine` raises ``EngineUnavailable`` with a one-line message. Modules:

- ``args``   — worker flags → ``LLM(...)`` keyword arguments, ``--extra-engine-args`` YAML merged on top;
- ``disagg`` — ``DisaggregatedParams`` ⇄ ``KvDescriptor.opaque`` (JSON, ``opaque_state`` in base64);
- ``sampling`` — ``SamplingOptions`` → ``SamplingParams``;
- ``engine`` — the engine: context-only prefill, generation-only decode, token deltas, abort on close;
- ``api``    — the TensorRT-LLM classes used, imported once; ``model`` — where the checkpoint is on disk.

Example::

    settings = EngineSettings(role=Role.PREFILL, model_path="/models/gpt-oss-120b",
                              extra=load_engine_args_yaml("engine_configs/gpt_oss/prefill.yaml"),
                              extra_source="engine_configs/gpt_oss/prefill.yaml")
    engine = build_engine(settings)      # checks args and model files; loads nothing yet
    await engine.start()                 # LLM(...): loads the model onto the GPUs
"""

from __future__ import annotations

import logging

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.trtllm.api import TrtllmApi, import_tensorrt_llm
from dynamo_lite.engines.trtllm.args import TRTLLM_SCHEMA, build_llm_args, overridden_flags
from dynamo_lite.engines.trtllm.engine import TrtllmEngine, TrtllmLimits
from dynamo_lite.engines.trtllm.facts import drop_unsupported
from dynamo_lite.engines.trtllm.model import resolve_trtllm_model

__all__ = ["TRTLLM_SCHEMA", "TrtllmEngine", "TrtllmLimits", "build_engine", "build_llm_args"]

logger = logging.getLogger(__name__)


def build_engine(settings: EngineSettings, *, api: TrtllmApi | None = None) -> TrtllmEngine:
    """Check all that can be checked before loading: TensorRT-LLM importable (else ``EngineUnavailable``), the
    model folder found (``ModelNotFound``), the engine arguments valid (``EngineArgsError``)."""
    api = api or import_tensorrt_llm()
    model = resolve_trtllm_model(settings.model_path)
    if not model.weights_ready:
        logger.warning(
            "%s has no *.safetensors weights: TensorRT-LLM will not be able to load it", model.folder
        )
    llm_args, warnings = build_llm_args(settings, str(model.folder), model.context_length)
    for line in warnings:
        logger.warning("%s", line)
    for line in overridden_flags(settings):
        logger.info("%s", line)
    llm_args, missing = drop_unsupported(llm_args, api.version)
    for line in missing:
        logger.warning("%s", line)
    api.materialize(llm_args)  # a bad nested section fails here, not minutes later in start()
    return TrtllmEngine(settings, llm_args, api, model)

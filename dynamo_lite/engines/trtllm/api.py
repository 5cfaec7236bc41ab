"""The part of ``tensorrt_llm`` the engine touches, imported once, with a one-line error when it is missing.

The engine uses TensorRT-LLM's documented LLM API only: ``LLM(model=..., **args)``, ``SamplingParams``,
``DisaggregatedParams``, ``GuidedDecodingParams``, ``LLM.generate_async(...)`` returning a ``RequestOutput``
(async-iterable; ``.outputs[0]`` with cumulative ``token_ids``, ``finish_reason``, ``disaggregated_params``;
``.finished``; ``.abort()``), and ``LLM.shutdown()``; plus the ``tensorrt_llm.llmapi`` config classes for nested
sections.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from dynamo_lite.engines.base import EngineUnavailable
from dynamo_lite.engines.engine_args import EngineArgsError

INSTALL_HINT = (
    "--engine trtllm needs TensorRT-LLM: pip install 'dynamo_lite[trtllm]' (NVIDIA GPU, CUDA 12.x/13.x)"
    " — tensorrt_llm is not importable here"
)

# Nested YAML sections turned into TensorRT-LLM's config objects before LLM(...), so a bad sub-key is reported
# against its section (pydantic would coerce the dicts too, but older releases expected the objects).
CONFIG_CLASSES = {
    "kv_cache_config": "KvCacheConfig",
    "cuda_graph_config": "CudaGraphConfig",
    "moe_config": "MoeConfig",
    "cache_transceiver_config": "CacheTransceiverConfig",
}


@dataclass(slots=True)
class TrtllmApi:
    """Handles on the TensorRT-LLM classes the engine calls (a stand-in module can provide them in tests)."""

    LLM: Any
    SamplingParams: Any
    DisaggregatedParams: Any
    config_classes: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    GuidedDecodingParams: Any = None  # tensorrt_llm.llmapi's; None: this release has no guided decoding

    def materialize(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` with the nested config mappings replaced by TensorRT-LLM config objects."""
        out = dict(args)
        for key, cls in self.config_classes.items():
            value = out.get(key)
            if isinstance(value, dict):
                try:
                    out[key] = cls(**value)
                except Exception as e:  # pydantic ValidationError, TypeError: both name the bad field
                    detail = " ".join(str(e).split())
                    raise EngineArgsError(f"{key}: TensorRT-LLM rejected it: {detail}") from None
        return out


def import_tensorrt_llm(module: str = "tensorrt_llm") -> TrtllmApi:
    """Import TensorRT-LLM; raise ``EngineUnavailable`` (one line) when it is missing or cannot load."""
    try:
        trtllm = importlib.import_module(module)
        llmapi = importlib.import_module(f"{module}.llmapi")
    except Exception as e:  # ImportError, but also OSError/RuntimeError from missing CUDA libraries
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise EngineUnavailable(f"{INSTALL_HINT} ({reason})") from e
    disagg_cls = getattr(trtllm, "DisaggregatedParams", None) or getattr(llmapi, "DisaggregatedParams", None)
    llm_cls = getattr(trtllm, "LLM", None) or getattr(llmapi, "LLM", None)
    sampling_cls = getattr(trtllm, "SamplingParams", None) or getattr(llmapi, "SamplingParams", None)
    missing = [
        n
        for n, c in (("LLM", llm_cls), ("SamplingParams", sampling_cls), ("DisaggregatedParams", disagg_cls))
        if c is None
    ]
    if missing:
        version = getattr(trtllm, "__version__", "?")
        raise EngineUnavailable(
            f"--engine trtllm needs TensorRT-LLM >= 1.0 with the LLM API; tensorrt_llm {version} lacks "
            f"{', '.join(missing)}"
        )
    classes = {key: getattr(llmapi, name) for key, name in CONFIG_CLASSES.items() if hasattr(llmapi, name)}
    return TrtllmApi(
        LLM=llm_cls,
        SamplingParams=sampling_cls,
        DisaggregatedParams=disagg_cls,
        config_classes=classes,
        version=str(getattr(trtllm, "__version__", "")),
        GuidedDecodingParams=getattr(llmapi, "GuidedDecodingParams", None),
    )

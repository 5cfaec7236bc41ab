"""Held to the real API: our engine_configs/ YAMLs, every keyword the trtllm adapter passes, and the stand-in's
signatures are checked against TensorRT-LLM's recorded API (dynamo_lite/engines/trtllm/api_facts.yaml) for
each supported release line. An unknown key fails here instead of on a GPU machine minutes into loading."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.engine_args import load_engine_args_yaml
from dynamo_lite.engines.trtllm import disagg, facts
from dynamo_lite.engines.trtllm.args import build_llm_args
from dynamo_lite.engines.trtllm.sampling import sampling_kwargs
from dynamo_lite.protocol import GuidedKind, GuidedSpec, SamplingOptions

ROOT = Path(__file__).resolve().parents[3]
TRTLLM_CONFIGS = sorted(
    [
        *(ROOT / "engine_configs" / "gpt_oss").rglob("*.yaml"),
        *(ROOT / "deploy" / "k8s" / "base" / "engine_configs").glob("*.yaml"),
    ]
)
RELEASES = facts.releases()

_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "list": (list, tuple),
    "dict": (dict,),
    "bytes": (bytes,),
    "choice": (str,),
}


def _problems(values: dict[str, Any], cls: str, release: str, prefix: str = "") -> list[str]:
    """Every key of ``values`` that ``cls`` of ``release`` lacks, or whose value has the wrong type."""
    known = facts.fields(cls, release)
    out = []
    for key, value in values.items():
        fact = known.get(key)
        name = f"{prefix}{key}"
        if fact is None:
            out.append(f"{cls} {release}: unknown key {name}")
            continue
        if value is None:
            if not fact.optional:
                out.append(f"{cls} {release}: {name} may not be null")
            continue
        kinds = _TYPES[fact.type] if fact.type in _TYPES else (object,)
        wrong_bool = isinstance(value, bool) and fact.type in ("int", "float")
        if wrong_bool or not isinstance(value, kinds):
            out.append(f"{cls} {release}: {name} is {type(value).__name__}, expected {fact.type}")
        elif fact.type == "choice" and value.upper() not in {v.upper() for v in fact.values}:
            out.append(f"{cls} {release}: {name}={value!r} is not one of {fact.values}")
        elif fact.cls and isinstance(value, dict):
            out += _problems(value, fact.cls, release, f"{name}.")
    return out


def test_the_facts_name_a_source_for_every_class() -> None:
    data = facts.load_facts()
    for name, cls in data["classes"].items():
        assert cls["source"] and all(s in data["sources"] for s in cls["source"]), name
        assert all(data["sources"][s]["where"] for s in cls["source"])


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("path", TRTLLM_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_engine_config_key_is_in_the_recorded_api(path: Path, release: str) -> None:
    config = load_engine_args_yaml(path)
    kept, dropped = facts.drop_unsupported(config, f"{release}.0")
    assert _problems(kept, "TorchLlmArgs", release) == []
    # What a release lacks is exactly what the adapter leaves out there (kv_transfer_timeout_ms on 1.0).
    missing = [problem.split(": unknown key ")[1] for problem in _problems(config, "TorchLlmArgs", release)]
    assert missing == [line.split(" needs ")[0] for line in dropped]


def test_an_unknown_key_is_caught() -> None:
    unknown = _problems({"use_cuda_graph": True}, "TorchLlmArgs", "1.2")
    assert unknown == ["TorchLlmArgs 1.2: unknown key use_cuda_graph"]
    assert _problems({"moe_config": {"backend": "TRITON2"}}, "TorchLlmArgs", "1.2")
    assert _problems({"cache_transceiver_config": {"kv_transfer_timeout_ms": 5}}, "TorchLlmArgs", "1.0")


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("mode", ["prefill", "decode", "agg"])
def test_every_llm_keyword_the_adapter_passes_is_in_the_recorded_api(mode: str, release: str) -> None:
    every_flag = EngineSettings(
        role=mode,
        max_batch_size=8,
        max_num_tokens=256,
        max_seq_len=1024,
        kv_block_size=64,  # not TensorRT-LLM's 32: tokens_per_block is passed
        free_gpu_memory_fraction=0.5,
        tensor_parallel_size=2,
        expert_parallel_size=2,
    )
    args, _ = build_llm_args(every_flag, "/models/m")
    kept, _ = facts.drop_unsupported(args, f"{release}.0")
    assert _problems(kept, "TorchLlmArgs", release) == []


@pytest.mark.parametrize("release", RELEASES)
def test_every_sampling_keyword_is_in_the_recorded_api(release: str) -> None:
    everything = SamplingOptions(
        max_tokens=9,
        min_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        seed=1,
        ignore_eos=True,
        stop_token_ids=[3],
        guided=GuidedSpec(GuidedKind.REGEX, "[a-z]+"),
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        min_p=0.1,
        logprobs=0,
        prompt_logprobs=2,
    )
    for options in (everything, SamplingOptions(temperature=0.0)):
        assert _problems(sampling_kwargs(options, max_tokens=4), "SamplingParams", release) == []


def test_every_disaggregated_params_field_the_adapter_carries_is_recorded() -> None:
    carried = {
        "request_type",
        "opaque_state",
        *disagg._INT_FIELDS,
        *disagg._TOKEN_FIELDS,
        *disagg._STR_FIELDS,
    }
    assert carried <= set(facts.fields("DisaggregatedParams"))
    assert {"request_type", "first_gen_tokens", "ctx_request_id", "opaque_state"} <= set(
        facts.fields("DisaggregatedParams", "1.0")
    )


def _dataclass_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_standins_signatures_match_the_recorded_api(standin: ModuleType) -> None:
    from tensorrt_llm import llmapi

    latest = RELEASES[-1]
    assert facts.release_line(standin.__version__) == latest
    assert _dataclass_fields(standin.SamplingParams) <= set(facts.fields("SamplingParams", latest))
    assert _dataclass_fields(standin.DisaggregatedParams) <= set(facts.fields("DisaggregatedParams", latest))
    assert _dataclass_fields(llmapi.GuidedDecodingParams) <= set(facts.fields("GuidedDecodingParams", latest))
    for section in ("KvCacheConfig", "CudaGraphConfig", "MoeConfig", "CacheTransceiverConfig"):
        assert _dataclass_fields(getattr(llmapi, section)) <= set(facts.fields(section, latest)), section
    assert llmapi.KNOWN_ARGS <= set(facts.fields("TorchLlmArgs", latest))
    params = inspect.signature(standin.LLM.generate_async).parameters
    assert set(facts.fields("LLM.generate_async")) <= set(params)
    # The stand-in refuses what TensorRT-LLM refuses: choices outside the recorded ones.
    for section, field in (("CacheTransceiverConfig", "backend"), ("MoeConfig", "backend")):
        for value in facts.fields(section)[field].values:
            getattr(llmapi, section)(**{field: value})
        with pytest.raises(ValueError):
            getattr(llmapi, section)(**{field: "NOT_A_BACKEND"})

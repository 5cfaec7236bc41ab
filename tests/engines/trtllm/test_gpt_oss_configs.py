"""``engine_configs/gpt_oss/{prefill,decode}.yaml``: the seed deployment's TensorRT-LLM settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.engine_args import check_engine_args, load_engine_args_yaml
from dynamo_lite.engines.trtllm import TRTLLM_SCHEMA, build_llm_args

CONFIGS = Path(__file__).resolve().parents[3] / "engine_configs" / "gpt_oss"

COMMON = {
    "backend": "pytorch",
    "trust_remote_code": True,
    "tensor_parallel_size": 4,
    "moe_expert_parallel_size": 4,
    "max_num_tokens": 16384,
    "kv_cache_config": {"free_gpu_memory_fraction": 0.8},
    "moe_config": {"backend": "CUTLASS"},
}


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_config_is_valid_and_fully_known(name: str) -> None:
    args = load_engine_args_yaml(CONFIGS / f"{name}.yaml")
    assert check_engine_args(args, TRTLLM_SCHEMA, source=f"{name}.yaml") == []
    for key, value in COMMON.items():
        assert args[key] == value, key
    assert args["cache_transceiver_config"]["backend"].upper() == "UCX"


def test_prefill_settings() -> None:
    args = load_engine_args_yaml(CONFIGS / "prefill.yaml")
    assert args["enable_attention_dp"] is False
    assert args["enable_chunked_prefill"] is True
    assert args["disable_overlap_scheduler"] is True
    assert args["cuda_graph_config"]["max_batch_size"] == 32


def test_decode_settings() -> None:
    args = load_engine_args_yaml(CONFIGS / "decode.yaml")
    assert args["enable_attention_dp"] is True
    assert args["disable_overlap_scheduler"] is False
    assert args["cuda_graph_config"]["max_batch_size"] == 128


@pytest.mark.parametrize("name", ["prefill", "decode"])
def test_config_merges_over_the_launch_flags_without_warnings(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    settings = EngineSettings(
        role=name,
        extra=load_engine_args_yaml(path),
        extra_source=str(path),
        max_batch_size=32,
        max_seq_len=131072,
    )
    args, warnings = build_llm_args(settings, "/models/gpt-oss-120b")
    assert warnings == []
    assert args["max_seq_len"] == 131072  # from the flag: not in the YAML
    assert args["max_num_tokens"] == 16384  # the YAML wins over the flag's 512

"""Worker flags → TensorRT-LLM ``LLM`` arguments, and the YAML merged on top (no TensorRT-LLM needed)."""

from __future__ import annotations

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.engine_args import EngineArgsError
from dynamo_lite.engines.trtllm.args import build_llm_args, describe_sources, flag_args


def settings(mode: str = "agg", extra: dict | None = None, **kw: object) -> EngineSettings:
    return EngineSettings(role=mode, extra=extra or {}, extra_source="cfg.yaml", **kw)


def test_flags_use_tensorrt_llm_names() -> None:
    s = settings(
        tensor_parallel_size=4,
        expert_parallel_size=2,
        max_batch_size=128,
        max_num_tokens=16384,
        max_seq_len=8192,
        free_gpu_memory_fraction=0.7,
    )
    assert flag_args(s, "/models/m") == {
        "model": "/models/m",
        "backend": "pytorch",
        "tensor_parallel_size": 4,
        "moe_expert_parallel_size": 2,
        "max_batch_size": 128,
        "max_num_tokens": 16384,
        "max_seq_len": 8192,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.7},
    }


def test_kv_block_size_maps_to_tokens_per_block_only_when_not_default() -> None:
    assert "tokens_per_block" not in flag_args(settings(kv_block_size=32), "m")["kv_cache_config"]
    assert flag_args(settings(kv_block_size=64), "m")["kv_cache_config"]["tokens_per_block"] == 64


def test_torch_only_flags_are_not_passed() -> None:
    args = flag_args(settings(dtype="float32", device="cpu", threads=2), "m")
    assert not {"dtype", "device", "threads"} & set(args)


@pytest.mark.parametrize(
    ("mode", "transceiver", "overlap_off"),
    [
        ("prefill", {"backend": "DEFAULT"}, True),
        ("decode", {"backend": "DEFAULT"}, None),
        ("agg", None, None),
    ],
)
def test_mode_defaults(mode: str, transceiver: dict | None, overlap_off: bool | None) -> None:
    args, warnings = build_llm_args(settings(mode), "m")
    assert args.get("cache_transceiver_config") == transceiver
    assert args.get("disable_overlap_scheduler") == overlap_off
    assert warnings == []


def test_yaml_wins_over_flags_and_nested_sections_merge() -> None:
    extra = {
        "max_num_tokens": 20000,
        "kv_cache_config": {"dtype": "fp8"},
        "cache_transceiver_config": {"backend": "UCX", "max_tokens_in_buffer": 65536},
        "enable_attention_dp": True,
    }
    args, warnings = build_llm_args(
        settings("decode", extra, max_num_tokens=512, free_gpu_memory_fraction=0.6), "m"
    )
    assert args["max_num_tokens"] == 20000
    assert args["kv_cache_config"] == {"free_gpu_memory_fraction": 0.6, "dtype": "fp8"}
    assert args["cache_transceiver_config"] == {"backend": "UCX", "max_tokens_in_buffer": 65536}
    assert args["enable_attention_dp"] is True
    assert warnings == []


def test_yaml_null_switches_a_section_off() -> None:
    args, _ = build_llm_args(settings("agg", {"cuda_graph_config": None, "kv_cache_config": None}), "m")
    assert args["cuda_graph_config"] is None
    assert args["kv_cache_config"] is None


def test_wrong_type_in_yaml_is_an_error_naming_file_and_key() -> None:
    extra = {"kv_cache_config": {"free_gpu_memory_fraction": "lots"}, "enable_attention_dp": "yes"}
    with pytest.raises(EngineArgsError) as info:
        build_llm_args(settings("decode", extra), "m")
    assert str(info.value) == (
        "cfg.yaml: kv_cache_config.free_gpu_memory_fraction: expected a number, got string ('lots'); "
        "enable_attention_dp: expected true or false, got string ('yes')"
    )


def test_unknown_yaml_keys_are_warnings_and_passed_through() -> None:
    extra = {"use_cuda_graph": True, "moe_config": {"backend": "CUTLASS", "mystery": 1}}
    args, warnings = build_llm_args(settings("agg", extra), "m")
    assert args["use_cuda_graph"] is True
    assert args["moe_config"] == {"backend": "CUTLASS", "mystery": 1}
    assert warnings == [
        "cfg.yaml: unknown key 'use_cuda_graph' (passed to the engine as is)",
        "cfg.yaml: unknown key 'moe_config.mystery' (passed to the engine as is)",
    ]


def test_model_cannot_come_from_yaml() -> None:
    with pytest.raises(EngineArgsError, match="cfg.yaml: 'model' cannot be set here; use --model-path"):
        build_llm_args(settings("agg", {"model": "/elsewhere"}), "m")


def test_disaggregated_mode_needs_a_cache_transceiver() -> None:
    with pytest.raises(
        EngineArgsError, match="cache_transceiver_config is null, but --mode prefill needs it"
    ):
        build_llm_args(settings("prefill", {"cache_transceiver_config": None}), "m")


def test_overlap_scheduler_on_prefill_is_warned_about() -> None:
    _, warnings = build_llm_args(settings("prefill", {"disable_overlap_scheduler": False}), "m")
    assert len(warnings) == 1
    assert "disable_overlap_scheduler is false on a prefill worker" in warnings[0]


def test_non_positive_limits_are_refused() -> None:
    with pytest.raises(EngineArgsError, match="max_batch_size must be at least 1, got 0"):
        build_llm_args(settings("agg", max_batch_size=0), "m")


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(EngineArgsError, match="backend: expected one of pytorch, _autodeploy"):
        build_llm_args(settings("agg", {"backend": "tensorrt"}), "m")


def test_describe_sources_tells_flag_from_yaml() -> None:
    s = settings("agg", {"max_num_tokens": 7})
    args, _ = build_llm_args(s, "m")
    line = describe_sources(s, args)
    assert "max_num_tokens=7 [cfg.yaml]" in line
    assert "max_batch_size=16 [flag]" in line

"""TensorRT-LLM ``LLM(...)`` arguments: worker flags first, then ``--extra-engine-args`` YAML merged on top.

Flag → TensorRT-LLM name (a flag given on the command line is passed; an omitted one is not, so
TensorRT-LLM's own default applies, as with Dynamo's worker — except ``--max-seq-len``, which defaults to the
model's context length; a key the YAML sets wins over its flag, and the worker logs each flag it overrides):

====================================  ==============================================
``--model-path``                      ``model`` (resolved to a local folder; not settable in the YAML)
``--tensor-parallel-size``            ``tensor_parallel_size``
``--expert-parallel-size``            ``moe_expert_parallel_size``
``--max-batch-size``                  ``max_batch_size`` (per attention-DP rank when that is on)
``--max-num-tokens``                  ``max_num_tokens``
``--max-seq-len``                     ``max_seq_len``
``--free-gpu-memory-fraction``        ``kv_cache_config.free_gpu_memory_fraction``
``--kv-block-size``                   ``kv_cache_config.tokens_per_block`` (only when not TensorRT-LLM's 32)
====================================  ==============================================

Defaults the mode adds below the YAML: ``backend: pytorch``; ``--mode prefill|decode`` add
``cache_transceiver_config: {backend: DEFAULT}`` (the KV transfer needs one), and ``--mode prefill`` adds
``disable_overlap_scheduler: true`` (TensorRT-LLM's context servers don't support the overlap scheduler).
``dtype``/``device``/``threads`` flags are ignored: TensorRT-LLM takes the dtype from the checkpoint (set
``dtype:`` in the YAML to override) and always runs on the GPUs in ``CUDA_VISIBLE_DEVICES``.

The YAML is merged key by key into nested mappings (see ``dynamo_lite.engines.engine_args``), checked against
:data:`TRTLLM_SCHEMA` (wrong types are errors, unknown keys warnings: TensorRT-LLM validates the rest).
"""

from __future__ import annotations

from typing import Any

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.engine_args import (
    ANY,
    Choice,
    EngineArgsError,
    Schema,
    check_engine_args,
    deep_merge,
)
from dynamo_lite.protocol import Role

TRTLLM_DEFAULT_TOKENS_PER_BLOCK = 32

TRTLLM_SCHEMA: Schema = {
    # model and tokenizer
    "model": str,
    "tokenizer": str,
    "tokenizer_mode": str,
    "skip_tokenizer_init": bool,
    "trust_remote_code": bool,
    "revision": str,
    "tokenizer_revision": str,
    "dtype": str,
    "load_format": str,
    "checkpoint_format": str,
    "backend": Choice("pytorch", "_autodeploy"),
    # parallelism
    "tensor_parallel_size": int,
    "pipeline_parallel_size": int,
    "context_parallel_size": int,
    "gpus_per_node": int,
    "moe_cluster_parallel_size": int,
    "moe_tensor_parallel_size": int,
    "moe_expert_parallel_size": int,
    "enable_attention_dp": bool,
    "enable_lm_head_tp_in_adp": bool,
    "attention_dp_config": {"enable_balance": bool, "batching_wait_iters": int, "timeout_iters": int},
    "cp_config": dict,
    # limits and scheduling
    "max_batch_size": int,
    "max_num_tokens": int,
    "max_seq_len": int,
    "max_input_len": int,
    "max_beam_width": int,
    "enable_chunked_prefill": bool,
    "disable_overlap_scheduler": bool,
    "enable_min_latency": bool,
    "stream_interval": int,
    "batch_wait_timeout_ms": float,
    "scheduler_config": {
        "capacity_scheduler_policy": str,
        "context_chunking_policy": str,
        "dynamic_batch_config": ANY,
    },
    # memory
    "kv_cache_config": {
        "free_gpu_memory_fraction": float,
        "max_tokens": int,
        "enable_block_reuse": bool,
        "enable_partial_reuse": bool,
        "copy_on_partial_reuse": bool,
        "max_attention_window": list,
        "sink_token_length": int,
        "host_cache_size": int,
        "onboard_blocks": bool,
        "cross_kv_cache_fraction": float,
        "secondary_offload_min_priority": int,
        "event_buffer_max_size": int,
        "use_uvm": bool,
        "dtype": str,
        "mamba_ssm_cache_dtype": str,
        "tokens_per_block": int,
        "attention_dp_events_gather_period_ms": int,
    },
    "cache_transceiver_config": {
        "backend": str,
        "max_tokens_in_buffer": int,
        "kv_transfer_timeout_ms": int,
        "kv_transfer_sender_future_timeout_ms": int,
        "transceiver_runtime": str,
    },
    # kernels
    "cuda_graph_config": {"max_batch_size": int, "batch_sizes": list, "enable_padding": bool},
    "moe_config": {
        "backend": str,
        "max_num_tokens": int,
        "load_balancer": ANY,
        "disable_finalize_fusion": bool,
        "use_low_precision_moe_combine": bool,
    },
    "attn_backend": str,
    "sampler_type": str,
    "allreduce_strategy": str,
    "enable_autotuner": bool,
    "torch_compile_config": dict,
    "force_dynamic_quantization": bool,
    "speculative_config": dict,
    "sparse_attention_config": dict,
    "enable_lora": bool,
    "lora_config": dict,
    "peft_cache_config": dict,
    "kv_connector_config": dict,
    "guided_decoding_backend": str,
    "reasoning_parser": str,
    # observability and housekeeping
    "print_iter_log": bool,
    "enable_iter_perf_stats": bool,
    "enable_iter_req_stats": bool,
    "iter_stats_max_iterations": int,
    "request_stats_max_iterations": int,
    "return_perf_metrics": bool,
    "enable_layerwise_nvtx_marker": bool,
    "otlp_traces_endpoint": str,
    "num_postprocess_workers": int,
    "postprocess_tokenizer_dir": str,
    "garbage_collection_gen0_threshold": int,
    "enable_sleep": bool,
}
"""The TensorRT-LLM (PyTorch backend) ``LLM`` keys we type-check; others pass through with a warning."""

DISAGGREGATED_ROLES = (Role.PREFILL, Role.DECODE)


# Worker flag (EngineSettings field) → where it goes in TensorRT-LLM's arguments.
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "tensor_parallel_size": ("tensor_parallel_size",),
    "expert_parallel_size": ("moe_expert_parallel_size",),
    "max_batch_size": ("max_batch_size",),
    "max_num_tokens": ("max_num_tokens",),
    "max_seq_len": ("max_seq_len",),
    "free_gpu_memory_fraction": ("kv_cache_config", "free_gpu_memory_fraction"),
    "kv_block_size": ("kv_cache_config", "tokens_per_block"),
}


def flag_args(settings: EngineSettings, model: str, model_max_seq_len: int | None = None) -> dict[str, Any]:
    """The base layer: the flags given on the command line (and per-role defaults) in TensorRT-LLM's names.

    An omitted flag is not passed, so TensorRT-LLM's own default applies (what Dynamo's worker does by passing
    TensorRT-LLM's ``BuildConfig`` defaults) — except ``max_seq_len``, which defaults to the model's context
    length (``model_max_seq_len``, from its ``config.json``).
    """
    args: dict[str, Any] = {"model": model, "backend": "pytorch"}
    for flag, path in FLAG_KEYS.items():
        if not settings.given(flag):
            continue
        value = getattr(settings, flag)
        if flag == "kv_block_size" and value == TRTLLM_DEFAULT_TOKENS_PER_BLOCK:
            continue  # TensorRT-LLM's default; releases without tokens_per_block would reject it
        _set(args, path, value)
    if not settings.given("max_seq_len") and model_max_seq_len:
        args["max_seq_len"] = model_max_seq_len
    if settings.enable_attention_dp:  # a switch: only its "on" is passed, TensorRT-LLM's default is off
        args["enable_attention_dp"] = True
    if settings.role in DISAGGREGATED_ROLES:
        args["cache_transceiver_config"] = {"backend": "DEFAULT"}
    if settings.role == Role.PREFILL:
        args["disable_overlap_scheduler"] = True
    return args


def _set(args: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        args = args.setdefault(key, {})
    args[path[-1]] = value


def _get(args: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(args, dict) or key not in args:
            return _MISSING
        args = args[key]
    return args


_MISSING = object()


def overridden_flags(settings: EngineSettings) -> list[str]:
    """One line per command-line flag whose value the ``--extra-engine-args`` YAML replaces."""
    source = settings.extra_source or "--extra-engine-args"
    lines = []
    for flag, path in FLAG_KEYS.items():
        if not settings.given(flag):
            continue
        value, from_yaml = getattr(settings, flag), _get(settings.extra or {}, path)
        if from_yaml is _MISSING or from_yaml == value:
            continue
        lines.append(
            f"--{flag.replace('_', '-')} {value} is overridden by {source}: {'.'.join(path)}: {from_yaml!r}"
        )
    return lines


def build_llm_args(
    settings: EngineSettings, model: str, model_max_seq_len: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Flags, then ``settings.extra`` (the YAML) on top. Returns ``(llm_kwargs, warnings)``.

    Raises ``EngineArgsError`` naming the key and ``settings.extra_source`` for a wrong type, a ``model`` key,
    or a YAML that switches off what ``settings.role`` needs.
    """
    source = settings.extra_source or "--extra-engine-args"
    extra = settings.extra or {}
    if not isinstance(extra, dict):
        raise EngineArgsError(f"{source}: must be a mapping of engine argument names to values")
    warnings = check_engine_args(extra, TRTLLM_SCHEMA, source=source)
    if "model" in extra:
        raise EngineArgsError(f"{source}: 'model' cannot be set here; use --model-path")
    args = deep_merge(flag_args(settings, model, model_max_seq_len), extra)
    if settings.role in DISAGGREGATED_ROLES and args.get("cache_transceiver_config") is None:
        raise EngineArgsError(
            f"{source}: cache_transceiver_config is null, but --mode {settings.role} needs it to move the KV"
        )
    if settings.role == Role.PREFILL and args.get("disable_overlap_scheduler") is False:
        warnings.append(
            f"{source}: disable_overlap_scheduler is false on a prefill worker; TensorRT-LLM's context "
            "servers do not support the overlap scheduler"
        )
    for key in ("tensor_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len"):
        value = args.get(key)
        if value is not None and value < 1:
            raise EngineArgsError(f"{key} must be at least 1, got {value}")
    return args, warnings


def describe_sources(settings: EngineSettings, args: dict[str, Any]) -> str:
    """One log line: each top-level key with where its value came from (flag or the YAML file)."""
    extra = settings.extra or {}
    source = settings.extra_source or "yaml"
    parts = [f"{k}={args[k]!r} [{source if k in extra else 'flag'}]" for k in sorted(args)]
    return ", ".join(parts)

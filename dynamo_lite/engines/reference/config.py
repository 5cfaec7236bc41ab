"""The reference engine's settings: worker flags (``EngineSettings``) with the YAML's keys merged on top."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dynamo_lite.engines.base import QUANTIZATIONS, EngineSettings
from dynamo_lite.engines.engine_args import Choice, EngineArgsError, Schema, check_engine_args
from dynamo_lite.engines.reference.cpu_capability import CpuCapability, choose_dtype
from dynamo_lite.engines.reference.ranks import ParallelPlan
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.protocol import Role

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DTYPES |= {"float16": "float16", "fp16": "float16", "half": "float16"}
KV_FAILURE_POLICIES = ("recompute", "fail")
LOAD_FORMATS = ("auto", "dummy")


class ConfigError(ValueError):
    pass


_E = EngineSettings()  # the worker flags' defaults; the knobs only this engine has are stated below


@dataclass(slots=True)
class ReferenceConfig:
    """Everything the torch engine is built from, validated."""

    role: Role = Role.AGGREGATED
    model_path: str | None = None
    # "auto": what the device computes natively (``cpu_capability``); ``validate`` resolves it to a dtype.
    dtype: str = _E.dtype
    # "int8" / "int4": weight-only int8 (per-channel scales) / int4 (groups of 32) linears, CPU, in a model of
    # ``dtype`` float32 or bfloat16: a quarter / an eighth of fp32's bytes a decode token reads, for memory-bound
    # single-stream decode. Outputs differ slightly from the unquantized model. "mxfp4": gpt-oss experts stay in
    # the checkpoint's MXFP4 (Triton kernels on CUDA; routed experts dequantized per step elsewhere). "auto": the
    # checkpoint's own precision where it runs here (CPU with ``dtype: auto``: a 4-bit GGUF's int4, see
    # ``loader.checkpoint_quantization``; CUDA: MXFP4 gpt-oss experts), resolved by the engine once it knows the
    # model; otherwise "none".
    quantization: str = _E.quantization
    # "dummy": random weights made on the device from a fixed seed instead of reading the folder's safetensors
    # (gpt-oss models): benchmarks of a real shape whose checkpoint is not on the machine. Every process draws the
    # same weights, so prefill and decode workers agree.
    load_format: str = "auto"
    # Unix socket of a weights holder (``python -m dynamo_lite.engines.reference.shared_weights``) on this
    # engine's device: map its copy of the weights instead of loading one, so the workers on one GPU hold one
    # copy. Empty: load our own. The engine waits up to ``shared_weights_timeout_s`` for the holder to be ready.
    shared_weights: str = _E.shared_weights
    shared_weights_timeout_s: float = 600.0
    device: str = _E.device
    threads: int = _E.threads  # torch threads of the engine thread; 0: the library default
    # Up to this many threads for a prefill step while no other engine of this process has work: all of them or
    # one less as measured (``cores``); 0, or not above ``threads``: ``threads`` always.
    alone_threads: int = _E.alone_threads
    max_batch_size: int = _E.max_batch_size  # KV cache slots = sequences decoding together
    max_num_tokens: int = _E.max_num_tokens  # tokens fed per step (decode tokens + prefill chunks)
    max_seq_len: int = _E.max_seq_len  # prompt + generated, per sequence (the cache's length per slot)
    kv_failure_policy: str = _E.kv_failure_policy
    warmup: bool = True  # run one short forward in start(): the first one is several times slower
    # CUDA: the KV cache takes this share of what is free after loading
    free_gpu_memory_fraction: float = _E.free_gpu_memory_fraction
    cuda_graphs: bool = True  # CUDA: replay decode-only steps from captured graphs
    # Fault injection for tests: wait this long before pulling a prefill's KV (so a test can kill the prefill
    # worker in between). Never set in production configs.
    fault_kv_pull_delay_s: float = 0.0
    stop_timeout_s: float = 30.0  # how long stop() waits for the engine thread to finish its step
    # Prefix caching: a freed slot keeps its KV; a prompt starting with the same blocks reuses it (and the worker
    # publishes KV events for the kv router). Off by default: reused KV was computed in another batch shape, so
    # fp32 outputs are no longer bit-comparable with a fresh computation.
    enable_prefix_caching: bool = False
    kv_block_size: int = _E.kv_block_size
    kv: KvTransferConfig | None = None  # None: built from the kv_* settings
    # Ranks (``ranks.py``): N processes over torch.distributed; experts split M ways (M divides N); attention
    # split by heads, or by sequences with ``enable_attention_dp`` (the seed's decode YAML).
    tensor_parallel_size: int = _E.tensor_parallel_size
    expert_parallel_size: int = _E.expert_parallel_size
    enable_attention_dp: bool = False
    rank_timeout_s: float = 60.0  # ranks joining, and any one collective; a dead peer is noticed at once

    def kv_config(self) -> KvTransferConfig:
        return self.kv or KvTransferConfig()

    def parallel_plan(self) -> ParallelPlan:
        return ParallelPlan(self.tensor_parallel_size, self.expert_parallel_size, self.enable_attention_dp)


_DEFAULTS = ReferenceConfig()

# The YAML keys this engine understands: its own knobs, and worker settings a YAML may override.
SCHEMA: Schema = {
    "model_path": str,
    "dtype": Choice(*DTYPES),
    "quantization": Choice(*QUANTIZATIONS),
    "load_format": Choice(*LOAD_FORMATS),
    "shared_weights": str,
    "shared_weights_timeout_s": float,
    "device": str,
    "threads": int,
    "alone_threads": int,
    "max_batch_size": int,
    "max_num_tokens": int,
    "max_seq_len": int,
    "kv_failure_policy": Choice(*KV_FAILURE_POLICIES),
    "warmup": bool,
    "free_gpu_memory_fraction": float,
    "cuda_graphs": bool,
    "kv_bind_host": str,
    "kv_advertise_host": str,
    "kv_port": int,
    "kv_lease_s": float,
    "kv_pull_timeout_s": float,
    "kv_use_shm": bool,
    "kv_use_cuda_ipc": bool,
    "kv_cuda_pool_bytes": int,
    "fault_kv_pull_delay_s": float,
    "enable_prefix_caching": bool,
    "kv_block_size": int,
    # The TensorRT-LLM YAMLs' parallel settings, which the torch engine honours with its own ranks.
    "tensor_parallel_size": int,
    "moe_expert_parallel_size": int,
    "enable_attention_dp": bool,
}


def from_settings(settings: EngineSettings, cpu: CpuCapability | None = None) -> ReferenceConfig:
    """Build the config: ``settings`` fields, overridden by ``settings.extra`` (the merged YAML).

    A value of the wrong type is an error naming the key and the file; an unknown key is a warning (a YAML
    may carry keys for another engine). ``cpu``: the CPU ``dtype: auto`` is chosen for (None: this one).
    """
    source = settings.extra_source or "extra engine args"
    extra = dict(settings.extra or {})
    try:
        for line in check_engine_args(extra, SCHEMA, source=source):
            log.warning("torch engine: %s", line.replace("passed to the engine as is", "ignored"))
    except EngineArgsError as e:
        raise ConfigError(str(e)) from e

    def pick(key: str, default: Any) -> Any:
        value = extra.get(key)
        return default if value is None else value

    cfg = ReferenceConfig(
        role=Role(settings.role),
        model_path=pick("model_path", settings.model_path),
        dtype=pick("dtype", settings.dtype),
        quantization=pick("quantization", settings.quantization),
        load_format=pick("load_format", _DEFAULTS.load_format),
        shared_weights=pick("shared_weights", settings.shared_weights),
        shared_weights_timeout_s=float(pick("shared_weights_timeout_s", _DEFAULTS.shared_weights_timeout_s)),
        device=pick("device", settings.device),
        threads=pick("threads", settings.threads),
        alone_threads=pick("alone_threads", settings.alone_threads),
        max_batch_size=pick("max_batch_size", settings.max_batch_size),
        max_num_tokens=pick("max_num_tokens", settings.max_num_tokens),
        max_seq_len=pick("max_seq_len", settings.max_seq_len),
        kv_failure_policy=pick("kv_failure_policy", settings.kv_failure_policy),
        warmup=pick("warmup", _DEFAULTS.warmup),
        free_gpu_memory_fraction=float(pick("free_gpu_memory_fraction", settings.free_gpu_memory_fraction)),
        cuda_graphs=pick("cuda_graphs", _DEFAULTS.cuda_graphs),
        fault_kv_pull_delay_s=float(pick("fault_kv_pull_delay_s", _DEFAULTS.fault_kv_pull_delay_s)),
        enable_prefix_caching=bool(pick("enable_prefix_caching", _DEFAULTS.enable_prefix_caching)),
        kv_block_size=int(pick("kv_block_size", settings.kv_block_size)),
    )
    cfg.tensor_parallel_size, cfg.expert_parallel_size = parallel_sizes(settings)
    cfg.enable_attention_dp = bool(pick("enable_attention_dp", settings.enable_attention_dp))
    defaults = KvTransferConfig()
    cfg.kv = KvTransferConfig(
        bind_host=pick("kv_bind_host", settings.kv_bind_host),
        advertise_host=pick("kv_advertise_host", settings.kv_advertise_host) or "",
        port=pick("kv_port", settings.kv_port),
        lease_s=float(pick("kv_lease_s", settings.kv_lease_s)),
        pull_timeout_s=float(pick("kv_pull_timeout_s", defaults.pull_timeout_s)),
        use_shm=pick("kv_use_shm", defaults.use_shm),
        use_cuda_ipc=pick("kv_use_cuda_ipc", defaults.use_cuda_ipc),
        cuda_pool_bytes=pick("kv_cuda_pool_bytes", defaults.cuda_pool_bytes),
    )
    return validate(cfg, source, cpu)


def parallel_sizes(settings: EngineSettings) -> tuple[int, int]:
    """``(tensor, expert)`` parallel sizes from the flags, the YAML's keys overriding; ``ConfigError`` naming the
    flag or key when they can't work (not positive, or experts split in a way the ranks can't hold). Checked
    before the worker asks any service: the model's own shape is checked when the engine is built."""
    extra = settings.extra or {}
    source = settings.extra_source or "extra engine args"
    sizes = []
    for flag, key, value in (
        ("--tensor-parallel-size", "tensor_parallel_size", settings.tensor_parallel_size),
        ("--expert-parallel-size", "moe_expert_parallel_size", settings.expert_parallel_size),
    ):
        value = extra.get(key, value)
        if value is None:
            value = 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{flag if key not in extra else f'{key} in {source}'} {value}: must be a positive integer"
            )
        sizes.append(value)
    tp, ep = sizes
    if tp % ep:
        raise ConfigError(f"expert parallel size {ep} must divide the tensor parallel size {tp}")
    return tp, ep


def validate(
    cfg: ReferenceConfig, source: str = "engine settings", cpu: CpuCapability | None = None
) -> ReferenceConfig:
    """Check every field and resolve ``dtype: auto`` (for ``cpu``; None: this machine's), warning once about an
    explicit dtype the CPU emulates."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    dtype = DTYPES.get(str(cfg.dtype).lower().removeprefix("torch."))
    if dtype is None:
        raise bad(f"dtype {cfg.dtype!r} is not one of {sorted(set(DTYPES.values()))}")
    cfg.device = str(cfg.device)
    if cfg.device.split(":")[0] not in ("cpu", "cuda"):
        raise bad(f"device {cfg.device!r} is not cpu or cuda[:N]")
    choice = choose_dtype(dtype, cfg.device, cpu)
    if choice.warning:
        log.warning("torch engine: %s", choice.warning)
    elif dtype == "auto":
        log.info("torch engine: dtype %s (%s)", choice.dtype, choice.reason)
    cfg.dtype = choice.dtype
    cfg.quantization = str(cfg.quantization or "none").lower()
    if cfg.quantization not in QUANTIZATIONS:
        raise bad(f"quantization {cfg.quantization!r} is not one of {QUANTIZATIONS}")
    if cfg.quantization == "auto" and dtype != "auto" and cfg.device == "cpu":
        # An explicit dtype on a CPU asks for the dequantized model in that dtype (fp32: transformers' numbers).
        cfg.quantization = "none"
    if cfg.quantization == "mxfp4" and cfg.dtype == "float16":
        raise bad("quantization mxfp4 computes in bfloat16 (CUDA) or float32/bfloat16 (cpu), not float16")
    if cfg.quantization in ("int8", "int4") and (
        cfg.device != "cpu" or cfg.dtype not in ("float32", "bfloat16")
    ):
        raise bad(
            f"quantization {cfg.quantization} (weight-only) runs on device cpu with dtype float32 or bfloat16 "
            f"(auto picks the one this CPU computes natively), not {cfg.dtype} on {cfg.device}"
        )
    cfg.load_format = str(cfg.load_format or "auto").lower()
    if cfg.load_format not in LOAD_FORMATS:
        raise bad(f"load_format {cfg.load_format!r} is not one of {LOAD_FORMATS}")
    if cfg.kv_failure_policy not in KV_FAILURE_POLICIES:
        raise bad(f"kv_failure_policy {cfg.kv_failure_policy!r} is not one of {KV_FAILURE_POLICIES}")
    for name in ("threads", "alone_threads", "max_batch_size", "max_num_tokens", "max_seq_len"):
        value = getattr(cfg, name)
        counts = name.endswith("threads")  # 0 allowed
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if counts else 1):
            raise bad(f"{name} must be a {'non-negative' if counts else 'positive'} integer")
    if cfg.max_seq_len < 2:
        raise bad("max_seq_len must be at least 2")
    cfg.warmup = bool(cfg.warmup)
    cfg.cuda_graphs = bool(cfg.cuda_graphs)
    if not 0.0 < float(cfg.free_gpu_memory_fraction) <= 1.0:
        raise bad(f"free_gpu_memory_fraction must be in (0, 1], got {cfg.free_gpu_memory_fraction}")
    return cfg

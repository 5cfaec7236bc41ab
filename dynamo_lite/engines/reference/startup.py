"""What the torch engine's thread builds before its first step: the model (llama-family or gpt-oss weights,
quantized or dense, with the Triton decode attention where it runs and agrees), the CUDA KV pool of a prefill
worker, the KV cache sized to memory, CUDA decode graphs, the scheduler — and the warmup step.

The step loop that runs on them is ``engine.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from dynamo_lite.engines.base import EngineError
from dynamo_lite.engines.reference import decode_attention, prefill_attention
from dynamo_lite.engines.reference.collectives import ONE_RANK, HeadParallel, SequenceParallel
from dynamo_lite.engines.reference.config import ReferenceConfig
from dynamo_lite.engines.reference.cpu_capability import detect_cpu
from dynamo_lite.engines.reference.cuda_graphs import DecodeGraphs
from dynamo_lite.engines.reference.gpt_oss_loader import (
    GptOssConfig,
    load_gpt_oss_weights,
    random_gpt_oss_weights,
)
from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
from dynamo_lite.engines.reference.kv_cache import KvCache, slot_nbytes
from dynamo_lite.engines.reference.linear import int4_supported, int8_supported
from dynamo_lite.engines.reference.loader import checkpoint_quantization, load_weights
from dynamo_lite.engines.reference.model import LlamaModel
from dynamo_lite.engines.reference.moe_mxfp4 import prefill_token_classes
from dynamo_lite.engines.reference.rank_comm import RankComm
from dynamo_lite.engines.reference.rank_runner import LocalRunner, RankDriver, RankState, Runner
from dynamo_lite.engines.reference.ranks import ParallelPlan, check_divides, shard_for, sharded_nbytes
from dynamo_lite.engines.reference.scheduler import Scheduler
from dynamo_lite.kv import KvExporter, KvTransferConfig
from dynamo_lite.kv.cuda_ipc import CudaKvPool
from dynamo_lite.model_files import ModelFiles, ensure_weights

log = logging.getLogger(__name__)

WARM_PREFILL_TOKENS = 4096  # a long prompt CUDA's warmup prefills (plus one length per class of expert tiles)
WARM_PREFILL_DEVICES = ("cuda",)  # where prompt-sized steps compile kernels of their own on first use

# Largest relative error of a Triton attention kernel (decode, and gpt-oss's prefill; checked at load) against
# its torch reference that we accept: fp32 lands near 1e-7, bf16/fp16 near 1e-3 (the output's own rounding).
_DECODE_ATTENTION_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def warm_prefill_lengths(limit: int, num_experts: int = 0, top_k: int = 0) -> list[int]:
    """The prompt lengths CUDA's warmup prefills (at most ``limit`` tokens each): ``WARM_PREFILL_TOKENS``, and for
    routed experts one length per class of expert tiles (``moe_mxfp4.prefill_token_classes``)."""
    wanted = {WARM_PREFILL_TOKENS}
    if num_experts:
        wanted.update(prefill_token_classes(num_experts, top_k))
    return sorted({min(n, limit) for n in wanted if min(n, limit) > 8})


def resolve_quantization(config: ReferenceConfig, model_files: ModelFiles, model_config: Any) -> None:
    """``quantization: auto`` → the checkpoint's own precision where a kernel for it runs here (gpt-oss on CUDA:
    MXFP4 experts; a CPU: the checkpoint's int4/int8, if this torch has the kernel), else "none"; set on
    ``config``."""
    gpt_oss = isinstance(model_config, GptOssConfig)
    if config.quantization == "auto" and gpt_oss:  # MXFP4 experts stay packed where the kernels run
        cuda = config.device.startswith("cuda")
        config.quantization = "mxfp4" if cuda and model_config.mxfp4 else "none"
        log.info("torch engine: %s experts (auto: the checkpoint's precision)",
                 "MXFP4" if config.quantization == "mxfp4" else "dense")  # fmt: skip
    elif config.quantization == "auto" and not config.device.startswith("cpu"):
        config.quantization = "none"  # the weight-only int8/int4 kernels are the CPU's
    elif config.quantization == "auto":  # dtype auto on a CPU: the checkpoint's own weight precision
        config.quantization = checkpoint_quantization(model_files)
        kernel = {"int4": int4_supported, "int8": int8_supported}.get(config.quantization)
        if kernel is not None and not kernel():  # a torch build without it: the same weights, dense
            log.info(
                "torch engine: no weight-only %s kernel in this torch; dense weights", config.quantization
            )
            config.quantization = "none"
        log.info("torch engine: %s weights (auto: the checkpoint's precision)", config.quantization)


def build_weights(
    config: ReferenceConfig,
    model_files: ModelFiles,
    model_config: Any,
    dtype: torch.dtype,
    device: torch.device,
    shard: Any = None,
) -> Any:
    """The model's weights as ``config`` asks for them (read from the folder, or random with ``load_format:
    dummy``): what the engine computes with, and what a weights holder serves; with ``shard`` (a
    ``ranks.RankShard``) only this rank's share is read."""
    quantization = config.quantization
    if isinstance(model_config, GptOssConfig):
        if quantization not in ("none", "mxfp4"):
            raise EngineError(f"quantization {quantization} is for llama-family models", status=400)
        mxfp4 = quantization == "mxfp4"
        if config.load_format == "dummy":
            if shard is not None:  # its generators draw whole tensors: every rank would make all of them
                raise EngineError(
                    "load_format dummy runs on one rank (read a checkpoint for ranks)", status=400
                )
            return random_gpt_oss_weights(model_config, dtype, device, mxfp4=mxfp4)
        folder = ensure_weights(model_files).folder
        return load_gpt_oss_weights(folder, model_config, dtype, device, mxfp4=mxfp4, shard=shard)
    if quantization == "mxfp4":
        raise EngineError("quantization mxfp4 is for gpt-oss checkpoints with MXFP4 experts", status=400)
    if config.load_format == "dummy":
        raise EngineError("load_format dummy (random weights) is for gpt_oss models", status=400)
    return load_weights(ensure_weights(model_files).folder, model_config, dtype, device, shard=shard)


def weights_fingerprint_of(config: ReferenceConfig, model_files: ModelFiles, model_config: Any) -> str:
    """What a weights holder and a worker must agree on (``shared_weights.weights_fingerprint``)."""
    from dynamo_lite.engines.reference.shared_weights import weights_fingerprint

    return weights_fingerprint(
        model_config, model_files.folder.name, config.dtype, config.quantization, config.load_format
    )


class EngineSetup:
    """Builds, on the engine thread, what the step loop runs on (see the module docstring)."""

    def __init__(
        self,
        config: ReferenceConfig,
        model_files: ModelFiles,
        model_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_seq_len: int,
        kv_config: KvTransferConfig,
        exporter: KvExporter | None,
        on_kv_event: Callable[[tuple[int, list[int]]], None],
        plan: ParallelPlan | None = None,
        comms: tuple[RankComm, RankComm] | None = None,
    ) -> None:
        self.config = config
        self.model_files = model_files
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.kv_config = kv_config
        self.exporter = exporter  # a prefill worker's: on CUDA its holds go into ``pool``
        self.on_kv_event = on_kv_event  # prefix caching's events
        self.model: LlamaModel | GptOssModel | None = None
        self.cache: KvCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.pool: CudaKvPool | None = None
        self.scheduler: Scheduler | None = None
        self.plan = plan or ParallelPlan()
        self.comms = comms  # (control, data) of this rank when ranked
        self.state: RankState | None = None  # this rank's share of every command (ranked)
        self.runner: Runner | None = None  # what the engine thread steps through (rank 0)
        self.shared: Any = None  # the weights holder's connection (``shared_weights``)

    def load(self) -> None:
        """Weights, CUDA KV pool (prefill workers on CUDA), KV cache, decode graphs (captured by ``warmup``) and
        scheduler: each an attribute as soon as it exists (what ``stop`` must free is known on a failure too)."""
        started = time.perf_counter()
        self.model = self._build_model()
        cfg = self.model_config
        if self.exporter is not None and self.device.type == "cuda" and self.kv_config.use_cuda_ipc:
            self._make_pool()
        model = self.model
        graph_safe = (
            model.graph_safe if isinstance(model, GptOssModel) else model.decode_attention is not None
        )
        # Ranks run eagerly: a captured step could not take part in the collectives of another rank's step.
        use_graphs = (
            self.device.type == "cuda" and self.config.cuda_graphs and graph_safe and not self.plan.ranked
        )
        if self.device.type == "cuda" and self.config.cuda_graphs and not graph_safe:
            log.warning("decode steps run eagerly: no CUDA graphs without the Triton decode attention%s",
                        " and grouped expert products" if isinstance(model, GptOssModel) else "")  # fmt: skip
        self.cache = KvCache(
            cfg.num_layers,
            self.model.config.num_kv_heads,  # this rank's
            cfg.head_dim,
            self._slots(extra=1 if use_graphs else 0),
            self.max_seq_len,
            self.dtype,
            self.device,
            cfg.layer_windows,
        )
        if use_graphs:  # a slot never given out: padded graph rows write there
            self.graphs = DecodeGraphs(self.model, self.cache, self.cache.allocate(), self.cache.free_slots)
        if self.config.enable_prefix_caching and self.plan.ranked:
            log.warning("prefix caching is off: not implemented across ranks")
        elif self.config.enable_prefix_caching and self.cache.windowed_layers:
            # A freed slot's window layers hold only their last positions, not a reusable prefix.
            log.warning("prefix caching is off: this model has sliding-window layers")
        elif self.config.enable_prefix_caching:
            self.cache.prefix_block = self.config.kv_block_size
            self.cache.on_kv_event = self.on_kv_event
        if self.plan.ranked:
            assert self.comms is not None
            control, data = self.comms
            shards = [shard_for(cfg, self.plan.for_rank(r)) for r in range(self.plan.size)]
            self.state = RankState(self.plan, self.model, self.cache, data, shards, self.device, control)
            self.state.gather_weight_bytes(
                control, sharded_nbytes(self.model.weights, attention=not self.plan.attention_dp)
            )
            if self.plan.rank == 0:
                log.info(
                    "torch engine: %s; sharded weights per rank %s MiB",
                    self.plan.describe(),
                    [round(b / 2**20, 1) for b in self.state.weight_bytes],
                )
            self.runner = RankDriver(self.state, control, cfg.num_kv_heads)
        else:
            self.runner = LocalRunner(self.model, self.cache, self.device)
        self.scheduler = Scheduler(self.runner.slots, self.config.max_num_tokens)
        log.info(
            "torch engine: %s loaded in %.1f s (%s%s, %s, %d slots x %d tokens, KV cache %.0f MiB virtual)",
            self.model_files.folder.name,
            time.perf_counter() - started,
            self.config.dtype,
            "" if self.config.quantization == "none" else f", {self.config.quantization} weights",
            self.device if self.device.type != "cpu" else f"cpu {detect_cpu().describe()}",
            self.cache.free_slots,
            self.max_seq_len,
            self.cache.nbytes / 2**20,
        )

    def _build_model(self) -> LlamaModel | GptOssModel:
        """The weights (read, random with ``load_format: dummy``, or mapped from a weights holder with
        ``shared_weights``) and the forward pass of the architecture; ranked, this rank's shard of them, the model
        told its own number of heads and how to exchange."""
        cfg = self.model_config
        shard, comm, local_cfg = None, ONE_RANK, cfg
        if self.plan.ranked:
            assert self.comms is not None
            if self.config.shared_weights:  # a holder serves whole tensors; a rank reads only its shard
                raise EngineError("shared_weights runs on one rank (ranks read their own shards)", status=400)
            check_divides(cfg, self.plan, mxfp4=self.config.quantization == "mxfp4")
            shard = shard_for(cfg, self.plan)
            local_cfg = dataclasses.replace(cfg, num_heads=shard.num_heads, num_kv_heads=shard.num_kv_heads)
            data = self.comms[1]
            comm = SequenceParallel(data) if self.plan.attention_dp else HeadParallel(data)
        if self.config.shared_weights:
            weights = self._attach_weights()
        else:
            weights = build_weights(self.config, self.model_files, cfg, self.dtype, self.device, shard)
        if isinstance(cfg, GptOssConfig):
            first_expert = shard.experts[0] if shard is not None else 0
            model = GptOssModel(
                local_cfg,
                weights,
                self.max_seq_len,
                self._decode_attention(),
                comm,
                first_expert,
                prefill_attention=self._prefill_attention(),
            )
            log.info("torch engine: gpt-oss experts run as %s", model.moe_impl)
            log.info(
                "torch engine: gpt-oss prefill attention runs as %s",
                "triton flash" if model.prefill_attention is not None else "eager (chunked scores)",
            )
            return model
        return LlamaModel(
            local_cfg, weights, self.max_seq_len, self._decode_attention(), self.config.quantization, comm
        )

    def _attach_weights(self) -> Any:
        """Map the weights holder's copy (``shared_weights``): no copy of our own; we exit if it dies."""
        from dynamo_lite.engines.reference.shared_weights import SharedWeightsError, attach

        if self.config.quantization not in ("none", "mxfp4"):
            raise EngineError(
                f"shared_weights: {self.config.quantization} weights are re-quantized per process; share "
                "unquantized (or mxfp4 gpt-oss) weights",
                status=400,
            )
        try:
            self.shared = attach(
                self.config.shared_weights,
                weights_fingerprint_of(self.config, self.model_files, self.model_config),
                self.device,
                role=str(self.config.role),
                timeout_s=self.config.shared_weights_timeout_s,
            )
        except SharedWeightsError as e:
            raise EngineError(str(e), status=503) from e
        self.shared.watch_owner()
        return self.shared.weights

    def _decode_attention(self) -> Any:
        """The Triton decode attention on CUDA, if it runs here and agrees with the reference; else None
        (SDPA over the slot range, and no CUDA graphs)."""
        cfg = self.model_config
        if not decode_attention.triton_supported(self.dtype, cfg.head_dim, self.device):
            if self.device.type == "cuda":
                log.warning("Triton decode attention unavailable: SDPA decode, no CUDA graphs")
            return None
        try:
            error = decode_attention.self_check(
                self.dtype,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                self.device,
                sinks=isinstance(cfg, GptOssConfig),
            )
        except Exception as e:
            log.warning("Triton decode attention failed (%s): SDPA decode, no CUDA graphs", e)
            return None
        if not error <= _DECODE_ATTENTION_TOLERANCE[self.dtype]:
            log.warning("Triton decode attention is off by %.2e: SDPA decode, no CUDA graphs", error)
            return None
        return decode_attention.decode_attention_triton

    def _prefill_attention(self) -> Any:
        """The Triton flash prefill attention (gpt-oss) on CUDA, if it runs here and agrees with the eager
        reference; else None (the eager attention, scores materialized per query block)."""
        cfg = self.model_config
        if not prefill_attention.triton_supported(self.dtype, cfg.head_dim, self.device):
            return None
        try:
            error = prefill_attention.self_check(
                self.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.device, cfg.sliding_window
            )
        except Exception as e:
            log.warning("Triton prefill attention failed (%s): eager prefill attention", e)
            return None
        if not error <= _DECODE_ATTENTION_TOLERANCE[self.dtype]:
            log.warning("Triton prefill attention is off by %.2e: eager prefill attention", error)
            return None
        return prefill_attention.prefill_attention_triton

    def _make_pool(self) -> None:
        assert self.exporter is not None
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:
            self.pool = CudaKvPool(index, self.kv_config.cuda_pool_bytes)
        except Exception as e:  # no runtime, out of memory: holds stay in host memory
            log.warning("no CUDA KV pool (%s): KV handoff through host memory", e)
            return
        self.exporter.use_cuda_pool(self.pool)

    def _slots(self, extra: int) -> int:
        """Slots of ``max_seq_len`` tokens: ``max_batch_size`` (+ ``extra``), and on CUDA no more than
        ``free_gpu_memory_fraction`` of the memory free now (weights and pool already allocated) holds."""
        wanted = self.config.max_batch_size + extra
        if self.device.type != "cuda":
            return wanted
        cfg = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        slot_bytes = slot_nbytes(
            cfg.layer_windows, cfg.num_kv_heads, cfg.head_dim, self.max_seq_len, itemsize
        )
        # Blocks the caching allocator kept from loading (the weights' conversions, chunk by chunk) count as used
        # to the driver: hand them back first, or the KV cache gets that much less.
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(free * self.config.free_gpu_memory_fraction) // slot_bytes
        if fits < 1 + extra:
            raise EngineError(
                f"KV cache: {self.config.free_gpu_memory_fraction:.0%} of {free / 2**30:.1f} GiB free holds no "
                f"slot of {self.max_seq_len} tokens ({slot_bytes / 2**20:.0f} MiB each)",
                status=503,
            )
        if fits < wanted:
            log.warning(
                "KV cache: memory for %d of %d sequences (max_batch_size)", fits - extra, wanted - extra
            )
        return min(wanted, fits)

    def warmup(self) -> None:
        """One short prefill and decode step in slot 0; the first forward is several times slower. On CUDA also
        prompt-sized prefills first (``_warm_long_prefills``)."""
        assert self.runner is not None
        slots = self.runner.slots
        slot = slots.allocate()
        try:
            if self.device.type in WARM_PREFILL_DEVICES:
                self._warm_long_prefills(slot)
            ids = list(range(1, 9))
            self.runner.forward([], [(slot, 0, ids)], [len(ids) - 1])
            eager = self.runner.forward([(slot, len(ids), 1)], [], [0])
            if self.graphs is not None:
                self._capture_graphs(slot, len(ids), eager)
        finally:
            slots.free(slot)

    def _warm_long_prefills(self, slot: int) -> None:
        """Prefill steps of prompts' sizes: such steps use Triton kernels of their own (the expert tiles for many
        rows per expert, the flash prefill attention) that the compiler builds on first use; without this the
        first prompts served wait seconds for it. One step per kernel variant (``warm_prefill_lengths``)."""
        assert self.runner is not None
        cfg = self.model_config
        experts = (cfg.num_experts, cfg.experts_per_token) if isinstance(self.model, GptOssModel) else (0, 0)
        limit = min(self.config.max_num_tokens, self.max_seq_len - 1)
        lengths = warm_prefill_lengths(limit, *experts)
        started = time.perf_counter()
        for n in lengths:
            self.runner.forward([], [(slot, 0, list(range(1, n + 1)))], [n - 1])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info(
            "prefill kernels warmed (steps of %s tokens) in %.1f s", lengths, time.perf_counter() - started
        )

    def _capture_graphs(self, slot: int, position: int, eager: torch.Tensor) -> None:
        """Capture the decode graphs and check one replay against the eager step it replaces."""
        assert self.graphs is not None
        try:
            self.graphs.capture()
            replayed = self.graphs.run([(slot, position, 1)])
            error = float((replayed - eager).norm() / eager.norm())
        except Exception as e:
            log.warning("CUDA graph capture failed (%s): eager decode", e)
            self.graphs = None
            return
        if not error < 1e-3:
            log.warning("CUDA graph replay differs from the eager step by %.2e: eager decode", error)
            self.graphs = None

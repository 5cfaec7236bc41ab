"""The llama.cpp engine (``--engine llamacpp``): the torch engine's scheduler, sampling, logprobs, grammars and
KV handoff around llama.cpp's forward pass, for GGUF models.

``TorchEngine`` runs a step as ``runner.forward(decode rows, prefill chunks, rows to sample)`` → logits, then
samples on torch tensors; its KV moves through ``runner.read_kv``/``write_kv``. Here the runner is llama.cpp:
one context whose sequences are the scheduler's slots (a unified cache with room for every slot's
``max_seq_len``), one ``llama_decode`` per step over every decoding sequence and prefill chunk (continuous
batching as llama-server does it), and a sequence's KV exported with ``llama_state_seq_get_data`` and imported
with ``llama_state_seq_set_data`` (``kv_state`` converts to the handoff's layout). So a llamacpp prefill worker
hands its KV to a llamacpp decode worker over the same exporter and transports as the torch engine.

What differs from ``--engine torch``: the weights are the GGUF's as they are (e.g. SmolLM2's Q4_1 layers and
Q8_0 embedding, computed by llama.cpp's kernels); the KV is llama.cpp's F16; no prefix caching, ranks or CUDA.
Logprobs are of llama.cpp's logits; grammars, penalties and sampling are the torch engine's code.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

import numpy as np
import torch

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.llamacpp.kv_state import KvStateError, build, parse
from dynamo_lite.engines.llamacpp.library import ContextShape, LlamaCpp, default_threads
from dynamo_lite.engines.reference.config import ConfigError, ReferenceConfig, from_settings
from dynamo_lite.engines.reference.engine import TorchEngine
from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig
from dynamo_lite.engines.reference.kv_cache import NoFreeSlot
from dynamo_lite.engines.reference.scheduler import Scheduler
from dynamo_lite.model_files import ModelFiles
from dynamo_lite.protocol import EngineKind

log = logging.getLogger(__name__)

# Keys of --extra-engine-args only this engine reads (the rest are the torch engine's).
FLASH_ATTN_KEY = "flash_attn"
FLASH_ATTN_DEFAULT = True  # llama.cpp's faster setting for short contexts on CPU (benchmarks/README.md)
ADAPTIVE_THREADS_KEY = "adaptive_threads"
# Each step on all cores or one less, whichever measures faster (``threads``; benchmarks/README.md).
ADAPTIVE_THREADS_DEFAULT = True
# Models whose GGUF holds Q/K permuted for llama.cpp's interleaved RoPE (``kv_state``).
K_PERMUTED_MODEL_TYPES = ("llama", "mistral")


class SeqSlots:
    """The scheduler's slots are llama.cpp sequence ids; freeing one drops its KV cells."""

    def __init__(self, lib: LlamaCpp, n_seq: int, max_seq_len: int) -> None:
        self._lib = lib
        self.max_slots = n_seq
        self.max_seq_len = max_seq_len
        self._free = list(range(n_seq - 1, -1, -1))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise NoFreeSlot("all sequences are in use")
        return self._free.pop()

    def allocate_for(self, tokens: list[int] | None) -> tuple[int, int]:
        return self.allocate(), 0  # no prefix caching

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        if not 0 <= slot < self.max_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._lib.drop(slot)
        self._free.append(slot)


class LlamaCppRunner:
    """``rank_runner.Runner`` over llama.cpp: a step is one ``llama_decode``."""

    def __init__(self, lib: LlamaCpp, slots: SeqSlots, model_config: Any, k_permuted: bool) -> None:
        self.lib = lib
        self.slots = slots
        self._shape = (model_config.num_layers, model_config.num_kv_heads, model_config.head_dim)
        self._k_permuted = k_permuted
        self._v_trans = not lib.shape.flash_attn  # llama.cpp keeps V transposed without flash attention

    def forward(
        self,
        decode: list[tuple[int, int, int]],
        prefill: list[tuple[int, int, list[int]]],
        sample_rows: list[int],
    ) -> torch.Tensor:
        """Logits of ``sample_rows`` (flat rows: decode rows, then each prefill chunk's), in that order."""
        n = len(decode) + sum(len(t) for _, _, t in prefill)
        tokens = np.empty(n, np.int32)
        positions = np.empty(n, np.int32)
        seqs = np.empty(n, np.int32)
        d = len(decode)
        if d:
            seqs[:d], positions[:d], tokens[:d] = zip(*decode, strict=True)
        row = d
        for slot, start, chunk in prefill:
            k = len(chunk)
            tokens[row : row + k] = chunk
            positions[row : row + k] = np.arange(start, start + k)
            seqs[row : row + k] = slot
            row += k
        want = np.zeros(n, np.int8)
        want[sample_rows] = 1
        logits = self.lib.decode(tokens, positions, seqs, want)  # the wanted rows, ascending
        if all(a < b for a, b in itertools.pairwise(sample_rows)):
            return torch.from_numpy(logits)  # the common case, no copy: used before the next decode
        rank = {r: i for i, r in enumerate(sorted(set(sample_rows)))}
        return torch.from_numpy(logits[[rank[r] for r in sample_rows]])

    def read_kv(self, slot: int, hold: Any) -> None:
        """Sequence ``slot``'s KV into the exporter's ``hold`` (its layout's one full-attention part)."""
        kv = parse(self.lib.state_of(slot), *self._shape, k_permuted=self._k_permuted)
        out, num_tokens = hold.tensors(), hold.layout.num_tokens
        if kv.shape[3] != num_tokens or len(out) != 1:
            raise KvStateError(f"{kv.shape[3]} positions in llama.cpp's KV, {num_tokens} expected")
        out[0].copy_(torch.from_numpy(kv))

    def write_kv(self, slot: int, pulled: Any) -> None:
        parts = pulled.tensors()
        if len(parts) != 1:
            raise KvStateError("KV with sliding-window layers: not a llama-family model's")
        kv = parts[0].to(torch.float16).numpy()
        self.lib.set_state(slot, build(kv, slot, self._v_trans, self._k_permuted))

    def close(self) -> None:
        self.lib.close()


class LlamaCppEngine(TorchEngine):
    """``--engine llamacpp``: a GGUF model run by llama.cpp, served like ``--engine torch``."""

    name = EngineKind.LLAMACPP

    def __init__(self, config: ReferenceConfig, model_files: ModelFiles, options: LlamaCppOptions) -> None:
        if model_files.gguf_path is None:
            raise ConfigError(f"--engine llamacpp serves GGUF models; {model_files.folder} has none")
        super().__init__(config, model_files)
        if isinstance(self.model_config, GptOssConfig):
            raise ConfigError(
                "--engine llamacpp serves llama-family GGUFs (gpt-oss: --engine torch or trtllm)"
            )
        self.kv_dtype = "float16"  # llama.cpp's cache type
        # llama.cpp picks its own threads per step (``StepThreads`` in ``library``); torch here only samples
        self._borrow = None
        self.flash_attn = options.flash_attn
        self.adaptive_threads = options.adaptive_threads
        self._k_permuted = model_files.model_type in K_PERMUTED_MODEL_TYPES
        self._lib: LlamaCpp | None = None

    def _load(self) -> None:
        """The GGUF into llama.cpp, a context with a sequence per slot, the runner and the scheduler."""
        cfg, conf = self.model_config, self.config
        torch.set_num_threads(1)  # torch only samples here: the cores are llama.cpp's
        if conf.enable_prefix_caching:
            log.warning("llamacpp engine: prefix caching is not implemented; off")
        started = time.perf_counter()
        shape = ContextShape(
            threads=conf.threads or default_threads(),
            n_seq=conf.max_batch_size,
            n_ctx=conf.max_batch_size * self.max_seq_len,  # every slot may fill its max_seq_len
            n_batch=conf.max_num_tokens + conf.max_batch_size,  # a step: prefill budget + decode rows
            flash_attn=self.flash_attn,
            adaptive_threads=self.adaptive_threads,
        )
        assert self.model_files.gguf_path is not None
        self._lib = lib = LlamaCpp(str(self.model_files.gguf_path), shape)
        if (lib.n_layer, lib.n_head_kv, lib.n_vocab) != (cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size):
            lib.close()
            raise EngineError(
                f"llama.cpp reads {lib.n_layer} layers, {lib.n_head_kv} KV heads, {lib.n_vocab} tokens; the "
                f"model's config says {cfg.num_layers}, {cfg.num_kv_heads}, {cfg.vocab_size}"
            )
        slots = SeqSlots(lib, shape.n_seq, self.max_seq_len)
        self._runner = LlamaCppRunner(lib, slots, cfg, self._k_permuted)
        self._scheduler = Scheduler(slots, conf.max_num_tokens)
        if conf.warmup:  # the first decode allocates llama.cpp's compute buffers
            self._runner.forward([], [(0, 0, [1, 2, 3, 4])], [3])
            lib.drop(0)
        log.info(
            "llamacpp engine: %s loaded in %.1f s (%d threads%s, %d sequences x %d tokens, F16 KV %.0f MiB, "
            "flash attention %s): %s",
            self.model_files.gguf_path.name,
            time.perf_counter() - started,
            shape.threads,
            " or one less per step, as measured" if shape.adaptive_threads and shape.threads > 1 else "",
            shape.n_seq,
            self.max_seq_len,
            shape.n_ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2 / 2**20,
            "on" if shape.flash_attn else "off",
            lib.system_info,
        )

    def _stop_ranks(self, failed: bool) -> None:
        """No ranks: on the engine thread's way out, free llama.cpp's context and model."""
        if self._lib is not None:
            self._lib.close()


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaCppOptions:
    """What only this engine reads from the extra engine args."""

    flash_attn: bool = FLASH_ATTN_DEFAULT
    adaptive_threads: bool = ADAPTIVE_THREADS_DEFAULT


def config_from_settings(settings: EngineSettings) -> tuple[ReferenceConfig, LlamaCppOptions]:
    """The torch engine's config from ``settings`` (dtype and quantization are the GGUF's own here, so those
    flags are ignored), and this engine's own keys of the extra engine args."""
    extra = dict(settings.extra or {})
    flags = {}
    for key, default in (
        (FLASH_ATTN_KEY, FLASH_ATTN_DEFAULT),
        (ADAPTIVE_THREADS_KEY, ADAPTIVE_THREADS_DEFAULT),
    ):
        flags[key] = extra.pop(key, default)
        if not isinstance(flags[key], bool):
            raise ConfigError(f"{key} in {settings.extra_source or 'extra engine args'}: true or false")
    for key in ("dtype", "quantization"):
        if settings.given(key) and getattr(settings, key) != "auto":
            log.warning("llamacpp engine: --%s ignored (llama.cpp computes with the GGUF's own types)", key)
        extra.pop(key, None)
    if settings.device != "cpu":
        raise ConfigError("--engine llamacpp runs on device cpu")
    settings = dataclasses.replace(settings, dtype="float32", quantization="none", extra=extra)
    return from_settings(settings), LlamaCppOptions(**flags)

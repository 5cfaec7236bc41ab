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
Q8_0 embedding, computed by llama.cpp's kernels); the KV is llama.cpp's F16; prefix caching is on by default
(``SeqSlots``; no KV events for the kv router); no ranks or CUDA.
Logprobs are of llama.cpp's logits; grammars, penalties and sampling are the torch engine's code.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
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
from dynamo_lite.engines.reference.scheduler import Scheduler, StepPlan
from dynamo_lite.engines.step_threads import StepThreads
from dynamo_lite.model_files import ModelFiles
from dynamo_lite.protocol import EngineKind, Role

log = logging.getLogger(__name__)

# Keys of --extra-engine-args only this engine reads (the rest are the torch engine's).
FLASH_ATTN_KEY = "flash_attn"
FLASH_ATTN_DEFAULT = True  # llama.cpp's faster setting for short contexts on CPU (benchmarks/README.md)
ADAPTIVE_THREADS_KEY = "adaptive_threads"
# Each step on all cores or one less, whichever measures faster (``threads``; benchmarks/README.md).
ADAPTIVE_THREADS_DEFAULT = True
# The torch engine's ``enable_prefix_caching``, on by default here as in llama-server (its prompt cache): the
# torch engine keeps it off so that fp32 outputs stay bit-comparable with a fresh run, which llama.cpp's
# batch-shape-dependent kernels never were (``tests/engines/llamacpp/``). A chat's system prompt and earlier turns
# are then computed once per slot (benchmarks/README.md, issue 29 session 8).
PREFIX_CACHING_KEY = "enable_prefix_caching"
PREFIX_CACHING_DEFAULT = True
# Models whose GGUF holds Q/K permuted for llama.cpp's interleaved RoPE (``kv_state``).
K_PERMUTED_MODEL_TYPES = ("llama", "mistral")


class SeqSlots:
    """The scheduler's slots are llama.cpp sequence ids; freeing one drops its KV cells, or, with prefix caching,
    keeps them for a later prompt that starts with the same tokens (as llama-server's prompt cache does per slot).

    A prompt's prefix is shared, not moved: ``llama_memory_seq_cp`` adds the new sequence's id to the held cells
    (no copy of the data; llama.cpp frees a cell when no sequence has it any more), so the slot that held it
    keeps its whole KV for the next prompt like it, e.g. the next turn of its chat. A reused prefix is whole
    tokens, not blocks (llama.cpp's cells are per position). The cache is sized for every slot's
    ``max_seq_len`` whether used or not, so kept cells take no room a sequence needs; but a step's attention
    walks its mask over them, hence ``max_held``. No KV events: the kv router does not see what is held here.
    """

    def __init__(
        self, lib: LlamaCpp, n_seq: int, max_seq_len: int, prefix_caching: bool = False, max_held: int = 0
    ) -> None:
        self._lib = lib
        self.max_slots = n_seq
        self.max_seq_len = max_seq_len
        self.prefix_caching = prefix_caching
        # Held cells are not free to attend past: every query row of a step walks its mask over them (a
        # 104-token chunk beside ~2,400 held cells took as long as 128 tokens without, served). So free slots
        # hold at most ``max_held`` tokens together (0: any), the ones freed longest ago dropped first.
        self.max_held = max_held
        self._free = list(range(n_seq - 1, -1, -1))  # the last one is given out first; freed ones appended
        self._held: dict[int, list[int]] = {}  # free slot -> the tokens whose KV its cells still hold

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        return self.allocate_for(None)[0]

    def allocate_for(self, tokens: list[int] | None) -> tuple[int, int]:
        """A free slot for a sequence starting with ``tokens``, and how many of them it already holds (never
        the last: its logits are needed). The slot is one that holds nothing, else the one freed longest ago
        (its cells dropped); the prefix comes from the free slot that holds the longest one."""
        if not self._free:
            raise NoFreeSlot("all sequences are in use")
        source, reused = -1, 0
        if tokens and self._held:
            wanted = tokens[: len(tokens) - 1]
            for candidate, held in self._held.items():
                n = _common_prefix(held, wanted)
                if n > reused:
                    source, reused = candidate, n
        empty = [s for s in self._free if s not in self._held]
        others = [s for s in self._free if s != source]  # oldest first
        slot = empty[-1] if empty else others[0] if others else source
        self._free.remove(slot)
        if slot == source:  # the only free slot: keep its prefix, drop the rest
            del self._held[slot]
            self._lib.drop(slot, keep=reused)
            return slot, reused
        if self._held.pop(slot, None) is not None:
            self._lib.drop(slot)
        if reused:
            self._lib.share(source, slot, reused)
        return slot, reused

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        """Return ``slot``; with prefix caching it keeps the KV of ``tokens`` (its computed positions)."""
        if not 0 <= slot < self.max_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        if self.prefix_caching and tokens:
            keep = tokens[: self.max_held] if self.max_held else tokens
            self._lib.drop(slot, keep=len(keep))  # nothing past them (nor a step that failed midway)
            self._held[slot] = list(keep)
        else:
            self._lib.drop(slot)
        self._free.append(slot)
        if self.max_held:
            held = sum(map(len, self._held.values()))
            for victim in [s for s in self._free if s in self._held and s != slot]:  # oldest first
                if held <= self.max_held:
                    break
                held -= len(self._held.pop(victim))
                self._lib.drop(victim)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading entries ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppRunner:
    """``rank_runner.Runner`` over llama.cpp: a step is one ``llama_decode``, on the threads ``step_threads``
    picks (the engine sets it before each step)."""

    def __init__(
        self, lib: LlamaCpp, slots: SeqSlots, model_config: Any, k_permuted: bool, step_threads: StepThreads
    ) -> None:
        self.lib = lib
        self.slots = slots
        self.step_threads = step_threads
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
        logits = self.lib.decode(tokens, positions, seqs, want, self.step_threads)  # wanted rows, ascending
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
        self._borrow = None  # torch only samples here; llama.cpp's threads per step: ``_timed_step``
        self._own_threads: StepThreads | None = None
        self._alone_threads: StepThreads | None = None
        self.flash_attn = options.flash_attn
        self.adaptive_threads = options.adaptive_threads
        self._k_permuted = model_files.model_type in K_PERMUTED_MODEL_TYPES
        self._lib: LlamaCpp | None = None

    def _load(self) -> None:
        """The GGUF into llama.cpp, a context with a sequence per slot, the runner and the scheduler."""
        cfg, conf = self.model_config, self.config
        torch.set_num_threads(1)  # torch only samples here: the cores are llama.cpp's
        # A decode worker's sequences come with their KV (``write_kv``), which a kept prefix would not spare.
        prefix_caching = conf.enable_prefix_caching and conf.role is not Role.DECODE
        started = time.perf_counter()
        threads = conf.threads or default_threads()
        # While the process's other engines have no work (``engines/reference/cores.py``), a prefill step may
        # take the cores they were given: ``_timed_step``.
        alone = conf.alone_threads if self._activity is not None and conf.alone_threads > threads else 0
        self._own_threads = StepThreads(threads, self.adaptive_threads)
        self._alone_threads = StepThreads(alone, self.adaptive_threads) if alone else None
        shape = ContextShape(
            threads=max(threads, alone),
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
        slots = SeqSlots(lib, shape.n_seq, self.max_seq_len, prefix_caching, max_held=conf.max_num_tokens)
        self._runner = LlamaCppRunner(lib, slots, cfg, self._k_permuted, self._own_threads)
        self._scheduler = Scheduler(slots, conf.max_num_tokens)
        if conf.warmup:  # the first decode allocates llama.cpp's compute buffers
            self._runner.forward([], [(0, 0, [1, 2, 3, 4])], [3])
            lib.drop(0)
        log.info(
            "llamacpp engine: %s loaded in %.1f s (%d threads%s%s, %d sequences x %d tokens, F16 KV %.0f MiB, "
            "flash attention %s, prefix caching %s): %s",
            self.model_files.gguf_path.name,
            time.perf_counter() - started,
            threads,
            f", {alone} while the process's other engines have no work" if alone else "",
            ", or one less per step, as measured" if shape.adaptive_threads and shape.threads > 1 else "",
            shape.n_seq,
            self.max_seq_len,
            shape.n_ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2 / 2**20,
            "on" if shape.flash_attn else "off",
            "on" if prefix_caching else "off",
            lib.system_info,
        )

    def _timed_step(self, plan: StepPlan) -> None:
        """The step on this engine's threads, or, for a prefill step while no other engine of the process has
        work, on the cores they were given too (``alone_threads``; ``serve`` gives them to its prefill worker),
        as the torch engine's prefill steps do: served, a 104-token chunk took 493 ms on 2 threads against 589
        on one (benchmarks/README.md, issue 29 session 8). ``StepThreads`` (one per case) keeps the borrowed
        cores only while they measure faster. Decode steps never borrow: served at c=1 a decode worker's 1-row
        steps took 18.9 ms on 2 threads against 11.4 on one (the event loop's work for each token takes a core
        from the step), though alone 2 threads were faster (8-11 against 13-15 ms)."""
        runner, activity = self._runner, self._activity
        assert isinstance(runner, LlamaCppRunner) and self._own_threads is not None
        alone = (
            self._alone_threads is not None and not plan.decode and activity is not None and activity.alone()
        )
        runner.step_threads = self._alone_threads if alone else self._own_threads  # type: ignore[assignment]
        self._step(plan)

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
    extra.setdefault(PREFIX_CACHING_KEY, PREFIX_CACHING_DEFAULT)  # the torch engine's key, our default
    for key in ("dtype", "quantization"):
        if settings.given(key) and getattr(settings, key) != "auto":
            log.warning("llamacpp engine: --%s ignored (llama.cpp computes with the GGUF's own types)", key)
        extra.pop(key, None)
    if settings.device != "cpu":
        raise ConfigError("--engine llamacpp runs on device cpu")
    settings = dataclasses.replace(settings, dtype="float32", quantization="none", extra=extra)
    return from_settings(settings), LlamaCppOptions(**flags)

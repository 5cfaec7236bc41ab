"""llama.cpp through llama-cpp-python's ctypes bindings: one model, one context, its sequences as batch slots.

Only this module imports ``llama_cpp`` (the ``llamacpp`` extra). What the engine needs from llama.cpp is small:
``llama_decode`` of a batch of (token, position, sequence, wants-logits) rows, the logits of the rows that asked,
dropping a sequence's KV, and a sequence's KV state out and in (``llama_state_seq_get_data``/``set_data``).
Sampling, logprobs and grammars stay ours (``engines.reference``): llama.cpp computes the logits.

The batch is four numpy arrays that the ``llama_batch`` struct points into, filled with numpy writes: no ctypes
call per token.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynamo_lite.engines.base import EngineUnavailable
from dynamo_lite.engines.step_threads import StepThreads

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"  # the release whose KV state format ``kv_state`` reads and writes
INSTALL_HINT = (
    "--engine llamacpp needs llama-cpp-python: pip install 'dynamo_lite[llamacpp]' "
    f"(llama-cpp-python=={LLAMA_CPP_VERSION}; see benchmarks/README.md for the build flags)"
)


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or ``EngineUnavailable`` saying what to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise EngineUnavailable(f"{INSTALL_HINT} ({e})") from None
    except OSError as e:  # the shared library failed to load (an ABI or CPU mismatch)
        raise EngineUnavailable(f"llama-cpp-python is installed but its library does not load: {e}") from None
    version = getattr(llama_cpp, "__version__", "?")
    if version != LLAMA_CPP_VERSION:
        raise EngineUnavailable(
            f"llama-cpp-python {version} is installed; --engine llamacpp reads the KV state format of "
            f"{LLAMA_CPP_VERSION}: pip install llama-cpp-python=={LLAMA_CPP_VERSION}"
        )
    _route_log(llama_cpp)
    return llama_cpp


_GGML_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level WARN, ERROR; DEBUG/INFO dropped
_GGML_LOG_CONT = 5  # a line continuing the previous message
_log_state: dict[str, Any] = {}


def _route_log(L: Any) -> None:
    """llama.cpp's log (hundreds of lines per model load on stderr) into ours: its warnings and errors only."""
    if "callback" in _log_state:
        return

    @L.llama_log_callback
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level == _GGML_LOG_CONT:
            level = _log_state.get("last", 0)
        _log_state["last"] = level
        if level in _GGML_LOG_LEVELS and text.strip():
            log.log(_GGML_LOG_LEVELS[level], "llama.cpp: %s", text.decode(errors="replace").rstrip())

    _log_state["callback"] = callback  # C keeps only the pointer: the object must live
    L.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaCppError(RuntimeError):
    """llama.cpp refused a call (a full KV cache, a state it cannot read)."""


@dataclass(frozen=True, slots=True)
class ContextShape:
    """What a context is created with."""

    threads: int  # the most a step uses (the context's threads)
    n_seq: int  # sequences (the engine's batch slots)
    n_ctx: int  # KV cells over all sequences (one unified cache)
    n_batch: int  # rows one ``decode`` may take
    flash_attn: bool
    adaptive_threads: bool = True  # per step all ``threads`` or one less, as measured (``threads``)


class LlamaCpp:
    """One GGUF model and one context. Not thread-safe: the engine thread alone calls it."""

    def __init__(self, gguf: str, shape: ContextShape) -> None:
        L = import_llama_cpp()
        self.L = L
        self.shape = shape
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {gguf}")
        self.ctx = None
        try:
            vocab = L.llama_model_get_vocab(self.model)
            self.n_vocab = int(L.llama_vocab_n_tokens(vocab))
            self.n_layer = int(L.llama_model_n_layer(self.model))
            self.n_head_kv = int(L.llama_model_n_head_kv(self.model))
            cparams = L.llama_context_default_params()
            cparams.n_ctx = shape.n_ctx
            cparams.n_batch = shape.n_batch
            cparams.n_ubatch = min(shape.n_batch, 512)
            cparams.n_seq_max = shape.n_seq
            cparams.n_threads = shape.threads
            cparams.n_threads_batch = shape.threads  # per step: ``decode``'s ``threads``
            cparams.flash_attn_type = (
                L.LLAMA_FLASH_ATTN_TYPE_ENABLED if shape.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            cparams.kv_unified = True  # one pool of cells for every sequence, as llama-server
            cparams.no_perf = True
            self.ctx = L.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise LlamaCppError("llama.cpp could not create a context")
            self.memory = L.llama_get_memory(self.ctx)
        except BaseException:
            self.close()
            raise
        n = shape.n_batch
        self._token = np.zeros(n, np.int32)
        self._pos = np.zeros(n, np.int32)
        self._n_seq_id = np.ones(n, np.int32)
        self._seq = np.zeros(n, np.int32)
        self._logits = np.zeros(n, np.int8)
        # seq_id is an array of pointers to each row's (one) sequence id: point them into ``_seq`` once.
        seq_ptr = ctypes.POINTER(ctypes.c_int32)
        base, step = self._seq.ctypes.data, self._seq.itemsize
        self._seq_ptrs = (seq_ptr * n)(*(ctypes.cast(base + i * step, seq_ptr) for i in range(n)))
        self._batch = L.llama_batch()
        self._batch.token = self._token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.embd = ctypes.POINTER(ctypes.c_float)()
        self._batch.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._batch.seq_id = self._seq_ptrs
        self._batch.logits = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._threads = StepThreads(shape.threads, shape.adaptive_threads)  # unless ``decode`` is given one
        self._n_threads = shape.threads

    @property
    def system_info(self) -> str:
        return self.L.llama_print_system_info().decode(errors="replace").strip()

    def decode(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        seqs: np.ndarray,
        want: np.ndarray,
        threads: StepThreads | None = None,
    ) -> np.ndarray:
        """One ``llama_decode`` over rows ``(tokens[i], positions[i], seqs[i])``; returns the logits of the rows
        where ``want`` is set, in row order, as a ``(rows, n_vocab)`` float32 view of llama.cpp's buffer (valid
        until the next call). ``threads`` picks the step's threads (at most the context's) and is told how long
        it took; None: every thread of the context, or one less, as measured."""
        n = len(tokens)
        if not 0 < n <= self.shape.n_batch:
            raise LlamaCppError(f"a batch of {n} rows (1..{self.shape.n_batch})")
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._seq[:n] = seqs
        self._logits[:n] = want
        self._batch.n_tokens = n
        chooser = threads or self._threads
        chosen = min(chooser.choose(n), self.shape.threads)
        if chosen != self._n_threads:
            self.L.llama_set_n_threads(self.ctx, chosen, chosen)
            self._n_threads = chosen
        started = time.perf_counter()
        rc = self.L.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise LlamaCppError(
                f"llama_decode returned {rc}" + (" (no room in the KV cache)" if rc == 1 else "")
            )
        chooser.record(n, chosen, time.perf_counter() - started)
        rows = int(np.count_nonzero(want))
        if not rows:
            return np.empty((0, self.n_vocab), np.float32)
        ptr = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, (rows, self.n_vocab))

    def drop(self, seq: int, keep: int = 0) -> None:
        """Forget sequence ``seq``'s KV from position ``keep`` on (cells no other sequence has are free again)."""
        self.L.llama_memory_seq_rm(self.memory, seq, keep if keep > 0 else -1, -1)

    def share(self, src: int, dst: int, n: int) -> None:
        """Sequence ``dst`` (empty) gets ``src``'s KV of positions ``0..n-1``: the same cells, no data copied."""
        self.L.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def state_of(self, seq: int) -> bytes:
        """Sequence ``seq``'s KV state, in llama.cpp's format (``kv_state`` reads it)."""
        size = int(self.L.llama_state_seq_get_size(self.ctx, seq))
        buf = (ctypes.c_uint8 * size)()
        written = int(self.L.llama_state_seq_get_data(self.ctx, buf, size, seq))
        if written == 0 or written > size:
            raise LlamaCppError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return bytes(memoryview(buf)[:written])

    def set_state(self, seq: int, state: bytes | bytearray) -> None:
        """Load ``state`` (one sequence's, ``kv_state`` format) as sequence ``seq``'s KV."""
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if int(self.L.llama_state_seq_set_data(self.ctx, buf, len(state), seq)) == 0:
            raise LlamaCppError("llama.cpp refused the KV state (see its log)")

    def close(self) -> None:
        if self.ctx:
            self.L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.L.llama_model_free(self.model)
            self.model = None


def default_threads() -> int:
    """The CPUs this process may run on (llama.cpp's own default is a fixed 4)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

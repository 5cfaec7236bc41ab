"""llama.cpp's side of ``benchmarks.compare_llama_cpp``: runs inside the llama-cpp-python venv (stdlib, numpy and
``llama_cpp`` only; nothing of dynamo_lite), reads a JSON job from stdin, prints one JSON result line.

Uses llama.cpp's C API through the bindings (``llama_decode`` on a ``llama_batch``), as llama-server does, so
the figures are llama.cpp's and not the Python ``Llama`` wrapper's: prefill = one ``llama_decode`` over the prompt
(split into ``n_batch`` chunks), decode = one token per ``llama_decode`` with a greedy argmax over its logits,
batched decode = one token of each of N sequences in one ``llama_batch`` (``n_seq_max`` = N, unified KV cache).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import llama_cpp as L
import numpy as np


class Runner:
    def __init__(
        self, gguf: str, threads: int, n_ctx: int, n_batch: int, n_seq: int, flash_attn: bool
    ) -> None:
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if hasattr(cparams, "flash_attn_type"):
            cparams.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        else:
            cparams.flash_attn = flash_attn
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = True  # one cache shared by all sequences, as llama-server
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(max(n_batch, n_seq), 0, n_seq)

    def clear(self) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of ``rows`` = [(token, position, sequence, want_logits)]."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(rows)
        rc = L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, tokens: list[int], seq: int = 0) -> None:
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            self.decode([(t, start + i, seq, last and i == len(chunk) - 1) for i, t in enumerate(chunk)])

    def argmax(self, row: int) -> int:
        ptr = L.llama_get_logits_ith(self.ctx, row)
        return int(
            np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)).argmax()
        )

    def close(self) -> None:
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def prefill_tok_s(r: Runner, prompt: list[int]) -> float:
    r.clear()
    started = time.perf_counter()
    r.prefill(prompt)
    r.argmax(-1)
    return len(prompt) / (time.perf_counter() - started)


def decode_ms(r: Runner, prompt: list[int], steps: int) -> float:
    """ms per token of one sequence decoding ``steps`` tokens after ``prompt`` (prefill not timed)."""
    r.clear()
    r.prefill(prompt)
    token, pos = r.argmax(-1), len(prompt)
    started = time.perf_counter()
    for _ in range(steps):
        r.decode([(token, pos, 0, True)])
        token, pos = r.argmax(0), pos + 1
    return (time.perf_counter() - started) / steps * 1e3


def batched_tok_s(r: Runner, prompts: list[list[int]], steps: int) -> float:
    """Total tokens/s of ``len(prompts)`` sequences decoding together, one token each per ``llama_decode``."""
    r.clear()
    tokens = []
    for seq, prompt in enumerate(prompts):
        r.prefill(prompt, seq)
        tokens.append(r.argmax(-1))
    positions = [len(p) for p in prompts]
    started = time.perf_counter()
    for _ in range(steps):
        r.decode([(t, p, s, True) for s, (t, p) in enumerate(zip(tokens, positions, strict=True))])
        tokens = [r.argmax(i) for i in range(len(prompts))]
        positions = [p + 1 for p in positions]
    return len(prompts) * steps / (time.perf_counter() - started)


def main() -> int:
    job = json.loads(sys.stdin.read())
    batched = job["batched"]  # {"8": [[ids], ...], "16": [...]}
    n_seq = max([1, *(len(v) for v in batched.values())])
    longest = max(
        len(p) for p in [*job["prefill"], *job["decode"], *(q for v in batched.values() for q in v)]
    )
    # Every batched sequence has its own room in the unified cache.
    n_ctx = max(
        longest + job["steps"] + 8, sum(len(q) + job["steps"] + 8 for v in batched.values() for q in v)
    )
    r = Runner(job["gguf"], job["threads"], n_ctx, job["n_batch"], n_seq, job["flash_attn"])
    out: dict = {"system_info": L.llama_print_system_info().decode(), "version": L.__version__}
    try:
        r.prefill(job["prefill"][0][:8])  # warm up
        r.clear()
        reps, steps = range(job["repeats"]), job["steps"]  # the best of ``repeats`` runs of each figure
        out["prefill"] = {str(len(p)): max(prefill_tok_s(r, p) for _ in reps) for p in job["prefill"]}
        out["decode"] = {str(len(p)): min(decode_ms(r, p, steps) for _ in reps) for p in job["decode"]}
        out["batched"] = {n: max(batched_tok_s(r, ps, steps) for _ in reps) for n, ps in batched.items()}
    finally:
        r.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

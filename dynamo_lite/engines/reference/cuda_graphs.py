"""CUDA graphs of the decode-only step: one per batch-size bucket, replayed with new inputs.

An eager decode step of a llama launches ~15 kernels per layer from Python; at batch sizes where the GPU needs
a millisecond or two, the launches (not the GPU) set the pace. A graph replays the whole step with one call.
Inputs live in one static device buffer (token, position, slot per row); a batch of ``n`` runs the smallest
bucket ``>= n``, its extra rows pointed at a reserved padding slot (their K/V writes land there, unread).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from dynamo_lite.engines.reference.kv_cache import KvCache

log = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8 up to 64, then every 16 (each >= the one before)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    b = 16
    while b < max_batch:
        out.append(b)
        b += 8 if b < 64 else 16
    out.append(max_batch)
    return out


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``cache``; ``run`` replays the right one."""

    def __init__(self, model: Any, cache: KvCache, pad_slot: int, max_batch: int) -> None:
        """``model``: a ``LlamaModel`` or ``GptOssModel`` (anything with ``decode_forward`` and ``device``)."""
        self.model = model
        self.cache = cache
        self.pad_slot = pad_slot
        self.max_batch = max_batch
        self.device = model.device
        self._sizes = buckets(max_batch)
        self._static = torch.zeros(3, max_batch, dtype=torch.int64, device=self.device)  # ids, pos, slots
        self._host = torch.zeros(3, max_batch, dtype=torch.int64, pin_memory=True)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0

    def _inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._static[0, :size], self._static[1, :size], self._static[2, :size]

    def capture(self) -> None:
        """Warm up (compiles the Triton kernels, creates cuBLAS handles), then capture every bucket, largest
        first, all sharing one memory pool."""
        started = time.perf_counter()
        self._static.zero_()
        self._static[2].fill_(self.pad_slot)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for size in self._sizes:
                for _ in range(2):
                    self.model.decode_forward(*self._inputs(size), self.cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = None
        for size in reversed(self._sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model.decode_forward(*self._inputs(size), self.cache)
            pool = graph.pool()
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - started
        log.info(
            "captured %d decode graphs (batch %s) in %.1f s",
            len(self._graphs),
            self._sizes,
            self.capture_seconds,
        )

    def run(self, decode: list[tuple[int, int, int]]) -> torch.Tensor:
        """Logits ``[len(decode), vocab]`` (fp32, a view of the graph's output: consume before the next
        ``run``) for rows ``(slot, position, token)`` in the given order."""
        n = len(decode)
        size = next(s for s in self._sizes if s >= n)
        host = self._host
        pad = size - n
        host[0, :size] = torch.tensor([t for _, _, t in decode] + [0] * pad, dtype=torch.int64)
        host[1, :size] = torch.tensor([p for _, p, _ in decode] + [0] * pad, dtype=torch.int64)
        host[2, :size] = torch.tensor([s for s, _, _ in decode] + [self.pad_slot] * pad, dtype=torch.int64)
        # The previous step's copy finished: its logits were read on the host (a sync) before this call.
        self._static.copy_(host, non_blocking=True)  # whole rows: one dense copy; rows past size are unread
        graph, out = self._graphs[size]
        graph.replay()
        return out[:n]

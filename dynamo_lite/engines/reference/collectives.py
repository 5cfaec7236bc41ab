"""The exchanges a model's forward makes between ranks, at the two points where a split layer ends.

A forward calls ``attention_out(y)`` on the o projection's output and ``ffn(h, fn)`` for the MLP / experts:

- ``Collectives`` (one rank): nothing to exchange.
- ``HeadParallel``: every rank runs the same tokens; its o projection and FFN produced partial sums (its heads,
  its intermediate columns, its experts), and one all-reduce each completes them.
- ``SequenceParallel`` (attention data-parallel): every rank attends for its own sequences with all heads, so
  ``attention_out`` has nothing to do; the FFN is still split, so each rank's rows are gathered from every rank,
  each rank runs its part of the FFN over all of them (its experts' contribution, its columns), the partial
  outputs are all-reduced and each rank keeps its own rows. For experts that is "each rank computes its local
  experts for all rows, then all-reduce" rather than sending each routed row to its expert's rank: the same
  answer with one gather and one all-reduce of ``[rows, hidden]``, no data-dependent message sizes, and the same
  code path as the dense MLP. It costs every rank the routing of all rows (one small matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dynamo_lite.engines.reference.rank_comm import RankComm

FfnFn = Callable[[torch.Tensor], torch.Tensor]


class Collectives:
    """One rank: the layer's output is already whole."""

    def attention_out(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def ffn(self, h: torch.Tensor, fn: FfnFn) -> torch.Tensor:
        return fn(h)


ONE_RANK = Collectives()


class HeadParallel(Collectives):
    """Tensor parallel over heads and columns: sum the ranks' partial outputs."""

    def __init__(self, comm: RankComm) -> None:
        self.comm = comm

    def attention_out(self, y: torch.Tensor) -> torch.Tensor:
        self.comm.all_reduce(y)
        return y

    def ffn(self, h: torch.Tensor, fn: FfnFn) -> torch.Tensor:
        y = fn(h)
        self.comm.all_reduce(y)
        return y


class SequenceParallel(Collectives):
    """Attention data-parallel: attention is whole per rank; the FFN runs over every rank's rows (see the module
    docstring). ``rows`` (set before each step, the same list on every rank): rows per rank this step."""

    def __init__(self, comm: RankComm) -> None:
        self.comm = comm
        self.rows: list[int] = [0] * comm.size

    def ffn(self, h: torch.Tensor, fn: FfnFn) -> torch.Tensor:
        rows = self.rows
        most = max(rows)
        if most == 0:
            return h
        padded = h.new_zeros(most, h.shape[1])
        padded[: h.shape[0]] = h
        parts = [torch.empty_like(padded) for _ in range(self.comm.size)]
        self.comm.all_gather(parts, padded)
        every = torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)])
        y = fn(every)
        self.comm.all_reduce(y)
        start = sum(rows[: self.comm.rank])
        return y[start : start + rows[self.comm.rank]]

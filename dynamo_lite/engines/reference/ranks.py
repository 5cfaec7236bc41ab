"""How a model is split over the engine's ranks: which heads, MLP columns and experts each rank holds.

``--tensor-parallel-size N`` runs N ranks. Attention either splits by heads (``attention_dp`` off: rank ``r`` holds
query heads ``r * H / N ..`` and the KV heads they read; with fewer KV heads than ranks each rank keeps the one
KV head its query heads share, replicated on ``N / KVH`` ranks) or by sequences (``attention_dp`` on: every rank
holds every head and attends for its own sequences). The dense MLP always splits its intermediate columns
(gate/up by rows, down by columns); gpt-oss's experts split by ``--expert-parallel-size M``: rank ``r`` holds
experts ``(r // (N / M)) * E / M ..`` and, when ``M < N``, ``1 / (N / M)`` of each one's intermediate columns.
Every split ends in one all-reduce that sums the ranks' partial outputs (``collectives``).

A model that doesn't divide is refused here, before any process starts, with the numbers that don't fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ParallelError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ParallelPlan:
    """The engine's ranks: ``size`` processes (TP), experts split ``expert_size`` ways (EP), attention by heads
    or, with ``attention_dp``, by sequences. ``rank``: the process this plan describes."""

    size: int = 1
    expert_size: int = 1
    attention_dp: bool = False
    rank: int = 0

    @property
    def ranked(self) -> bool:
        return self.size > 1

    def for_rank(self, rank: int) -> ParallelPlan:
        return ParallelPlan(self.size, self.expert_size, self.attention_dp, rank)

    def describe(self) -> str:
        attention = "attention data-parallel" if self.attention_dp else "attention heads split"
        return f"{self.size} ranks ({attention}, experts split {self.expert_size} ways)"


@dataclass(frozen=True, slots=True)
class RankShard:
    """What one rank holds of a model (index ranges, end exclusive)."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn_cols: tuple[int, int]  # the dense MLP's intermediate columns (llama), or each expert's (gpt-oss)
    experts: tuple[int, int]  # gpt-oss; (0, 0) for a dense model
    first_of_ffn: bool  # adds the down projection's bias (once over the ranks that sum a row's FFN output)
    first_of_heads: bool  # adds the o projection's bias

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def shard_for(config: Any, plan: ParallelPlan) -> RankShard:
    """Rank ``plan.rank``'s share of the model ``config`` (a ``LlamaConfig`` or ``GptOssConfig``); raises
    ``ParallelError`` naming what does not divide."""
    check_divides(config, plan)
    n, r = plan.size, plan.rank
    nh, nkv = config.num_heads, config.num_kv_heads
    if plan.attention_dp or n == 1:
        q, kv, first_heads = (0, nh), (0, nkv), True
    else:
        per = nh // n
        q = (r * per, (r + 1) * per)
        if nkv >= n:
            kv_per = nkv // n
            kv = (r * kv_per, (r + 1) * kv_per)
        else:  # fewer KV heads than ranks: the one KV head this rank's query heads read, replicated
            k = r // (n // nkv)
            kv = (k, k + 1)
        first_heads = r == 0
    num_experts = getattr(config, "num_experts", 0)
    if num_experts:
        m = plan.expert_size
        t = n // m  # ranks sharing each expert's intermediate columns
        group, part = r // t, r % t
        per_e = num_experts // m
        cols = config.intermediate_size // t
        return RankShard(
            q,
            kv,
            (part * cols, (part + 1) * cols),
            (group * per_e, (group + 1) * per_e),
            part == 0,
            first_heads,
        )
    cols = config.intermediate_size // n
    return RankShard(q, kv, (r * cols, (r + 1) * cols), (0, 0), r == 0, first_heads)


def check_divides(config: Any, plan: ParallelPlan, mxfp4: bool = False) -> None:
    """Refuse a split the model's shape does not allow (heads, KV heads, intermediate size, experts)."""
    n, m = plan.size, plan.expert_size
    if n < 1 or m < 1:
        raise ParallelError(f"tensor/expert parallel sizes must be positive, got {n}/{m}")
    if n == 1 and m == 1:
        return
    nh, nkv = config.num_heads, config.num_kv_heads
    name = getattr(config, "model_type", "the model")
    if not plan.attention_dp:
        if nh % n:
            raise ParallelError(
                f"{name} has {nh} query heads and {nkv} KV heads: {n} tensor-parallel ranks need the query heads "
                f"to divide evenly (use a tensor-parallel size dividing {nh}, or enable_attention_dp)"
            )
        if nkv % n and n % nkv:
            raise ParallelError(
                f"{name} has {nkv} KV heads: {n} ranks must divide them or be a multiple of them"
            )
    num_experts = getattr(config, "num_experts", 0)
    if not num_experts:
        if m != 1 and m != n:
            raise ParallelError(f"expert parallel size {m}: {name} has no experts (use 1)")
        if config.intermediate_size % n:
            raise ParallelError(
                f"{name}'s intermediate size {config.intermediate_size} does not divide by {n}"
            )
        return
    if n % m:
        raise ParallelError(f"expert parallel size {m} must divide the tensor parallel size {n}")
    if num_experts % m:
        raise ParallelError(f"{name} has {num_experts} experts: expert parallel size {m} must divide them")
    t = n // m
    if config.intermediate_size % t:
        raise ParallelError(
            f"{name}'s expert intermediate size {config.intermediate_size} does not divide by {t} "
            f"(tensor parallel {n} / expert parallel {m})"
        )
    if mxfp4 and t > 1 and (config.intermediate_size // t) % 32:
        raise ParallelError(
            f"MXFP4 experts split {t} ways need {config.intermediate_size} / {t} intermediate columns to be a "
            "multiple of 32 (the scale block); use expert parallel size = tensor parallel size"
        )


# The per-layer matrices a rank holds a share of (llama and gpt-oss names); norms, the router, the embedding and
# the output matrix are replicated on every rank.
SHARDED_WEIGHTS = ("qkv", "qkv_bias", "o", "sinks", "gate_up", "gate_up_bias", "down")


def sharded_nbytes(weights: Any, attention: bool = True) -> int:
    """Bytes of the sharded matrices in ``weights`` (``LlamaWeights`` / ``GptOssWeights``; MXFP4 experts count
    their blocks and scales); ``attention=False`` leaves out the attention ones (replicated under attention DP)."""
    names = SHARDED_WEIGHTS if attention else ("gate_up", "gate_up_bias", "down")
    total = 0
    for layer in weights.layers:
        for name in names:
            t = getattr(layer, name, None)
            if t is not None:
                total += t.nbytes if hasattr(t, "nbytes") else t.numel() * t.element_size()
    return total

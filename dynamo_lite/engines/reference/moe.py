"""gpt-oss's mixture of experts: a top-k router and experts with a clamped SwiGLU, both with biases.

Each token's router logits pick ``top_k`` experts; the softmax runs over those k logits only. An expert computes
``gate, up = x W_gu + b_gu``; ``gate`` clamped from above and ``up`` from both sides at ``limit``;
``(up + 1) * gate * sigmoid(alpha * gate)``; then ``W_down`` + bias; the k outputs are summed with the router's
weights. The order of operations is transformers' ``grouped_mm`` experts path, so fp32 results match it.

Three ways to run the experts; ``pick_experts`` chooses per model and, on a GPU, per number of tokens:

- ``grouped_mm``: the (token, expert) pairs sorted by expert, every expert's rows through one grouped matrix
  product (``torch.nn.functional.grouped_mm``): each expert's weights read once per step whatever its number of
  rows, shapes that depend only on the number of tokens, no value back to the host, so a decode step with it can
  be captured in a CUDA graph. On CUDA only bf16 has a grouped kernel (other dtypes fall back inside torch to a
  loop that syncs with the host, which a CUDA graph can't capture).
- ``dense``: every expert on every token (two batched products), then each token's top-k picked: E / k times the
  arithmetic, graph-safe, any dtype. Where a step touches nearly every expert anyway (decode batches of dozens
  of sequences), it reads the same bytes as grouped_mm and, measured on an H200, is the faster of the two; on a
  GPU the engine times both at load and keeps the faster for each batch size.
- ``loop`` (CPUs without grouped_mm): a loop over the experts that have rows (a host sync: no graphs).

Experts kept in MXFP4 (``moe_mxfp4``) run in the Triton kernels that unpack the weights in registers on CUDA, and
elsewhere through the routed experts dequantized one at a time.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynamo_lite.engines.reference import moe_mxfp4, route_topk

log = logging.getLogger(__name__)

GroupedMm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(x [S, K] rows sorted by group, w [G, K, N], offsets [G] int32 cumulative rows) -> [S, N]``."""


def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offsets.tolist()):  # one host sync
        if end > start:
            torch.mm(x[start:end], w[g], out=out[start:end])
        start = end
    return out


ExpertsFn = Callable[..., torch.Tensor]
"""``(h, weights, ids, gate_up, gate_up_bias, down, down_bias, limit, alpha) -> [T, hidden]``: see ``experts``."""

TUNED_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # decode batch sizes timed at load (GPU)
DENSE_MIN_COVERAGE = 0.9  # share of the experts a step's tokens must reach before dense is considered


@dataclass(frozen=True, slots=True)
class ExpertsPlan:
    """How a model runs its experts: ``fn`` (an ``ExpertsFn``), whether a CUDA graph can capture it, and a
    one-line description for logs and benchmarks. ``partials``: the same experts before their sum, as fp32
    ``[slices, T, k, hidden]`` (``residual_norm.moe_add_rms_norm`` folds the sum into the residual add)."""

    fn: ExpertsFn
    graph_safe: bool
    name: str
    partials: ExpertsFn | None = None


def pick_experts(
    dtype: torch.dtype,
    device: torch.device,
    sample: tuple[torch.Tensor, ...] | None = None,
    top_k: int = 4,
    limit: float = 7.0,
    alpha: float = 1.702,
) -> ExpertsPlan:
    """The way to run the experts here: on a CPU ``grouped_mm`` (else ``loop``); on a GPU ``grouped_mm`` in bf16
    with ``dense`` for the token counts where timing one layer's real weights (``sample`` = ``(router,
    router_bias, gate_up, gate_up_bias, down, down_bias)``) shows dense faster, and ``dense`` in other dtypes.
    MXFP4 experts: the Triton kernels on CUDA (bf16 or fp32), the per-expert dequantizing reference elsewhere."""
    if sample is not None and isinstance(sample[2], moe_mxfp4.Mxfp4Experts):
        if moe_mxfp4.triton_supported(device) and dtype in (torch.bfloat16, torch.float32):
            how = "32-bit words unpacked by PTX" if sample[2].words else "e2m1 unpacked by the compiler"
            return ExpertsPlan(
                moe_mxfp4.experts_mxfp4, True, f"mxfp4 (Triton, {how})", moe_mxfp4.experts_mxfp4_partials
            )
        return ExpertsPlan(
            moe_mxfp4.experts_mxfp4_reference, False, "mxfp4 reference (routed experts dequantized per step)"
        )
    name, grouped_mm = pick_grouped_mm(dtype, device)
    if device.type != "cuda":
        if name == "grouped_mm":
            return ExpertsPlan(functools.partial(experts, grouped_mm=grouped_mm), True, "grouped_mm")
        return ExpertsPlan(functools.partial(experts, grouped_mm=_grouped_mm_loop), False, "loop")
    if name != "grouped_mm" or dtype != torch.bfloat16:
        return ExpertsPlan(experts_dense, True, "dense")
    grouped = functools.partial(experts, grouped_mm=grouped_mm)
    if sample is None:
        return ExpertsPlan(grouped, True, "grouped_mm")
    # Dense reads every expert: it can only pay where a step's tokens reach nearly all of them anyway (uniform
    # routing reaches 1 - (1 - k/E)^n of them). Timing alone picked dense for a single token once on an H200
    # (one layer measured in isolation), where it reads 8x the bytes.
    experts_n = sample[2].shape[0]
    dense_at = {
        n: 1 - (1 - top_k / experts_n) ** n >= DENSE_MIN_COVERAGE
        and _dense_is_faster(n, sample, top_k, limit, alpha, grouped)
        for n in TUNED_SIZES
    }
    if not any(dense_at.values()):
        return ExpertsPlan(grouped, True, "grouped_mm")
    sizes = sorted(dense_at)

    def tuned(h: torch.Tensor, *args: object) -> torch.Tensor:
        # The decision timed for the smallest tuned size at or above this many tokens; grouped_mm above them all.
        n = h.shape[0]
        size = next((s for s in sizes if s >= n), None)
        return experts_dense(h, *args) if size is not None and dense_at[size] else grouped(h, *args)

    chosen = ",".join(str(n) for n in sizes if dense_at[n])
    return ExpertsPlan(tuned, True, f"dense at {chosen} tokens (timed), grouped_mm otherwise")


def _dense_is_faster(
    tokens: int,
    sample: tuple[torch.Tensor, ...],
    top_k: int,
    limit: float,
    alpha: float,
    grouped: ExpertsFn,
) -> bool:
    router, router_bias, gate_up, gate_up_bias, down, down_bias = sample
    gen = torch.Generator(device=gate_up.device).manual_seed(tokens)
    h = torch.randn(tokens, gate_up.shape[1], generator=gen, device=gate_up.device).to(gate_up.dtype)
    weights, ids = route(h, router, router_bias, top_k)
    args = (weights, ids, gate_up, gate_up_bias, down, down_bias, limit, alpha)
    seconds = []
    for fn in (grouped, experts_dense):
        for _ in range(2):  # warm up (kernel selection, workspace, allocator)
            fn(h, *args)
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(h, *args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        seconds.append(sorted(times)[2])
    return seconds[1] < seconds[0]


def pick_grouped_mm(dtype: torch.dtype, device: torch.device) -> tuple[str, GroupedMm]:
    """``("grouped_mm", fn)`` where torch's grouped product runs here for ``dtype`` and agrees with the loop on
    random data, else ``("loop", fn)``."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return "loop", _grouped_mm_loop
    gen = torch.Generator().manual_seed(0)
    groups, k, n = 4, 64, 48
    x = torch.randn(10, k, generator=gen).to(device, dtype)
    w = torch.randn(groups, k, n, generator=gen).to(device, dtype)
    offsets = torch.tensor([3, 3, 7, 10], dtype=torch.int32, device=device)
    try:
        got = _grouped_mm_torch(x, w, offsets).float()
    except Exception as e:  # not built for this dtype/device/layout
        log.info("grouped_mm unavailable for %s on %s (%s): experts run in a loop", dtype, device, e)
        return "loop", _grouped_mm_loop
    ref = _grouped_mm_loop(x.float(), w.float(), offsets)
    error = float((got - ref).norm() / ref.norm())
    if not error < (1e-5 if dtype == torch.float32 else 2e-2):
        log.warning("grouped_mm is off by %.2e for %s on %s: experts run in a loop", error, dtype, device)
        return "loop", _grouped_mm_loop
    return "grouped_mm", _grouped_mm_torch


def route(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k], expert ids [T, k])``: the top-k router logits, softmaxed among themselves."""
    if route_topk.small_router_applies(h, weight):
        logits = route_topk.router_logits(h, weight, bias)
    else:
        logits = F.linear(h, weight, bias)
    if route_topk.fused_topk_applies(logits):
        return route_topk.topk_softmax(logits, top_k)
    top, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(top, dim=1, dtype=top.dtype), ids


def experts(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    limit: float,
    alpha: float,
    grouped_mm: GroupedMm,
) -> torch.Tensor:
    """The routed experts' summed output ``[T, hidden]`` for tokens ``h`` [T, hidden].

    ``gate_up`` [E, hidden, 2I] (gate and up columns interleaved), ``down`` [E, I, hidden], biases [E, 2I] /
    [E, hidden]: the checkpoint's own layout (the same matrices in another memory order gave other fp32 roundings).
    """
    num_tokens, top_k = ids.shape
    num_experts = gate_up.shape[0]
    flat_ids = ids.reshape(-1)
    expert_of_row, perm = torch.sort(flat_ids)
    rows = h[perm // top_k]
    # Rows per expert without a host sync (bincount would sync to size its output).
    counts = (expert_of_row[:, None] == torch.arange(num_experts, device=h.device)[None, :]).sum(0)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    gu = grouped_mm(rows, gate_up, offsets)
    gu.add_(gate_up_bias[expert_of_row])
    gate = gu[:, 0::2].clamp(min=None, max=limit)
    up = gu[:, 1::2].clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(gate * alpha)
    act = (up + 1) * glu
    out = grouped_mm(act, down, offsets)
    out.add_(down_bias[expert_of_row])
    out = out * weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return out[inverse].view(num_tokens, top_k, -1).sum(dim=1)


def experts_dense(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor,
    down: torch.Tensor,
    down_bias: torch.Tensor,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """``experts`` computed for every (expert, token) pair, then each token's top-k gathered: no sort and no
    data-dependent shape, any dtype."""
    num_experts, hidden, _ = gate_up.shape
    num_tokens = h.shape[0]
    gu = torch.bmm(h.unsqueeze(0).expand(num_experts, num_tokens, hidden), gate_up)
    gu.add_(gate_up_bias.unsqueeze(1))
    gate = gu[..., 0::2].clamp(min=None, max=limit)
    up = gu[..., 1::2].clamp(min=-limit, max=limit)
    act = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    out = torch.bmm(act, down)
    out.add_(down_bias.unsqueeze(1))  # [E, T, hidden]
    picked = out[ids, torch.arange(num_tokens, device=h.device).unsqueeze(1)]  # [T, k, hidden]
    return (picked * weights.unsqueeze(-1)).sum(dim=1)

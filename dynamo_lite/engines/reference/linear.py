"""Matmuls against fixed weights, in the fastest form the device offers.

On CPU in bfloat16, ``F.linear`` re-packs the weight for oneDNN's AMX kernels on every call, which made a
single-stream decode step ~6x slower than the memory traffic alone; packing each weight once at load time
(``mkldnn._reorder_linear_weight``, what inductor's freezing does) removes that. Everything else (fp32 on CPU,
any dtype on CUDA) uses ``F.linear`` unchanged, which keeps fp32 bit-for-bit comparable with transformers.

Weight-only int8 (``quantization: int8``, CPU, bf16 activations): one decode token reads every weight once, so
a single stream is bound by memory bandwidth; int8 weights with one bf16 scale per output channel halve the bytes
of bf16. torch's int8 kernel (``_weight_int8pack_mm``) is fastest for a few rows but scales poorly with more
(measured on 2 cores: 1 row 16 ms vs 36 ms bf16 for all of SmolLM2's linears, 16 rows 61 vs 30 ms), so steps
of more than ``INT8_MAX_ROWS`` rows use the oneDNN bf16 linear over the *dequantized* weight: both paths
compute the same quantized model, only the kernel differs.

Weight-only int4 (``quantization: int4``): groups of 32 input channels, each with a bf16 scale and zero point
(``w = (q - 8) * scale + zero``), torch's ``_weight_int4pack_mm_for_cpu``: a quarter of bf16's bytes and, on 2
cores, half the int8 kernel's time for a decode token (all of SmolLM2's linears: 7.6 vs 15.7 ms). It is the
format of the default model's own GGUF (Q4_1: 32-weight blocks with a scale and a minimum), so re-quantizing
its dequantized weights lands on (nearly) the same 4-bit grid.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]

INT8_MAX_ROWS = 4  # above this many rows a step is compute-bound and the bf16 kernel wins
INT4_GROUP = 32
INT4_MAX_ROWS = 8  # measured: 8 rows 24.6 ms int4 vs 37.3 bf16 for all linears, 2 cores


@functools.cache
def _onednn_bf16_ok() -> bool:
    """Whether prepacked bf16 linears exist in this torch build and agree with ``F.linear``."""
    try:
        w = torch.randn(32, 64).to(torch.bfloat16)
        x = torch.randn(3, 64).to(torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(y.float(), F.linear(x, w).float(), atol=0.1, rtol=0.05)
    except Exception as e:
        log.info("oneDNN prepacked bf16 linear unavailable (%s); using F.linear", e)
        return False


@functools.cache
def int8_supported() -> bool:
    """Whether this torch build has the CPU weight-only int8 matmul (and it computes what it should)."""
    try:
        w = torch.randn(16, 64)
        x = torch.randn(2, 64).to(torch.bfloat16)
        q, scales = quantize_int8(w)
        y = torch.ops.aten._weight_int8pack_mm(x, q, scales)
        ref = F.linear(x.float(), q.float() * scales.float()[:, None])
        return torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    except Exception as e:
        log.info("weight-only int8 matmul unavailable (%s)", e)
        return False


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scales[:, None]``; scales in bfloat16 (what the
    kernel takes), computed in fp32 and rounded before quantizing so that ``q`` fits the scale it is used with."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


@functools.cache
def int4_supported() -> bool:
    """Whether this torch build has the CPU weight-only int4 matmul (and it computes what it should)."""
    try:
        w = torch.randn(64, 128)
        x = torch.randn(2, 128).to(torch.bfloat16)
        q, scales_zeros = quantize_int4(w)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scales_zeros)
        ref = F.linear(x.float(), dequantize_int4(q, scales_zeros))
        return torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    except Exception as e:
        log.info("weight-only int4 matmul unavailable (%s)", e)
        return False


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of ``INT4_GROUP`` input channels: ``q`` int32 [N, K] in 0..15 and
    ``scales_zeros`` bf16 [K / group, N, 2] with ``w ~= (q - 8) * scale + zero`` (the kernel's layout). Scale and
    zero are rounded to bf16 before ``q`` is computed, so ``q`` fits the values it is used with."""
    w = weight.float()
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 weights need in-features divisible by {INT4_GROUP}, got {k}")
    groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.int32)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q.view(n, k).contiguous(), scales_zeros


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``quantize_int4`` stands for."""
    n, k = q.shape
    scale = scales_zeros[..., 0].t().float()[..., None]  # [N, K / group, 1]
    zero = scales_zeros[..., 1].t().float()[..., None]
    return ((q.view(n, k // INT4_GROUP, INT4_GROUP).float() - 8) * scale + zero).view(n, k)


def make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None = None, quantization: str = "none"
) -> LinearFn:
    """``x -> x @ weight.T + bias`` for a weight that never changes (``quantization="int8"`` / ``"int4"``: the
    weight rounded to int8 per output channel / int4 per group of 32, activations bf16, CPU)."""
    if quantization == "int8":
        return _int8_linear(weight, bias)
    if quantization == "int4":
        return _int4_linear(weight, bias)
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and _onednn_bf16_ok():
        # The batch-size hint only picks a blocking; 1 measured best for decode and no worse for prefill.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        op = torch.ops.mkldnn._linear_pointwise.default

        def packed_linear(x: torch.Tensor) -> torch.Tensor:
            return op(x, packed, bias, "none", [], "")

        return packed_linear

    def linear(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)

    return linear


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    if weight.device.type != "cpu" or not int8_supported():
        raise ValueError("int8 weights need the CPU and a torch with aten._weight_int8pack_mm")
    q, scales = quantize_int8(weight)
    op = torch.ops.aten._weight_int8pack_mm.default
    return _weight_only(lambda x: op(x, q, scales), q.float() * scales.float()[:, None], bias, INT8_MAX_ROWS)


def _int4_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    if weight.device.type != "cpu" or not int4_supported():
        raise ValueError("int4 weights need the CPU and a torch with aten._weight_int4pack_mm_for_cpu")
    q, scales_zeros = quantize_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    return _weight_only(
        lambda x: op(x, packed, INT4_GROUP, scales_zeros),
        dequantize_int4(q, scales_zeros),
        bias,
        INT4_MAX_ROWS,
    )


def _weight_only(
    small: LinearFn, dequantized: torch.Tensor, bias: torch.Tensor | None, max_rows: int
) -> LinearFn:
    """The quantized kernel ``small`` for steps of up to ``max_rows`` rows, the bf16 kernel over the
    ``dequantized`` weight above that: one quantized model, whichever kernel runs it."""
    bias = None if bias is None else bias.to(torch.bfloat16)
    wide = make_linear(dequantized.to(torch.bfloat16), bias)

    def weight_only_linear(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > max_rows:
            return wide(x)
        y = small(x)
        return y if bias is None else y.add_(bias)

    return weight_only_linear

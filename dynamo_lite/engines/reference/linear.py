"""Matmuls against fixed weights, in the fastest form the device offers.

On CPU in bfloat16, ``F.linear`` re-packs the weight for oneDNN's AMX kernels on every call, which made a
single-stream decode step ~6x slower than the memory traffic alone; packing each weight once at load time
(``mkldnn._reorder_linear_weight``, what inductor's freezing does) removes that. Everything else (fp32 on CPU,
any dtype on CUDA) uses ``F.linear`` unchanged, which keeps fp32 bit-for-bit comparable with transformers.

Weight-only int8 (``quantization: int8``, CPU): one decode token reads every weight once, so a single stream is
bound by memory bandwidth; int8 weights with one bf16 scale per output channel halve the bytes of bf16 (a
quarter of fp32's). torch's int8 kernel (``_weight_int8pack_mm``) is fastest for a few rows but scales poorly
with more (measured on 2 cores: 1 row 16 ms vs 36 ms bf16 for all of SmolLM2's linears, 16 rows 61 vs 30 ms), so
steps of more than ``max_rows(...)`` rows use the model dtype's own linear (oneDNN bf16, or fp32 ``F.linear``)
over the *dequantized* weight: both paths compute the same quantized model, only the kernel differs, and prefill
runs at the unquantized model's speed.

Weight-only int4 (``quantization: int4``): groups of 32 input channels, each with a bf16 scale and zero point
(``w = (q - 8) * scale + zero``), torch's ``_weight_int4pack_mm_for_cpu``: a quarter of bf16's bytes and, on 2
cores, half the int8 kernel's time for a decode token (all of SmolLM2's linears: 7.6 vs 15.7 ms). It is the
format of the default model's own GGUF (Q4_1: 32-weight blocks with a scale and a minimum), so re-quantizing
its dequantized weights lands on (nearly) the same 4-bit grid.

Both weight-only kernels take their input rows in bf16 whatever the model's dtype (``KERNEL_DTYPE``): torch
vectorizes them (AVX2 and AVX-512 alike) only for bf16 and fp16 inputs, and widens to fp32 inside, so bf16 is a
storage format there, not emulated arithmetic. With fp32 inputs they fall back to a scalar loop: 10-15x slower on
an AVX2 EPYC (all of SmolLM2's linears for one token, 1 thread: int4 474 ms with fp32 rows vs 31 ms with bf16).
An fp32 model (``dtype: auto`` on a CPU without native bf16) hands them its rows rounded to bf16 and takes fp32
back; its prefill, attention, norms and KV cache stay fp32.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]

INT4_GROUP = 32
KERNEL_DTYPE = torch.bfloat16  # the weight-only kernels' input rows and scales (see the module docstring)
# Up to this many rows a step takes the weight-only kernel; above it the step is compute-bound and the model
# dtype's own linear over the dequantized weight wins. Per (quantization, model dtype), measured on 2 cores over
# all of SmolLM2's linears: bf16 model (AMX Xeon): int8 1 row 16 ms vs 36 bf16, 16 rows 61 vs 30; int4 8 rows
# 24.6 vs 37.3. fp32 model (AVX2 EPYC, bf16 rows): int4 1 row 20 ms vs 51 dense fp32, 8 rows 61 vs 85;
# int8 1 row 19 ms, 4 rows 28 (benchmarks.weight_only_rows).
MAX_ROWS = {
    ("int8", torch.bfloat16): 4,
    ("int4", torch.bfloat16): 8,
    ("int8", torch.float32): 4,
    ("int4", torch.float32): 8,
}


def max_rows(quantization: str, dtype: torch.dtype) -> int:
    """Rows up to which ``quantization``'s kernel runs in a model of ``dtype``."""
    return MAX_ROWS[(quantization, dtype)]


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
    weight rounded to int8 per output channel / int4 per group of 32, CPU; ``weight.dtype``, float32 or
    bfloat16, is the model's: what the layer takes and returns)."""
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


def _model_dtype(weight: torch.Tensor, quantization: str, supported: Callable[[], bool]) -> torch.dtype:
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or not supported():
        raise ValueError(
            f"{quantization} weights need the CPU, a float32 or bfloat16 model and a torch with the weight-only "
            f"{quantization} matmul (got {weight.dtype} on {weight.device})"
        )
    return weight.dtype


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    dtype = _model_dtype(weight, "int8", int8_supported)
    q, scales = quantize_int8(weight)
    op = torch.ops.aten._weight_int8pack_mm.default
    dequantized = q.float() * scales.float()[:, None]
    return _weight_only(lambda x: op(x, q, scales), dequantized, bias, dtype, max_rows("int8", dtype))


def _int4_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    dtype = _model_dtype(weight, "int4", int4_supported)
    q, scales_zeros = quantize_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    return _weight_only(
        lambda x: op(x, packed, INT4_GROUP, scales_zeros),
        dequantize_int4(q, scales_zeros),
        bias,
        dtype,
        max_rows("int4", dtype),
    )


def _weight_only(
    small: LinearFn, dequantized: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, rows: int
) -> LinearFn:
    """The quantized kernel ``small`` (bf16 rows in and out) for steps of up to ``rows`` rows, the ``dtype``
    kernel over the ``dequantized`` weight above that: one quantized model, whichever kernel runs it."""
    bias = None if bias is None else bias.to(dtype)
    wide = make_linear(dequantized.to(dtype), bias)

    def weight_only_linear(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > rows:
            return wide(x)
        y = small(x.to(KERNEL_DTYPE)).to(dtype)  # no copies in a bf16 model
        return y if bias is None else y.add_(bias)

    return weight_only_linear

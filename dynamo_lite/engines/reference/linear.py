"""Matmuls against fixed weights, in the fastest form the device offers.

On CPU in bfloat16, ``F.linear`` re-packs the weight for oneDNN's AMX kernels on every call, which made a
single-stream decode step ~6x slower than the memory traffic alone; packing each weight once at load time
(``mkldnn._reorder_linear_weight``, what inductor's freezing does) removes that. Everything else (fp32 on CPU,
any dtype on CUDA) uses ``F.linear`` unchanged, which keeps fp32 bit-for-bit comparable with transformers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]


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


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearFn:
    """``x -> x @ weight.T + bias`` for a weight that never changes."""
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

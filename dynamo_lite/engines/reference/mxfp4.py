"""MXFP4 expert weights as gpt-oss checkpoints store them, dequantized at load.

A checkpoint keeps each expert projection as ``*_blocks`` ``[experts, out, in / 32, 16]`` uint8 (two FP4 e2m1
values a byte, low nibble first) and ``*_scales`` ``[experts, out, in / 32]`` uint8 (an exponent per block of 32
values, biased by 127). The value is ``FP4[nibble] * 2 ** (scale - 127)``; the result here is ``[experts, out,
in]`` (output rows, like ``nn.Linear.weight``). The arithmetic is the one transformers uses (its
``convert_moe_packed_tensors``: the FP4 table in the target dtype, then ``ldexp``), so the two agree bit for bit,
NaN and infinity from extreme exponents included.
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""e2m1: sign, two exponent bits, one mantissa bit."""

_ROWS_PER_CHUNK = 1 << 20  # blocks dequantized at a time: bounds the temporaries (4 bytes an index)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[*prefix, groups, 16]`` blocks and ``[*prefix, groups]`` scales -> ``[*prefix, groups * 32]`` in ``dtype``
    (on ``device``, default the blocks')."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    device = torch.device(device) if device is not None else blocks.device
    *prefix, groups, width = blocks.shape
    rows = blocks.reshape(-1, width).to(device=device, dtype=torch.uint8)
    exponents = scales.reshape(-1, 1).to(device=device, dtype=torch.int32) - 127
    table = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    out = torch.empty(rows.shape[0], width * 2, dtype=dtype, device=device)
    for r0 in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        r1 = min(r0 + _ROWS_PER_CHUNK, rows.shape[0])
        chunk, part = rows[r0:r1], out[r0:r1]
        part[:, 0::2] = table[(chunk & 0x0F).to(torch.int)]
        part[:, 1::2] = table[(chunk >> 4).to(torch.int)]
        torch.ldexp(part, exponents[r0:r1], out=part)
    return out.view(*prefix, groups * width * 2)

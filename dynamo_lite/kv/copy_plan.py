"""Copy planning: the fewest pitched copies (``cudaMemcpy2DAsync``) that move a tensor between two strided
layouts — a hold (C-contiguous) into a cache slot. Pure arithmetic, tested without a GPU."""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Copy2D:
    """One pitched copy, all in bytes: ``height`` rows of ``width`` bytes."""

    dst_offset: int
    dst_pitch: int
    src_offset: int
    src_pitch: int
    width: int
    height: int


MAX_PITCH = (1 << 31) - 1  # cudaMemcpy2D refuses larger pitches (cudaDevAttrMaxPitch)


def plan_copies(
    shape: tuple[int, ...],
    dst_strides: tuple[int, ...],
    src_strides: tuple[int, ...],
    itemsize: int,
    max_pitch: int = MAX_PITCH,
) -> list[Copy2D]:
    """The fewest pitched copies that move a ``shape`` tensor between two strided layouts (strides in
    elements; the innermost dimension must be dense in both). Dimensions that are contiguous with their
    inner neighbour in both layouts are merged first; of what is left, the largest outer dimension whose
    pitches stay within ``max_pitch`` becomes the copies' rows and the others are looped over."""
    if not (len(shape) == len(dst_strides) == len(src_strides)):
        raise ValueError("shape and strides disagree")
    dims = [(n, d, s) for n, d, s in zip(shape, dst_strides, src_strides, strict=True) if n != 1]
    if any(n == 0 for n in shape):
        return []
    if not dims:
        return [Copy2D(0, itemsize, 0, itemsize, itemsize, 1)]
    merged = [dims[-1]]
    for n, d, s in reversed(dims[:-1]):
        inner_n, inner_d, inner_s = merged[0]
        if d == inner_n * inner_d and s == inner_n * inner_s:
            merged[0] = (n * inner_n, inner_d, inner_s)
        else:
            merged.insert(0, (n, d, s))
    inner_n, inner_d, inner_s = merged[-1]
    if inner_d != 1 or inner_s != 1:
        raise ValueError("the innermost dimension must be contiguous in both layouts")
    width = inner_n * itemsize
    outer = merged[:-1]
    if not outer:
        return [Copy2D(0, width, 0, width, width, 1)]
    fits = [i for i, (_, d, s) in enumerate(outer) if max(d, s) * itemsize <= max_pitch]
    if fits:
        rows_at = max(fits, key=lambda i: outer[i][0])
        rows, row_d, row_s = outer[rows_at]
    else:  # every pitch too large: one row per copy
        rows_at, rows, row_d, row_s = -1, 1, 0, 0
    loops = [dim for i, dim in enumerate(outer) if i != rows_at]
    copies: list[Copy2D] = []

    def walk(level: int, d_off: int, s_off: int) -> None:
        if level == len(loops):
            d_pitch, s_pitch = (row_d * itemsize, row_s * itemsize) if rows > 1 else (width, width)
            copies.append(Copy2D(d_off * itemsize, d_pitch, s_off * itemsize, s_pitch, width, rows))
            return
        n, d, s = loops[level]
        for i in range(n):
            walk(level + 1, d_off + i * d, s_off + i * s)

    walk(0, 0, 0)
    return copies


@functools.lru_cache(maxsize=256)
def _cached_plan(shape: tuple[int, ...], dst_strides: tuple[int, ...], itemsize: int) -> tuple[Copy2D, ...]:
    """``plan_copies`` from a C-contiguous hold, memoized: a decode worker sees the same few layouts."""
    return tuple(plan_copies(shape, dst_strides, contiguous_strides(shape), itemsize))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))

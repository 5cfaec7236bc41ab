"""One-kernel strided copies on a GPU: the KV of a hold into a cache slot, as rows of a few hundred KiB.

A slot's KV is ``layers x 2 x kv_heads`` separate runs (its tokens of one head), so the copy engine path
(``cudaMemcpy2DAsync``) issues one pitched copy per layer and K/V, each a few MiB. On one H100 those reached 60-77 %
of a contiguous copy of the same bytes (822 / 1132 GB/s for 2k / 8k-token Llama-3.2-1B KV vs 1350 / 1475), timed
on the GPU. This copies every row in one Triton launch (programs = rows x chunks of 16 KiB, 16-byte loads and
stores): 95 % of the contiguous copy. ``benchmarks/gpu/kv_handoff_cuda.py`` measures both.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynamo_lite.kv.copy_plan import Copy2D

log = logging.getLogger(__name__)

WORD = 4  # bytes per element the kernel moves (int32); rows and offsets must be 16-byte aligned
ALIGN = 16
BLOCK_WORDS = 4096  # 16 KiB per program
_MAX_TABLES = 64  # row tables kept per process (one per prompt length seen recently, per device)


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, or None where Triton can't be imported."""
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # no triton (CPU builds): callers use the copy engine
        log.info("Triton unavailable, KV copies use cudaMemcpy2DAsync: %s", e)
        return None

    @triton.jit
    def copy_rows(dst, src, dst_rows, src_rows, row_words, BLOCK: tl.constexpr):  # noqa: ANN001, N803
        row = tl.program_id(0)
        start = tl.program_id(1) * BLOCK
        d = tl.multiple_of(tl.load(dst_rows + row), 4)
        s = tl.multiple_of(tl.load(src_rows + row), 4)
        offs = start + tl.arange(0, BLOCK)
        mask = offs < row_words
        words = tl.load(src + s + offs, mask=mask, cache_modifier=".cg")
        tl.store(dst + d + offs, words, mask=mask, cache_modifier=".cs")

    return copy_rows


def available() -> bool:
    return _kernel() is not None


class _Pointer:
    """A raw device address as a Triton pointer argument (Triton reads ``data_ptr()`` and ``dtype``): no
    tensor has to be built around another process's memory for each copy."""

    __slots__ = ("_address",)

    def __init__(self, address: int) -> None:
        self._address = address

    def data_ptr(self) -> int:
        return self._address

    @property
    def dtype(self) -> Any:
        import torch

        return torch.int32


@dataclass(frozen=True, slots=True, eq=False)
class RowTable:
    """Where each row goes and comes from (int64 word offsets on the GPU) and its length in words."""

    dst_rows: Any
    src_rows: Any
    row_words: int

    @property
    def num_rows(self) -> int:
        return int(self.dst_rows.shape[0])


_tables_lock = threading.Lock()
_tables: OrderedDict[tuple, RowTable | None] = OrderedDict()


def row_table(plan: tuple[Copy2D, ...], device_index: int) -> RowTable | None:
    """The rows of ``plan``'s pitched copies as a table on GPU ``device_index`` (cached: one per prompt length
    and cache layout); None when the kernel can't run them (no Triton, rows not 16-byte aligned)."""
    key = (device_index, plan)
    with _tables_lock:
        if key in _tables:
            _tables.move_to_end(key)
            return _tables[key]
    table = _build_table(plan, device_index)
    with _tables_lock:
        _tables[key] = table
        while len(_tables) > _MAX_TABLES:
            _tables.popitem(last=False)
    return table


def _build_table(plan: tuple[Copy2D, ...], device_index: int) -> RowTable | None:
    if not plan or not available():
        return None
    width = plan[0].width
    rows = [
        (c.dst_offset + r * c.dst_pitch, c.src_offset + r * c.src_pitch)
        for c in plan
        for r in range(c.height)
    ]
    if any(c.width != width for c in plan) or width % ALIGN or any(d % ALIGN or s % ALIGN for d, s in rows):
        return None
    import torch

    words = torch.tensor(rows, dtype=torch.int64).div_(WORD, rounding_mode="floor")
    dev = torch.device("cuda", device_index)
    return RowTable(words[:, 0].contiguous().to(dev), words[:, 1].contiguous().to(dev), width // WORD)


def copy_rows(table: RowTable, dst: int, src: int, device_index: int) -> bool:
    """Launch the copy of every row of ``table`` from address ``src`` to ``dst`` on ``device_index``'s current
    stream (the caller made that device current). False (nothing done) when a base isn't 16-byte aligned."""
    if dst % ALIGN or src % ALIGN:
        return False
    kernel = _kernel()
    grid = (table.num_rows, -(-table.row_words // BLOCK_WORDS))
    kernel[grid](
        _Pointer(dst),
        _Pointer(src),
        table.dst_rows,
        table.src_rows,
        table.row_words,
        BLOCK=BLOCK_WORDS,
        num_warps=4,
    )
    return True

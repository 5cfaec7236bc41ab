"""gpt-oss's experts with their weights kept as MXFP4 (the checkpoint's format) and dequantized inside the matmul.

An ``Mxfp4Experts`` holds one projection of every expert exactly as a checkpoint stores it: ``blocks`` ``[E, N,
K / 2]`` uint8 (two e2m1 values a byte, low nibble first: input ``2j`` then ``2j + 1``) and ``scales`` ``[E, N,
K / 32]`` uint8 (a power-of-two exponent per 32 inputs, biased by 127), ``N`` output rows like
``nn.Linear.weight``. 4.25 bits a weight: gpt-oss-120b's experts are 60.9 GB instead of 229 GB in bf16. On CUDA
the packed values are stored as ``mxfp4_words`` instead (the same bits permuted within 32-bit words at load, so
the kernels unpack them in ~1.6 instructions a weight, and the inputs ordered as Hopper's MMA takes them from
registers; ``for_kernels``).

``experts_mxfp4`` is an ``moe.ExpertsFn``: the (token, expert) pairs are sorted by expert and each expert's rows
padded to the kernel's row block (``align_pairs``: torch ops with shapes fixed by the token count, no host sync,
so a decode step stays capturable in a CUDA graph); one Triton kernel runs gate_up over each expert's rows with
the weights unpacked to bf16 in registers, adds the bias and applies gpt-oss's clamped SwiGLU before anything is
written; a second runs down, adds its bias and multiplies by the router weight; the top-k rows of a token are then
summed. Weights are read once per (expert, row block): at decode sizes once per step.

``experts_mxfp4_reference`` computes the same on any device by dequantizing only the experts a step routed to, one
at a time (no dequantized copy of the model ever exists): the CPU path, and the reference the kernel is checked
against.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from dynamo_lite.engines.reference import mxfp4_words
from dynamo_lite.engines.reference.mxfp4 import dequantize_mxfp4

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU machines: the reference path serves
    HAVE_TRITON = False

BLOCK = 32  # inputs per scale
# Triton's interpreter (TRITON_INTERPRET=1, how the kernels are tested on CPUs) multiplies bf16 operands of
# tl.dot as their raw bits: under it the products always run in fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True, slots=True)
class Mxfp4Experts:
    """One projection of every expert in MXFP4: ``blocks`` [E, N, K / 2] uint8 (or, ``words``, [E, N, K / 8] int32
    in ``mxfp4_words``' layout), ``scales`` [E, N, K / 32] uint8."""

    blocks: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def from_checkpoint(cls, blocks: torch.Tensor, scales: torch.Tensor) -> Mxfp4Experts:
        """From a checkpoint's ``*_blocks`` [E, N, K / 32, 16] and ``*_scales`` [E, N, K / 32]."""
        if blocks.dim() != 4 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
            raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
        e, n, groups, width = blocks.shape
        return cls(blocks.reshape(e, n, groups * width).contiguous(), scales.contiguous())

    @property
    def num_experts(self) -> int:
        return self.blocks.shape[0]

    @property
    def out_features(self) -> int:
        return self.blocks.shape[1]

    @property
    def in_features(self) -> int:
        return self.blocks.shape[2] * (8 if self.words else 2)

    @property
    def words(self) -> bool:
        """Whether the packed values are 32-bit words pre-arranged for the kernels (``as_words``)."""
        return self.blocks.dtype == torch.int32

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size() + self.scales.numel()

    def n_major(self) -> Mxfp4Experts:
        """The same weights with the packed values stored output-rows-innermost (``blocks.stride(1) == 1``; the
        scales as they are): a copy whose ``[E, N, K / 2]`` view the kernels read through its strides."""
        if self.words:
            raise ValueError("MXFP4 words are stored inputs-innermost only")
        return Mxfp4Experts(self.blocks.transpose(1, 2).contiguous().transpose(1, 2), self.scales)

    def with_aligned_scales(self) -> Mxfp4Experts:
        """The scales' rows stored 16-byte aligned (padded with 127, a scale of 1) so the kernels can read them as
        32-bit words: +6.7 % scale bytes for gpt-oss's 90 blocks a row (+0.4 % of the experts)."""
        if self.scales_word_aligned():
            return self
        e, n, groups = self.scales.shape
        padded = torch.full((e, n, -(-groups // 16) * 16), 127, dtype=torch.uint8, device=self.scales.device)
        padded[..., :groups] = self.scales
        return Mxfp4Experts(self.blocks, padded[..., :groups])

    def as_words(self) -> Mxfp4Experts:
        """The packed values as ``mxfp4_words``' 32-bit words (1.6 unpacking instructions a weight instead of ~6),
        where every scale allows it (``mxfp4_words.words_fit``); else as they are."""
        if self.words or self.blocks.stride(2) != 1 or not mxfp4_words.words_fit(self.scales):
            return self
        return Mxfp4Experts(mxfp4_words.to_words(self.blocks), self.scales)

    def as_bytes(self) -> Mxfp4Experts:
        """The packed values in the checkpoint's byte order (``as_words`` undone)."""
        return Mxfp4Experts(mxfp4_words.from_words(self.blocks), self.scales) if self.words else self

    def scales_word_aligned(self) -> bool:
        """Whether every row of scales starts 16-byte aligned with the inputs innermost (a row's last word may
        reach into the padding: ``with_aligned_scales`` fills it with 127)."""
        sc = self.scales
        return (
            sc.stride(2) == 1
            and sc.stride(1) % 16 == 0
            and sc.stride(0) % 16 == 0
            and sc.data_ptr() % 16 == 0
        )

    def expert_nbytes(self) -> int:
        """Bytes of one expert's projection (what a step reads per routed expert)."""
        return self.nbytes // self.num_experts

    def dequantize(self, dtype: torch.dtype, experts: slice | int = slice(None)) -> torch.Tensor:
        """``[E', K, N]`` (inputs first, the dense experts' layout) in ``dtype`` for ``experts``."""
        blocks = self.blocks[experts]
        if self.words:
            blocks = mxfp4_words.from_words(blocks)
        scales = self.scales[experts]
        w = dequantize_mxfp4(blocks.reshape(*scales.shape, BLOCK // 2), scales, dtype)  # [.., N, K]
        return w.transpose(-1, -2).contiguous()  # the layout transformers' dequantized experts have


def _swiglu(gu: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    gate = gu[..., 0::2].clamp(min=None, max=limit)
    up = gu[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_mxfp4_reference(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: Mxfp4Experts,
    gate_up_bias: torch.Tensor,
    down: Mxfp4Experts,
    down_bias: torch.Tensor,
    limit: float,
    alpha: float,
) -> torch.Tensor:
    """The routed experts' summed output ``[T, hidden]``, each routed expert dequantized to ``h``'s dtype on its
    own (one expert's weights at a time in memory; a host sync per step: no CUDA graphs)."""
    num_tokens, top_k = ids.shape
    out = torch.zeros(num_tokens, h.shape[1], dtype=torch.float32, device=h.device)
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().squeeze(1)
        tokens = pairs // top_k
        w_gu = gate_up.dequantize(h.dtype, e)  # [K, 2I]
        act = _swiglu(h[tokens] @ w_gu + gate_up_bias[e], limit, alpha)
        y = act @ down.dequantize(h.dtype, e) + down_bias[e]
        out.index_add_(0, tokens, y.float() * weights.reshape(-1)[pairs, None].float())
    return out.to(h.dtype)


# ---- the Triton path (CUDA) --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tile sizes of one launch: rows per expert block, output columns and inputs per iteration, warps, stages;
    and, for weights in the checkpoint's bytes, whether bf16 products go through ``tl.dot_scaled`` (the compiler's
    own e2m1 unpacking) or the weights are unpacked by our bit arithmetic first (``_dequant_tile``, also the fp32
    and interpreter path). Weights as ``mxfp4_words`` always take the words' own unpacking."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    scaled_dot: bool = True
    swap_ab: bool = False  # the weights on the MMA's M side (decode: few rows, many columns)
    # Programs per (row block, column block), each over 1/split_k of the inputs: at decode sizes a launch has few
    # row blocks, and more, shorter programs keep more weight bytes in flight. Partial sums go to fp32 buffers
    # indexed by pair (no atomics: the sum's order is fixed, the result deterministic).
    split_k: int = 1
    # Read the scales as 32-bit words (4 blocks of 32 inputs each; needs block_k % 128 == 0 and rows stored
    # 16-byte aligned: ``Mxfp4Experts.with_aligned_scales``). The compiler pipelines the weights' and activations'
    # loads through shared memory but not byte-wide scale loads (below cp.async's 4 bytes a thread): each K step
    # would wait a full memory latency for its scales.
    scale_words: bool = False
    # Launch order: all column blocks of a row block before the next row block (prefill). By default the row
    # blocks go first, so a row block's activations are read again from HBM for every column block (at 16k tokens
    # of the 120b layer ~13 GB a layer); column-first, the programs in flight share them through L2, and an
    # expert's row blocks, being adjacent, still share its weight tiles.
    columns_first: bool = False
    # The down kernel's own split (None: ``split_k``): at one token the gate_up kernel (twice the columns) has
    # programs enough unsplit, while the down kernel still gains from shorter ones.
    down_split_k: int | None = None
    # One routed pair a row block, its expert read from the router's ids: no grouping program (one-token steps,
    # whose k experts are distinct; a pair sharing an expert with another would read its weights twice).
    pair_blocks: bool = False


# By rows per expert (token pairs / experts): decode sizes read each expert's weights once and are bound by
# memory bandwidth; prefill sizes reuse each weight tile over many rows and are bound by the tensor cores.
# Picked by `benchmarks.gpu.gpt_oss_mxfp4 kernel` on an H100, 2026-12-07 (120b layer, ms): 64 tokens 1.212 vs
# 1.390 with byte-read scales; 8 tokens 0.356 vs 0.385; 1 token the small config 0.083 (word-read scales with these
# K-innermost weights 0.097); 16384 tokens (prefill) 12.63 vs 13.35.
DECODE_CONFIG = KernelConfig(
    block_m=16, block_n=128, block_k=128, num_warps=4, num_stages=3, scale_words=True
)
# One token a step (top-4: four row blocks), a launch has few programs: its own tiles.
SMALL_DECODE_CONFIG = KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
SMALL_DECODE_UP_TO_PAIRS = 4
PREFILL_CONFIG = KernelConfig(
    block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3, scale_words=True
)
PREFILL_FROM_ROWS_PER_EXPERT = 24


# The same sizes with the weights as ``mxfp4_words`` (what CUDA loads; unpacked by our PTX, ~1.6 instructions a
# weight against ~6 for the compiler's e2m1): the weights on the MMA's left side win at every decode size. Picked
# by sweeps like `benchmarks.gpu.gpt_oss_mxfp4 words` on an H100, 2026-12-07 (120b layer, ms, words vs the byte
# configs above): 1 token 0.060 vs 0.086; 8 tokens 0.264 vs 0.359; 64 tokens 0.868 vs 1.215; 256 tokens 0.999 vs
# 1.377; 4096 tokens 3.436 vs 4.310; 16384 tokens 10.09 vs 12.47 (323 TFLOP/s; such steps now take
# WORDS_LONG_PREFILL_CONFIG below: 8.69 ms).
# One token: gate_up unsplit, down split-K 2, no grouping program. The kernels timed apart (120b layer, H100,
# 2026-12-07, µs, 10 launches a graph): gate_up 25.8 unsplit vs 28.5 split 2 (with its SwiGLU pass), down 14.0
# split 2 vs 15.5 split 4 and more unsplit; before that one split 2 for both (0.0567 vs 0.0597 ms unsplit).
# Since the words are stored in the MMA operand's order (``mxfp4_words.input_order``, ``_mma_rows``; an H100,
# 2026-12-07), tiles of 128 inputs a step feed the MMA from registers: 1 token 0.0425 ms (128 inputs, 4 stages) vs
# 0.0561 (256 inputs); 64 tokens 0.724 ms with 8 stages (2.05 TB/s of MXFP4 bytes) vs 0.747 (6 stages) and 0.778
# (4), 0.881 before the order; 8 and 256 tokens 8 stages too (0.213 / 0.990 ms).
WORDS_SMALL_DECODE_CONFIG = KernelConfig(
    block_m=16,
    block_n=64,
    block_k=128,
    num_warps=4,
    num_stages=4,
    scaled_dot=False,
    swap_ab=True,
    split_k=1,
    scale_words=True,
    down_split_k=2,
    pair_blocks=True,
)
WORDS_DECODE_CONFIG = KernelConfig(
    block_m=16,
    block_n=64,
    block_k=128,
    num_warps=4,
    num_stages=8,
    scaled_dot=False,
    swap_ab=True,
    scale_words=True,
)
WORDS_PREFILL_CONFIG = KernelConfig(
    block_m=128,
    block_n=256,
    block_k=128,
    num_warps=8,
    num_stages=3,
    scaled_dot=False,
    scale_words=True,
    columns_first=True,
)


# Long prompts' steps (16k tokens of the 120b layer: 512 rows an expert): the weights on the MMA's left side, where
# the unpacked words feed it from registers, columns first. H100, 2026-12-07 (ms): 16384 tokens 8.69 vs 9.99 for
# WORDS_PREFILL_CONFIG (10.39 in row-blocks-first order); 4096 tokens (128 rows an expert) 3.61 vs 3.44.
WORDS_LONG_PREFILL_CONFIG = KernelConfig(
    block_m=256,
    block_n=128,
    block_k=128,
    num_warps=8,
    num_stages=3,
    scaled_dot=False,
    swap_ab=True,
    scale_words=True,
    columns_first=True,
)
LONG_PREFILL_FROM_ROWS_PER_EXPERT = 256


def pick_config(num_pairs: int, num_experts: int, words: bool = False) -> KernelConfig:
    """The tiles for a launch of ``num_pairs`` (token, expert) rows over ``num_experts``, by weight layout."""
    if num_pairs <= SMALL_DECODE_UP_TO_PAIRS:
        return WORDS_SMALL_DECODE_CONFIG if words else SMALL_DECODE_CONFIG
    if num_pairs < PREFILL_FROM_ROWS_PER_EXPERT * num_experts:
        return WORDS_DECODE_CONFIG if words else DECODE_CONFIG
    if words and num_pairs >= LONG_PREFILL_FROM_ROWS_PER_EXPERT * num_experts:
        return WORDS_LONG_PREFILL_CONFIG
    return WORDS_PREFILL_CONFIG if words else PREFILL_CONFIG


def prefill_token_classes(num_experts: int, top_k: int) -> tuple[int, ...]:
    """Prompt lengths whose prefill steps between them use every kernel variant a prefill step can: the decode
    tiles with the largest grouping program, the prefill tiles, the long-prefill tiles (CUDA warms these up)."""
    pairs = (ALIGN_PAIR_CLASSES[1] + 1, PREFILL_FROM_ROWS_PER_EXPERT * num_experts,
             LONG_PREFILL_FROM_ROWS_PER_EXPERT * num_experts)  # fmt: skip
    return tuple(-(-p // top_k) for p in pairs)


FUSED_ALIGN_MAX_PAIRS = 4096  # up to this many (token, expert) pairs the grouping runs as one Triton program
ALIGN_PAIR_CLASSES = (
    16,
    256,
    FUSED_ALIGN_MAX_PAIRS,
)  # its program's sizes: the smallest class that holds the pairs
_align_scratch: dict[tuple[torch.device, int], torch.Tensor] = {}


def _align_fused(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    blocks = min(num_pairs, triton.cdiv(num_pairs, block_m) + num_experts)
    # The program's sizes by class of pair counts, not each count's power of two: one compiled kernel per class.
    most_pairs = next(c for c in ALIGN_PAIR_CLASSES if num_pairs <= c)
    most_blocks = min(most_pairs, triton.cdiv(most_pairs, block_m) + num_experts)
    e_pow2 = triton.next_power_of_2(num_experts)
    key = (flat.device, e_pow2)
    scratch = _align_scratch.get(key)
    if (
        scratch is None
    ):  # persistent (CUDA graphs capture its address); the kernel leaves its counters at zero
        scratch = _align_scratch[key] = torch.zeros(2 * e_pow2, dtype=torch.int32, device=flat.device)
    sorted_pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=flat.device)
    _align_kernel[(1,)](
        flat,
        sorted_pairs,
        block_expert,
        scratch,
        num_pairs,
        blocks,
        E=num_experts,
        E_POW2=e_pow2,
        BLOCK_M=block_m,
        P_POW2=most_pairs,
        NB_POW2=triton.next_power_of_2(most_blocks),
        ROWS_POW2=triton.next_power_of_2(most_blocks * block_m),
        num_warps=4,
    )
    return sorted_pairs, block_expert, num_pairs


_fused_align_failed = False


def _align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The one-program grouping where it applies, else (and for good once it failed to build here) torch's."""
    global _fused_align_failed
    if ids.numel() <= FUSED_ALIGN_MAX_PAIRS and not _fused_align_failed:
        try:
            return _align_fused(ids, num_experts, block_m)
        except Exception as e:  # a Triton without histogram/atomics support: same grouping, more launches
            _fused_align_failed = True
            log.warning("MXFP4 experts: one-program row grouping unavailable (%s); torch ops instead", e)
    return align_pairs(ids, num_experts, block_m)


def align_pairs(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The (token, expert) pairs grouped by expert, each expert's group padded to ``block_m`` rows.

    Returns ``sorted_pairs`` [padded] (pair ids ``token * top_k + j``; padding holds ``num_pairs``),
    ``block_expert`` [blocks] (the expert of each ``block_m`` rows, -1 past the last) and ``num_pairs``. Shapes
    depend on ``ids.shape`` alone and nothing is read back to the host.
    """
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    dev = flat.device
    expert_sorted, order = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    start = torch.cumsum(counts, 0) - counts
    dest = pad_start[expert_sorted] + torch.arange(num_pairs, device=dev) - start[expert_sorted]
    # Every block holds at least one pair, and at most one block per expert is partly padding.
    blocks = min(num_pairs, (num_pairs + block_m - 1) // block_m + num_experts)
    sorted_pairs = torch.full((blocks * block_m,), num_pairs, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert, num_pairs


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
    def _align_kernel(
        ids_ptr,
        sorted_ptr,
        block_expert_ptr,
        scratch_ptr,
        num_pairs,
        num_blocks,
        E: tl.constexpr,
        E_POW2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        P_POW2: tl.constexpr,
        NB_POW2: tl.constexpr,
        ROWS_POW2: tl.constexpr,
    ):
        """``align_pairs`` in one program (decode sizes: one launch instead of a dozen small torch ops). Rows
        within an expert's group come in the order the atomics hand out, which changes no row's result.
        ``scratch`` holds [E_POW2] group starts and [E_POW2] counters, zero on entry and left zero."""
        offs = tl.arange(0, P_POW2)
        valid = offs < num_pairs
        experts = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int32)
        counts = tl.histogram(experts, E_POW2, mask=valid)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, 0)
        e_offs = tl.arange(0, E_POW2)
        tl.store(scratch_ptr + e_offs, pad_end - padded)
        blocks = tl.arange(0, NB_POW2)
        block_expert = tl.sum((pad_end[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(
            block_expert_ptr + blocks, tl.where(block_expert < E, block_expert, -1), mask=blocks < num_blocks
        )
        rows = tl.arange(0, ROWS_POW2)
        tl.store(
            sorted_ptr + rows, tl.full([ROWS_POW2], 0, tl.int32) + num_pairs, mask=rows < num_blocks * BLOCK_M
        )
        tl.debug_barrier()
        start = tl.load(scratch_ptr + experts, mask=valid, other=0)
        slot = tl.atomic_add(scratch_ptr + E_POW2 + experts, 1, mask=valid)
        tl.store(sorted_ptr + start + slot, offs, mask=valid)
        tl.debug_barrier()
        tl.store(scratch_ptr + E_POW2 + e_offs, 0)

    @triton.jit
    def _load_scales(s_base, stride_sk, n_ok, groups, K: tl.constexpr, WORDS: tl.constexpr):
        """The [rows, groups] exponents of ``groups`` (127, i.e. 2^0, past K). ``WORDS``: read as 32-bit words of
        4 groups (K-contiguous rows, 16-byte aligned), which the compiler copies asynchronously, pipelined."""
        if WORDS:
            G: tl.constexpr = groups.shape[0]
            first = tl.min(tl.reshape(groups, [G // 4, 4]), axis=1)  # each word's first group
            ptrs = (s_base + first[None, :]).to(tl.pointer_type(tl.int32), bitcast=True)
            # Past K the whole word reads as 127s; the aligned rows' padding holds 127 too (see the weights'
            # masked-off zeros: any finite scale keeps them zero).
            w = tl.load(ptrs, mask=n_ok[:, None] & (first < K // 32)[None, :], other=0x7F7F7F7F)
            b = (w[:, :, None] >> (tl.arange(0, 4) * 8)[None, None, :]) & 0xFF
            return tl.reshape(b, [w.shape[0], G]).to(tl.uint8)
        mask = n_ok[:, None] & (groups < K // 32)[None, :]
        return tl.load(s_base + groups[None, :] * stride_sk, mask=mask, other=127)

    @triton.jit
    def _dequant_tile(w_ptrs, s_ptrs, mask, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_N, BLOCK_K] weights (fp32 values exact in bf16, cast to bf16) from [BLOCK_N, BLOCK_K / 2] packed
        bytes and their blocks' exponents, one per byte (``s_ptrs`` repeats each block's). An e2m1 nibble ``s ee
        m`` is ``2^(ee - 1) (1 + m / 2)`` (``m / 2`` for ``ee = 0``) times ``2^(scale - 127)``: its bits are the
        sign, the exponent ``scale - 1 + ee`` and, for ``ee > 0``, ``m`` as the top mantissa bit; zero where ``ee =
        m = 0``. Exact: FP4 times a power of two is a bf16 value."""
        packed = tl.load(w_ptrs, mask=mask, other=0).to(tl.int32)  # [BN, BK/2]
        scale = tl.load(s_ptrs, mask=mask, other=127).to(tl.int32)
        lo = packed & 0xF
        hi = packed >> 4
        vals = tl.join(lo, hi)  # [BN, BK/2, 2]: input 2j, 2j + 1
        scale2 = tl.join(scale, scale)
        ee = (vals >> 1) & 3
        m = vals & 1
        exponent = tl.maximum(scale2 - 1 + ee, 0)
        # Built as fp32 bits (bf16 is fp32's upper half: same exponent field), so the cast to bf16 is exact.
        bits = ((vals & 8) << 28) | (exponent << 23) | tl.where(ee > 0, m << 22, 0)
        bits = tl.where((vals & 7) == 0, (vals & 8) << 28, bits)
        w = bits.to(tl.uint32, bitcast=True).to(tl.float32, bitcast=True).to(tl.bfloat16)
        return tl.reshape(w, [BLOCK_N, BLOCK_K])

    @triton.jit
    def _rotr(u, r: tl.constexpr):
        return (u >> r) | (u << (32 - r))

    @triton.jit
    def _word_pairs_asm(words, factor):
        """``mxfp4_words.PAIR_PIECES`` in PTX: the four bf16x2 pairs of each word times ``factor`` (2^(scale - 1)
        in both halves). ``fma`` with -0.0 rather than ``mul`` for bf16x2 on sm80; subnormal inputs are exact."""
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 a, b, z;
            mov.b32 z, 0x80008000;
            and.b32 a, $4, 0x81C081C0;
            fma.rn.bf16x2 $0, a, $5, z;
            shf.r.wrap.b32 a, $4, $4, 4;
            and.b32 a, a, 0x81C081C0;
            fma.rn.bf16x2 $1, a, $5, z;
            shf.r.wrap.b32 a, $4, $4, 10;
            and.b32 a, a, 0x81C081C0;
            fma.rn.bf16x2 $2, a, $5, z;
            shf.r.wrap.b32 a, $4, $4, 30;
            shf.r.wrap.b32 b, $4, $4, 6;
            and.b32 a, a, 0x80C080C0;
            and.b32 b, b, 0x01000100;
            or.b32 a, a, b;
            fma.rn.bf16x2 $3, a, $5, z;
            }
            """,
            constraints="=r,=r,=r,=r,r,r",
            args=[words, factor],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )

    @triton.jit
    def _bf16_halves(pair):
        lo = (pair & 0xFFFF).to(tl.int16).to(tl.bfloat16, bitcast=True)
        hi = (pair >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return lo, hi

    @triton.jit
    def _scaled_halves(pair, factor):
        lo = (pair << 16).to(tl.float32, bitcast=True) * factor  # a bf16 is an fp32's upper half
        hi = (pair & 0xFFFF0000).to(tl.float32, bitcast=True) * factor
        return lo.to(tl.bfloat16), hi.to(tl.bfloat16)

    @triton.jit
    def _unpack_words(words, sc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
        """[BLOCK_N, BLOCK_K] bf16 weights, inputs in order, from [BLOCK_N, BLOCK_K / 8] ``mxfp4_words`` words
        (inputs in ``mxfp4_words.input_order``) and their [BLOCK_N, BLOCK_K / 32] scales. ``ASM``: the PTX
        unpacking; else the same bits by Triton's integer ops and an fp32 multiply (the interpreter's path)."""
        U: tl.constexpr = BLOCK_K // 128
        # Word 16u + 4t + c of a step holds inputs of group 4u + c (and of no other).
        e = tl.broadcast_to(tl.reshape(sc.to(tl.int32), [BLOCK_N, U, 1, 4]), [BLOCK_N, U, 4, 4])
        f = (tl.reshape(e, [BLOCK_N, BLOCK_K // 8]) + 126) << 7
        return _unpack_factors(words, f | (f << 16), BLOCK_N, BLOCK_K, ASM)

    @triton.jit
    def _unpack_factors(words, fac, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
        """``_unpack_words`` with each word's factor ``fac`` (``2^(scale - 1)`` as a bf16 in both halves) given."""
        U: tl.constexpr = BLOCK_K // 128
        if ASM:
            p0, p1, p2, p3 = _word_pairs_asm(words, fac)
            lo0, hi0 = _bf16_halves(p0)
            lo1, hi1 = _bf16_halves(p1)
            lo2, hi2 = _bf16_halves(p2)
            lo3, hi3 = _bf16_halves(p3)
        else:
            factor = (fac << 16).to(tl.float32, bitcast=True)  # the bf16 as an fp32's upper half
            u = words.to(tl.uint32, bitcast=True)
            p0 = u & 0x81C081C0
            p1 = _rotr(u, 4) & 0x81C081C0
            p2 = _rotr(u, 10) & 0x81C081C0
            p3 = (_rotr(u, 30) & 0x80C080C0) | (_rotr(u, 6) & 0x01000100)
            lo0, hi0 = _scaled_halves(p0, factor)
            lo1, hi1 = _scaled_halves(p1, factor)
            lo2, hi2 = _scaled_halves(p2, factor)
            lo3, hi3 = _scaled_halves(p3, factor)
        # Inputs 0..7 of each word: the last join's axis is the fastest, so it splits even from odd inputs.
        even = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
        odd = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
        # [rows, u, t, c, h, b, i] -> inputs 128u + 32c + 16h + 8b + 2t + i: reshapes and a permute, which move no
        # data where each thread's words are its MMA operand's (lanes along t, as the kernel loads them).
        w = tl.reshape(tl.join(even, odd), [BLOCK_N, U, 4, 4, 2, 2, 2])
        return tl.reshape(tl.permute(w, 0, 1, 3, 4, 5, 2, 6), [BLOCK_N, BLOCK_K])

    @triton.jit
    def _words_tile(
        w_base,
        s_rows,
        stride_wk,
        stride_sk,
        n_ok,
        k0,
        K_STEPS: tl.constexpr,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SCALE_WORDS: tl.constexpr,
        ASM: tl.constexpr,
        ROWS_MMA: tl.constexpr,
        LAST: tl.constexpr,
        UNMASKED: tl.constexpr,
    ):
        """The [BLOCK_N, BLOCK_K] bf16 weights of inputs ``k0..`` from ``mxfp4_words`` (``w_base``, ``s_rows``: the
        rows' starts). Steps within the whole steps' ``K_STEPS`` inputs read each 128-input block's 16 words as one
        contiguous run; ``LAST``, the step past them, reads a short last block's ``g`` groups as words ``g t + c``.
        ``ROWS_MMA`` (the warps, 0 for none): the rows were loaded in the order ``_mma_rows`` gives; put them back
        in order. ``UNMASKED``: every row and input of the tile exists (no masks to compute)."""
        j = tl.arange(0, BLOCK_K // 8)
        k_end = K if LAST else K_STEPS
        if LAST:
            c = j % 4
            block = k0 // 128 + j // 16
            groups = tl.minimum((K - 128 * block) // 32, 4)  # 4, fewer in a short block, <= 0 past K
            offs_kw = 16 * block + (j % 16) // 4 * groups + c
            k_ok = c < groups
        else:
            offs_kw = k0 // 8 + j
            k_ok = offs_kw < K_STEPS // 8
        if UNMASKED:  # every row and input there (the common case: fewer instructions a step)
            words = tl.load(w_base + offs_kw[None, :] * stride_wk)
        else:
            words = tl.load(
                w_base + offs_kw[None, :] * stride_wk, mask=n_ok[:, None] & k_ok[None, :], other=0
            )
        if SCALE_WORDS and BLOCK_K == 128:
            # One scale word a row (the step's 4 groups), loaded as a vector of rows so that each thread's copy
            # of it is already where its words are: byte c is the exponent of words 4t + c. Past K it reads 127s
            # (whose words are masked to zeros).
            sw_ptrs = (s_rows + k0 // 32).to(tl.pointer_type(tl.int32), bitcast=True)
            if UNMASKED:
                sw = tl.load(sw_ptrs)
            else:
                sw = tl.load(sw_ptrs, mask=n_ok & (k0 < k_end), other=0x7F7F7F7F)
            # + 126 on each byte at once: scales are at most 128 (``mxfp4_words.MAX_SCALE``), so no byte carries.
            f = (((sw + 0x7E7E7E7E)[:, None] >> ((j % 4) * 8)[None, :]) & 0xFF) << 7
            w = _unpack_factors(words, f | (f << 16), BLOCK_N, BLOCK_K, ASM)
        else:
            groups_k = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            sc = _load_scales(s_rows[:, None], stride_sk, n_ok, groups_k, k_end, SCALE_WORDS)
            w = _unpack_words(words, sc, BLOCK_N, BLOCK_K, ASM)
        if ROWS_MMA:
            w = tl.reshape(
                tl.permute(
                    tl.reshape(w, [BLOCK_N // (16 * ROWS_MMA), 2, ROWS_MMA, 8, BLOCK_K]), 0, 2, 1, 3, 4
                ),
                [BLOCK_N, BLOCK_K],
            )
        return w

    @triton.jit
    def _dot_step(acc, acc_t, x, w, DOT_FP32: tl.constexpr, SWAP_AB: tl.constexpr):
        """One K step's products: ``x`` [rows, K] times unpacked weights ``w`` [cols, K] into ``acc`` [rows, cols]
        or, ``SWAP_AB`` (the weights on the MMA's left side, in registers), ``acc_t`` [cols, rows]. fp32 models
        (exact checks against fp32 references) and the interpreter take full fp32 products."""
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        elif SWAP_AB:
            acc_t += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
        return acc, acc_t

    @triton.jit
    def _mma_rows(rows, WARPS: tl.constexpr):
        """Row ``s`` of a tile as the row a Hopper warp group's MMA operand holds in its place: the compiler gives
        each warp 8 rows of 16 words, ``8 WARPS`` rows a pass, where warp ``w``'s MMA operand is rows ``16 w..16 w +
        15`` of each ``16 WARPS``."""
        span: tl.constexpr = 16 * WARPS
        return rows // span * span + (rows // 8) % WARPS * 16 + (rows // (8 * WARPS)) % 2 * 8 + rows % 8

    # Sizes that change from step to step are not specialized on (Triton would compile a kernel for each of their
    # divisibility classes, on first use, in the middle of serving).
    @triton.jit(do_not_specialize=["num_pairs"])
    def _moe_mxfp4_kernel(
        x_ptr,
        stride_xm,
        w_ptr,
        stride_we,
        stride_wn,
        stride_wk,
        s_ptr,
        stride_se,
        stride_sn,
        stride_sk,
        bias_ptr,
        stride_be,
        out_ptr,
        stride_om,
        sorted_pairs_ptr,
        block_expert_ptr,
        route_w_ptr,
        num_pairs,
        limit,
        alpha,
        N: tl.constexpr,
        K: tl.constexpr,
        TOP_K: tl.constexpr,
        GATE_UP: tl.constexpr,
        DOT_FP32: tl.constexpr,
        SCALED_DOT: tl.constexpr,
        SWAP_AB: tl.constexpr,
        SPLIT_K: tl.constexpr,
        SCALE_WORDS: tl.constexpr,
        PACKED_WORDS: tl.constexpr,
        ASM: tl.constexpr,
        X_BY_PAIR: tl.constexpr,
        COLUMNS_FIRST: tl.constexpr,
        PAIR_BLOCKS: tl.constexpr,
        ROWS_MMA: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One expert's block of rows times ``BLOCK_N`` of its output columns (over all inputs, or over the
        ``program_id(2)``-th of ``SPLIT_K`` slices of them).

        GATE_UP: rows of ``x`` are tokens (``pair // TOP_K``); the interleaved gate/up columns get the bias and
        the clamped SwiGLU; ``out`` [padded, N / 2] is indexed by padded position. Else (down): rows of ``x`` are
        padded positions (``X_BY_PAIR``: pair ids); the bias is added and the row multiplied by its router
        weight; ``out`` [pairs, N] fp32 is indexed by pair id. ``SPLIT_K > 1``: no activation; each slice writes
        its partial sums (the bias in slice 0) to ``out`` [SPLIT_K, pairs, N] fp32."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if COLUMNS_FIRST:  # programs start in launch order (axis 0 fastest): renumber so columns come first
            launched = pid_m + pid_n * tl.num_programs(0)
            pid_m = launched // tl.num_programs(1)
            pid_n = launched % tl.num_programs(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if PAIR_BLOCKS:  # row block b holds pair b alone (its expert: the router's id)
            pairs = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        else:
            pairs = tl.load(sorted_pairs_ptr + offs_m)
        valid = pairs < num_pairs
        if GATE_UP:  # padding reads token 0 (its rows are computed, never stored)
            x_rows = tl.where(valid, pairs // TOP_K, 0)
        elif X_BY_PAIR:
            x_rows = tl.where(valid, pairs, 0)
        else:
            x_rows = offs_m
        if PACKED_WORDS:
            # Rows of words come as a stride in 16-byte units (gpt-oss: 360 words = 90), so that the compiler
            # knows each row starts aligned (its own specialization marks only strides divisible by 16 elements):
            # else the loads go 4 bytes at a time.
            stride_wn = stride_wn * 4
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        offs_kb = tl.arange(0, BLOCK_K // 2)
        offs_ks = tl.arange(0, BLOCK_K // 2) // (32 // 2)
        x_ptrs = x_ptr + x_rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        offs_w = pid_n * BLOCK_N + _mma_rows(tl.arange(0, BLOCK_N), ROWS_MMA) if ROWS_MMA else offs_n
        w_ok = offs_w < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we + offs_w[:, None].to(tl.int64) * stride_wn
        w_base_t = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
        s_rows = s_ptr + expert.to(tl.int64) * stride_se + offs_w.to(tl.int64) * stride_sn
        s_base = s_rows[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        groups: tl.constexpr = BLOCK_K // 32  # scales per row and K step
        if PACKED_WORDS:
            # Whole steps split over the slices, then the last slice takes the inputs past them (a short block
            # whose words are stored in their own order).
            K_STEPS: tl.constexpr = K // BLOCK_K * BLOCK_K
            wsteps: tl.constexpr = (K // BLOCK_K + SPLIT_K - 1) // SPLIT_K
            # One slice over columns that all exist: no masks in the loop (row blocks' padding reads real rows
            # whose results are never stored).
            UNMASKED: tl.constexpr = SPLIT_K == 1 and N % BLOCK_N == 0
            for step in range(wsteps):
                k0 = (pid_k * wsteps + step) * BLOCK_K
                if UNMASKED:
                    x = tl.load(x_ptrs + k0)
                else:
                    x = tl.load(
                        x_ptrs + k0, mask=valid[:, None] & ((k0 + offs_k) < K_STEPS)[None, :], other=0.0
                    )
                w = _words_tile(w_base, s_rows, stride_wk, stride_sk, w_ok, k0, K_STEPS, K, BLOCK_N, BLOCK_K,
                                SCALE_WORDS, ASM, ROWS_MMA, False, UNMASKED)  # fmt: skip
                acc, acc_t = _dot_step(acc, acc_t, x, w, DOT_FP32, SWAP_AB)
            if K_STEPS < K:
                if pid_k == SPLIT_K - 1:
                    x = tl.load(
                        x_ptrs + K_STEPS, mask=valid[:, None] & ((K_STEPS + offs_k) < K)[None, :], other=0.0
                    )
                    w = _words_tile(w_base, s_rows, stride_wk, stride_sk, w_ok, K_STEPS, K_STEPS, K, BLOCK_N,
                                    BLOCK_K, SCALE_WORDS, ASM, ROWS_MMA, True, False)  # fmt: skip
                    acc, acc_t = _dot_step(acc, acc_t, x, w, DOT_FP32, SWAP_AB)
        else:
            steps: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K  # a slice's K steps
            for step in range(steps):
                k0 = (pid_k * steps + step) * BLOCK_K  # past K (the last slice's tail), every load is masked
                k_ok = (k0 + offs_k) < K
                x = tl.load(x_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
                kb_ok = (k0 // 2 + offs_kb) < K // 2
                kb = k0 // 2 + offs_kb
                if SCALED_DOT:
                    sc = _load_scales(
                        s_base, stride_sk, n_ok, k0 // 32 + tl.arange(0, groups), K, SCALE_WORDS
                    )
                if SCALED_DOT and SWAP_AB:
                    # The weights as the product's left side ([BLOCK_N, BLOCK_K] x [BLOCK_K, rows]): for decode's
                    # few rows the wide side fills the MMA, and the compiler unpacks e2m1 (with the scales) in
                    # registers.
                    wb = tl.load(
                        w_base + kb[None, :] * stride_wk, mask=n_ok[:, None] & kb_ok[None, :], other=0
                    )
                    acc_t = tl.dot_scaled(wb, sc, "e2m1", tl.trans(x), None, "bf16", acc_t)
                elif SCALED_DOT:
                    # The compiler unpacks the e2m1 right side [BLOCK_K / 2, BLOCK_N] and applies the scales.
                    wb = tl.load(
                        w_base_t + kb[:, None] * stride_wk, mask=kb_ok[:, None] & n_ok[None, :], other=0
                    )
                    acc = tl.dot_scaled(x, None, "bf16", wb, sc, "e2m1", acc)
                else:
                    w_mask = n_ok[:, None] & kb_ok[None, :]
                    w_ptrs = w_base + kb[None, :] * stride_wk
                    s_ptrs = s_base + (k0 // 32 + offs_ks[None, :]) * stride_sk
                    w = _dequant_tile(w_ptrs, s_ptrs, w_mask, BLOCK_N, BLOCK_K)
                    acc, acc_t = _dot_step(acc, acc_t, x, w, DOT_FP32, SWAP_AB)
        if SWAP_AB and not DOT_FP32:
            acc = tl.trans(acc_t)
        if pid_k == 0:
            bias = tl.load(bias_ptr + expert.to(tl.int64) * stride_be + offs_n, mask=n_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        if SPLIT_K > 1:
            if not GATE_UP:
                acc = acc * tl.load(route_w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
            o_ptrs = out_ptr + (pid_k * num_pairs + pairs[:, None]).to(tl.int64) * N + offs_n[None, :]
            tl.store(o_ptrs, acc, mask=valid[:, None] & n_ok[None, :])
        elif GATE_UP:
            gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
            act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
            offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_o[None, :]
            tl.store(o_ptrs, act.to(out_ptr.dtype.element_ty), mask=(offs_o < N // 2)[None, :])
        else:
            route_w = tl.load(route_w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
            acc = acc * route_w[:, None]
            o_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
            tl.store(o_ptrs, acc, mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _swiglu_split_kernel(
        part_ptr,
        act_ptr,
        num_pairs,
        limit,
        alpha,
        N: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """``act`` [pairs, N / 2] = clamped SwiGLU of the gate_up partial sums ``part`` [SPLIT_K, pairs, N]."""
        pair = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N // 2
        gate = tl.zeros((BLOCK,), dtype=tl.float32)
        up = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            row = part_ptr + (s * num_pairs + pair).to(tl.int64) * N
            gate += tl.load(row + 2 * offs, mask=ok, other=0.0)
            up += tl.load(row + 2 * offs + 1, mask=ok, other=0.0)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
        tl.store(act_ptr + pair.to(tl.int64) * (N // 2) + offs, act.to(act_ptr.dtype.element_ty), mask=ok)


def _launch(
    x: torch.Tensor,
    w: Mxfp4Experts,
    bias: torch.Tensor,
    out: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    route_w: torch.Tensor,
    num_pairs: int,
    top_k: int,
    gate_up: bool,
    limit: float,
    alpha: float,
    cfg: KernelConfig,
    x_by_pair: bool = False,
) -> None:
    n, k = w.out_features, w.in_features
    dot_fp32 = _INTERPRETED or x.dtype == torch.float32
    # Output-rows-innermost weights always take word-read scales: with byte-read ones the scaled-dot kernel
    # computed wrong sums on an H100 (Triton 3.6, rel. error ~1.4); K-innermost weights are exact with either.
    n_major = w.blocks.stride(1) == 1
    scale_words = (cfg.scale_words or n_major) and cfg.block_k % 128 == 0 and w.scales_word_aligned()
    if cfg.scaled_dot and not dot_fp32 and n_major and not scale_words and not w.words:
        raise ValueError(
            "MXFP4 weights stored output-rows-innermost need block_k % 128 == 0 and aligned scales"
        )
    if w.words and cfg.block_k % mxfp4_words.ORDER_BLOCK:
        raise ValueError(
            f"MXFP4 words are read {mxfp4_words.ORDER_BLOCK} inputs a step or more, not {cfg.block_k}"
        )
    if w.words and w.blocks.stride(1) % 4:
        raise ValueError(f"MXFP4 words need rows of a multiple of 4 words, not {w.blocks.stride(1)}")
    grid = (block_expert.shape[0], triton.cdiv(n, cfg.block_n), cfg.split_k)
    _moe_mxfp4_kernel[grid](
        x,
        x.stride(0),
        w.blocks,
        w.blocks.stride(0),
        w.blocks.stride(1) // 4 if w.words else w.blocks.stride(1),
        w.blocks.stride(2),
        w.scales,
        w.scales.stride(0),
        w.scales.stride(1),
        w.scales.stride(2),
        bias,
        bias.stride(0),
        out,
        out.stride(0),
        sorted_pairs,
        block_expert,
        route_w,
        num_pairs,
        limit,
        alpha,
        N=n,
        K=k,
        TOP_K=top_k,
        GATE_UP=gate_up,
        DOT_FP32=dot_fp32,
        SCALED_DOT=cfg.scaled_dot and not dot_fp32,
        SWAP_AB=cfg.swap_ab,
        SPLIT_K=cfg.split_k,
        SCALE_WORDS=scale_words,
        PACKED_WORDS=w.words,
        ASM=not _INTERPRETED,
        X_BY_PAIR=x_by_pair,
        COLUMNS_FIRST=cfg.columns_first,
        PAIR_BLOCKS=cfg.pair_blocks,
        ROWS_MMA=cfg.num_warps if w.words and mma_rows_apply(cfg) else 0,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def mma_rows_apply(cfg: KernelConfig) -> bool:
    """Whether the words' rows are loaded in ``_mma_rows``' order: where the compiler gives each thread whole
    128-input runs of words as the weights' MMA operand wants them (4 or 8 warps, 16 rows each, 128 inputs a step,
    the weights on the MMA's left side), so the unpacked tile needs no trip through shared memory."""
    return (
        cfg.swap_ab
        and cfg.num_warps in (4, 8)
        and cfg.block_k == 128
        and cfg.block_n % (16 * cfg.num_warps) == 0
    )


@functools.cache
def _down_config(cfg: KernelConfig) -> KernelConfig:
    """The down kernel's tiles: ``cfg`` with its own split (made once per config, not per step)."""
    return cfg if cfg.down_split_k is None else dataclasses.replace(cfg, split_k=cfg.down_split_k)


def experts_mxfp4(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: Mxfp4Experts,
    gate_up_bias: torch.Tensor,
    down: Mxfp4Experts,
    down_bias: torch.Tensor,
    limit: float,
    alpha: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The routed experts' summed output ``[T, hidden]`` through the two Triton kernels (CUDA; bf16 activations
    on the tensor cores, or fp32 ones in full fp32 products). No host sync; shapes fixed by ``h.shape``:
    capturable in a CUDA graph."""
    parts = experts_mxfp4_partials(
        h, weights, ids, gate_up, gate_up_bias, down, down_bias, limit, alpha, config
    )
    summed = parts[0].sum(dim=1) if parts.shape[0] == 1 else parts.sum(dim=(0, 2))
    return summed.to(h.dtype)


def experts_mxfp4_partials(
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: Mxfp4Experts,
    gate_up_bias: torch.Tensor,
    down: Mxfp4Experts,
    down_bias: torch.Tensor,
    limit: float,
    alpha: float,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``experts_mxfp4`` before its sum: each routed pair's output, weighted by the router, in fp32 as
    ``[split_k slices, T, k, hidden]`` (``residual_norm.moe_add_rms_norm`` sums them with the residual add)."""
    num_tokens, top_k = ids.shape
    num_experts = gate_up.num_experts
    cfg = config or pick_config(num_tokens * top_k, num_experts, gate_up.words)
    if cfg.pair_blocks:
        block_expert = ids.reshape(-1).contiguous()
        sorted_pairs, num_pairs = block_expert, block_expert.shape[0]  # the kernels don't read sorted_pairs
        padded = num_pairs * cfg.block_m
    else:
        sorted_pairs, block_expert, num_pairs = _align(ids, num_experts, cfg.block_m)
        padded = sorted_pairs.shape[0]
    down_cfg = _down_config(cfg)
    inter = gate_up.out_features // 2
    x = h.contiguous()
    route_w = weights.reshape(-1).contiguous()
    if cfg.split_k > 1:
        part = torch.empty(cfg.split_k, num_pairs, 2 * inter, dtype=torch.float32, device=h.device)
        _launch(x, gate_up, gate_up_bias, part, sorted_pairs, block_expert, route_w, num_pairs, top_k, True,
                limit, alpha, cfg)  # fmt: skip
        act = torch.empty(num_pairs, inter, dtype=h.dtype, device=h.device)  # by pair
        act_block = min(1024, triton.next_power_of_2(inter))
        _swiglu_split_kernel[(num_pairs, triton.cdiv(inter, act_block))](
            part, act, num_pairs, limit, alpha, N=2 * inter, SPLIT_K=cfg.split_k, BLOCK=act_block
        )
    else:
        act = torch.empty(padded, inter, dtype=h.dtype, device=h.device)  # by padded position
        _launch(x, gate_up, gate_up_bias, act, sorted_pairs, block_expert, route_w, num_pairs, top_k, True,
                limit, alpha, cfg)  # fmt: skip
    split = down_cfg.split_k
    out = torch.empty(split, num_pairs, down.out_features, dtype=torch.float32, device=h.device)
    _launch(act, down, down_bias, out if split > 1 else out[0], sorted_pairs, block_expert, route_w, num_pairs,
            top_k, False, limit, alpha, down_cfg, x_by_pair=cfg.split_k > 1)  # fmt: skip
    return out.view(split, num_tokens, top_k, -1)


# How the kernels want the packed weights stored on CUDA: "k" keeps the checkpoint's order (each output row's
# inputs contiguous), "n" stores the output rows innermost. The kernels read either through strides.
WEIGHT_ORDER = "k"
# Whether CUDA stores inputs-innermost weights as ``mxfp4_words`` (unpacked by PTX: 1.24-1.43x faster kernels).
PACKED_WORDS = True


def for_kernels(w: Mxfp4Experts) -> Mxfp4Experts:
    """``w`` stored as the Triton kernels read it fastest where they will (CUDA: ``WEIGHT_ORDER``, aligned scale
    rows, ``mxfp4_words`` where the scales allow), else as it is."""
    if w.device.type != "cuda":
        return w
    if WEIGHT_ORDER == "n" and w.blocks.stride(1) != 1:
        w = w.n_major()
    w = w.with_aligned_scales()
    if PACKED_WORDS and WEIGHT_ORDER == "k":
        w = w.as_words()
    return w


def triton_supported(device: torch.device) -> bool:
    """Whether the Triton MXFP4 kernels can run here: CUDA with bf16 tensor cores (sm80+)."""
    if not HAVE_TRITON or device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def random_mxfp4(
    num_experts: int,
    out_features: int,
    in_features: int,
    std: float,
    gen: torch.Generator,
    device: torch.device,
) -> Mxfp4Experts:
    """Random MXFP4 weights with about ``std`` RMS, made on ``device``: uniform nibbles (RMS ~2.9) times a scale
    of ``2^round(log2(std / 2.9))``, +-1 per block."""
    groups = in_features // BLOCK
    blocks = torch.randint(
        0,
        256,
        (num_experts, out_features, groups * BLOCK // 2),
        generator=gen,
        device=device,
        dtype=torch.uint8,
    )
    centre = 127 + round(math.log2(std / 2.93))
    scales = torch.randint(
        centre - 1, centre + 2, (num_experts, out_features, groups), generator=gen, device=device
    ).to(torch.uint8)
    return Mxfp4Experts(blocks, scales)

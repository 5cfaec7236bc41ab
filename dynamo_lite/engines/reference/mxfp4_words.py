"""MXFP4 weights pre-arranged for the GPU kernels: 32-bit words whose bits unpack to bf16 in ~1.6 instructions a
weight (Triton's own e2m1 unpacking takes ~6).

A word holds 8 consecutive inputs of one output row (what a checkpoint's 4 bytes hold), its 32 bits permuted so
that each pair of inputs ``(2p, 2p + 1)`` comes out as one bf16x2 register by a rotation and a mask (two for the
last pair): an e2m1 nibble ``s e1 e0 m`` lands with ``m`` at bf16 bit 6, ``e1 e0`` at bits 8..7 and ``s`` at bit 15
(bits 22..24 and 31 for the pair's second value). As a bf16 that is the nibble's value times 2^-126 (``e = 0, m =
1`` a subnormal), so one bf16x2 multiply by ``2^(scale - 1)`` gives the weight exactly. ``2^(scale - 1)`` is a
normal bf16 for scales up to 128 (weights of magnitude up to 2^1 * 6 a block): checkpoints with larger scales keep
the checkpoint's layout (``words_fit``).

The inputs are also reordered within each block of 128 (``input_order``): word ``4t + c`` of a block holds the
inputs ``32c + 16h + 8b + 2t + {0, 1}`` (``h, b`` in 0..1), the values one thread of a Hopper warp group holds
as the MMA's left operand (``t``: its lane within a group of four). A thread's words then unpack straight into
its operand registers; in the checkpoint's order the unpacked tile went through shared memory to be redistributed.
A block of fewer than 128 inputs (the row's last) holds its ``g`` groups of 32 as words ``g t + c``.
"""

from __future__ import annotations

import torch

BF16_BITS = (6, 7, 8, 15)
"""Where a nibble's m, e0, e1 and sign go in a bf16 (add 16 for the upper half of a bf16x2)."""
PAIR_MASK = 0x81C081C0
# Per pair of inputs, the (rotate right by, mask) pieces OR-ed together; the four pairs' pieces tile the word.
PAIR_PIECES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((0, PAIR_MASK),),
    ((4, PAIR_MASK),),
    ((10, PAIR_MASK),),
    ((30, 0x80C080C0), (6, 0x01000100)),
)
MAX_SCALE = 128  # 2^(scale - 1) must be a normal bf16 (exponent field scale + 126 <= 254)
ORDER_BLOCK = 128  # inputs a block of 16 words reorders among themselves


def input_order(k: int) -> torch.Tensor:
    """``[k]``: the input each stored position holds (position ``8 w + i`` is input ``i`` of word ``w``)."""
    if k % 32:
        raise ValueError(f"MXFP4 rows of {k} inputs: not whole blocks of 32")
    p = torch.arange(k)
    block = p // ORDER_BLOCK
    groups = ((k - ORDER_BLOCK * block) // 32).clamp(max=ORDER_BLOCK // 32)  # 4, or fewer in the last block
    word, i = (p % ORDER_BLOCK) // 8, p % 8
    t, c = word // groups, word % groups
    return ORDER_BLOCK * block + 32 * c + 16 * (i // 4) + 8 * ((i // 2) % 2) + 2 * t + i % 2


def _word_bits() -> tuple[tuple[int, ...], ...]:
    """``[input j][nibble bit b]`` -> the word bit holding it."""
    table: list[list[int]] = [[-1] * 4 for _ in range(8)]
    for p, pieces in enumerate(PAIR_PIECES):
        for half in (0, 1):
            for b, bit in enumerate(BF16_BITS):
                target = bit + 16 * half
                (rot,) = [r for r, mask in pieces if mask >> target & 1]
                table[2 * p + half][b] = (target + rot) % 32
    flat = [bit for row in table for bit in row]
    if sorted(flat) != list(range(32)):
        raise AssertionError(f"the pairs' pieces do not tile a word: {table}")
    return tuple(tuple(row) for row in table)


WORD_BITS = _word_bits()


def _runs(moves: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Bit moves ``(src, dst)`` merged into runs ``(src, dst, length)`` of neighbouring bits that move together."""
    runs: list[list[int]] = []
    for src, dst in sorted(moves):
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += 1
        else:
            runs.append([src, dst, 1])
    return [(src, dst, length) for src, dst, length in runs]


def _permute_bits(words: torch.Tensor, moves: list[tuple[int, int]]) -> torch.Tensor:
    """``words`` (int64 holding 32-bit words) with bit ``src`` moved to bit ``dst`` for each move."""
    out = torch.zeros_like(words)
    for src, dst, length in _runs(moves):
        out |= ((words >> src) & ((1 << length) - 1)) << dst
    return out


_ROWS_PER_CHUNK = 1 << 16  # rows permuted at a time: bounds the int64 temporaries


def _convert(blocks: torch.Tensor, moves: list[tuple[int, int]], out_dtype: torch.dtype) -> torch.Tensor:
    """``[*prefix, K / 8]`` int32 words (or their ``[*prefix, K / 2]`` bytes) with their bits moved, as
    ``out_dtype`` (int32 words or uint8 bytes)."""
    words = blocks.contiguous().view(torch.int32)
    flat = words.reshape(-1, words.shape[-1])
    out = torch.empty_like(flat)
    for r0 in range(0, flat.shape[0], _ROWS_PER_CHUNK):
        chunk = flat[r0 : r0 + _ROWS_PER_CHUNK].to(torch.int64) & 0xFFFFFFFF
        moved = _permute_bits(chunk, moves)
        out[r0 : r0 + _ROWS_PER_CHUNK] = torch.where(moved >= 2**31, moved - 2**32, moved).to(torch.int32)
    return out.view(words.shape).view(out_dtype)


def _reorder_inputs(blocks: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[*prefix, K / 2]`` whose nibble ``p`` is nibble ``order[p]`` of ``blocks``."""
    flat = blocks.contiguous().reshape(-1, blocks.shape[-1])
    out = torch.empty_like(flat)
    order = order.to(blocks.device)
    for r0 in range(0, flat.shape[0], _ROWS_PER_CHUNK):
        chunk = flat[r0 : r0 + _ROWS_PER_CHUNK]
        nibbles = torch.stack((chunk & 0xF, chunk >> 4), dim=-1).reshape(chunk.shape[0], -1)[:, order]
        out[r0 : r0 + _ROWS_PER_CHUNK] = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return out.view(blocks.shape)


def to_words(blocks: torch.Tensor) -> torch.Tensor:
    """A checkpoint's packed bytes ``[*prefix, K / 2]`` uint8 -> the kernels' words ``[*prefix, K / 8]`` int32."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1] % 16:
        raise ValueError(
            f"MXFP4 blocks {blocks.dtype} {tuple(blocks.shape)}: need uint8 bytes, 32 inputs a block"
        )
    moves = [(4 * j + b, WORD_BITS[j][b]) for j in range(8) for b in range(4)]
    return _convert(_reorder_inputs(blocks, input_order(2 * blocks.shape[-1])), moves, torch.int32)


def from_words(words: torch.Tensor) -> torch.Tensor:
    """``to_words`` undone: ``[*prefix, K / 8]`` int32 -> ``[*prefix, K / 2]`` uint8 in the checkpoint's order."""
    moves = [(WORD_BITS[j][b], 4 * j + b) for j in range(8) for b in range(4)]
    stored = _convert(words, moves, torch.uint8)
    return _reorder_inputs(stored, torch.argsort(input_order(2 * stored.shape[-1])))


def words_fit(scales: torch.Tensor) -> bool:
    """Whether every scale lets the words' single multiply stay exact (``MAX_SCALE``; reads the scales once)."""
    return scales.numel() == 0 or int(scales.max()) <= MAX_SCALE


def unpack_words(words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """What the kernels' unpacking computes, in torch (fp32): ``[*prefix, K / 8]`` words and ``[*prefix, K / 32]``
    scales -> ``[*prefix, K]`` weights. The reference the kernels' assembly is checked against."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    k = words.shape[-1] * 8
    order = input_order(k).to(words.device)
    factor = torch.exp2(scales.to(torch.float64) - 1).repeat_interleave(32, dim=-1)[
        ..., order
    ]  # stored order
    values = []
    for pieces in PAIR_PIECES:
        pair = torch.zeros_like(w)
        for rot, mask in pieces:
            pair |= (((w >> rot) | (w << (32 - rot))) & 0xFFFFFFFF & mask) if rot else (w & mask)
        for half in (pair & 0xFFFF, pair >> 16):
            bf16 = (
                (half.to(torch.int32) << 16).view(torch.float32).to(torch.float64)
            )  # bf16 = fp32's upper half
            values.append(bf16)
    # values: [pair0 lo, pair0 hi, pair1 lo, ...] = inputs 0..7 of each word
    stored = torch.stack(values, dim=-1).reshape(*words.shape[:-1], k) * factor
    return stored[..., torch.argsort(order)].to(torch.float32)

"""MXFP4 weights as ``mxfp4_words``' 32-bit words: the layout round-trips, unpacks to exactly the checkpoint's
values (torch here; the kernels' PTX on a GPU), and the experts keep their values when converted."""

from __future__ import annotations

import pytest
import torch

from dynamo_lite.engines.reference import mxfp4_words
from dynamo_lite.engines.reference.moe_mxfp4 import Mxfp4Experts, random_mxfp4
from dynamo_lite.engines.reference.mxfp4 import dequantize_mxfp4

CUDA = torch.cuda.is_available()


def every_byte_and_scale(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, 64] bytes holding every byte value in every position of a word, and [rows, 4] scales from 0 to 128."""
    gen = torch.Generator().manual_seed(11)
    values = torch.arange(256, dtype=torch.uint8)
    rows = [values.roll(shift).reshape(4, 64) for shift in range(4)]  # each value at word offsets 0..3
    blocks = torch.cat([*rows, torch.randint(0, 256, (48, 64), generator=gen, dtype=torch.uint8)])
    scales = torch.randint(
        0, mxfp4_words.MAX_SCALE + 1, (blocks.shape[0], 4), generator=gen, dtype=torch.uint8
    )
    scales[0] = torch.tensor([0, 1, 127, 128], dtype=torch.uint8)
    return blocks.to(device), scales.to(device)


def test_the_pairs_tile_every_bit_of_a_word_once() -> None:
    bits = sorted(b for row in mxfp4_words.WORD_BITS for b in row)
    assert bits == list(range(32))


def test_words_round_trip_and_unpack_to_the_checkpoint_values_exactly() -> None:
    blocks, scales = every_byte_and_scale()
    words = mxfp4_words.to_words(blocks)
    assert words.dtype == torch.int32 and words.shape == (blocks.shape[0], 16)
    assert torch.equal(mxfp4_words.from_words(words), blocks)
    expected = dequantize_mxfp4(blocks.reshape(-1, 4, 16), scales, torch.float32).reshape(blocks.shape[0], -1)
    got = mxfp4_words.unpack_words(words, scales)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # bit for bit, -0.0 included


def test_the_input_order_gives_each_thread_its_mma_operand_and_covers_every_input_once() -> None:
    order = mxfp4_words.input_order(2880)  # gpt-oss: 22 blocks of 128 inputs, then one of 64
    assert torch.equal(order.sort().values, torch.arange(2880))
    # Word 4t + c of a block: the inputs 16m + 2t + {0, 1, 8, 9} of the two 16-input MMA steps m = 2c, 2c + 1.
    assert order[:8].tolist() == [0, 1, 8, 9, 16, 17, 24, 25]
    assert order[8 * 5 : 8 * 6].tolist() == [34, 35, 42, 43, 50, 51, 58, 59]  # t = 1, c = 1
    # The short last block's 2 groups as words 2t + c: every word within one group of 32 (one scale).
    tail = order[2816:].reshape(8, 8)
    assert tail[1].tolist() == [2848, 2849, 2856, 2857, 2864, 2865, 2872, 2873]  # t = 0, c = 1
    assert bool((tail // 32 == tail[:, :1] // 32).all())


@pytest.mark.parametrize("k", [32, 96, 288])
def test_rows_ending_in_a_short_block_round_trip_and_unpack_exactly(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    blocks = torch.randint(0, 256, (5, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, mxfp4_words.MAX_SCALE + 1, (5, k // 32), generator=gen, dtype=torch.uint8)
    words = mxfp4_words.to_words(blocks)
    assert torch.equal(mxfp4_words.from_words(words), blocks)
    expected = dequantize_mxfp4(blocks.reshape(5, -1, 16), scales, torch.float32).reshape(5, k)
    assert torch.equal(mxfp4_words.unpack_words(words, scales).view(torch.int32), expected.view(torch.int32))


def test_experts_as_words_keep_their_values_and_only_when_the_scales_allow() -> None:
    gen = torch.Generator().manual_seed(2)
    experts = random_mxfp4(3, 16, 96, 0.05, gen, torch.device("cpu"))
    words = experts.as_words()
    assert words.words and not experts.words
    assert (words.in_features, words.out_features, words.nbytes) == (96, 16, experts.nbytes)
    assert torch.equal(words.dequantize(torch.float32), experts.dequantize(torch.float32))
    assert torch.equal(words.as_bytes().blocks, experts.blocks) and words.as_words() is words
    big = Mxfp4Experts(experts.blocks, experts.scales.clone().fill_(mxfp4_words.MAX_SCALE + 1))
    assert not big.as_words().words  # 2^(scale - 1) would not be a normal bf16: the bytes stay
    with pytest.raises(ValueError):
        words.n_major()


@pytest.mark.skipif(not CUDA, reason="the PTX unpacking needs a CUDA GPU")
def test_the_kernels_ptx_unpacks_every_value_exactly() -> None:
    import triton
    import triton.language as tl

    from dynamo_lite.engines.reference import moe_mxfp4 as mx

    @triton.jit
    def unpack(w_ptr, s_ptr, out_ptr, ROWS: tl.constexpr, K: tl.constexpr):
        rows = tl.arange(0, ROWS)
        words = tl.load(w_ptr + rows[:, None] * (K // 8) + tl.arange(0, K // 8)[None, :])
        sc = tl.load(s_ptr + rows[:, None] * (K // 32) + tl.arange(0, K // 32)[None, :])
        w = mx._unpack_words(words, sc, ROWS, K, True)
        tl.store(out_ptr + rows[:, None] * K + tl.arange(0, K)[None, :], w)

    blocks, scales = every_byte_and_scale("cuda")
    words = mxfp4_words.to_words(blocks)
    out = torch.empty(blocks.shape[0], 128, dtype=torch.bfloat16, device="cuda")
    unpack[(1,)](words, scales, out, ROWS=blocks.shape[0], K=128)
    expected = dequantize_mxfp4(blocks.reshape(-1, 4, 16), scales, torch.bfloat16).reshape(out.shape)
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))

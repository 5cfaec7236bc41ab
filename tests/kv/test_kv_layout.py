from __future__ import annotations

import msgspec
import pytest

from dynamo_lite.kv.layout import KvLayout, host_id
from dynamo_lite.protocol import KvDescriptor, decode, encode

SMOLLM2_2048 = KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", num_tokens=2048)


def test_smollm2_layout_math() -> None:
    assert SMOLLM2_2048.itemsize == 4
    assert SMOLLM2_2048.bytes_per_token == 46_080  # 30 layers x K,V x 3 kv heads x 64 x 4 bytes (fp32)
    assert SMOLLM2_2048.nbytes == 46_080 * 2048 == 94_371_840
    assert SMOLLM2_2048.shape == (30, 2, 3, 2048, 64)
    bf16 = KvLayout(30, 3, 64, "bfloat16", 2048)
    assert bf16.itemsize == 2 and bf16.nbytes == SMOLLM2_2048.nbytes // 2


@pytest.mark.parametrize(
    "args",
    [(30, 3, 64, "int8", 4), (0, 3, 64, "float32", 4), (30, 3, 64, "float32", 0), (30, -1, 64, "float16", 4)],
)
def test_bad_layouts_refused(args: tuple) -> None:
    with pytest.raises(ValueError):
        KvLayout(*args)


def test_descriptor_round_trip_and_mismatch() -> None:
    desc = KvDescriptor(transfer_id="t", engine="torch", **SMOLLM2_2048.descriptor_fields())
    assert KvLayout.from_descriptor(decode(encode(desc), KvDescriptor)) == SMOLLM2_2048
    lying = msgspec.structs.replace(desc, nbytes=desc.nbytes - 1)
    with pytest.raises(ValueError, match="bytes"):
        KvLayout.from_descriptor(lying)
    with pytest.raises(ValueError, match="dtype"):
        KvLayout.from_descriptor(msgspec.structs.replace(desc, dtype="pickle"))


def test_host_id_is_stable_and_opaque() -> None:
    assert host_id() == host_id()
    assert len(host_id()) == 32 and int(host_id(), 16) >= 0


GPT_OSS_20B_8K = KvLayout(24, 8, 64, "bfloat16", 8192, window=128, windowed_layers=tuple(range(0, 24, 2)))


def test_windowed_layers_hold_only_their_window() -> None:
    lay = GPT_OSS_20B_8K
    per_layer_token = 2 * 8 * 64 * 2
    assert lay.full_layers == 12 and lay.window_tokens == 128
    assert lay.parts == [((12, 2, 8, 8192, 64), 0), ((12, 2, 8, 128, 64), 12 * per_layer_token * 8192)]
    assert lay.nbytes == per_layer_token * (12 * 8192 + 12 * 128)
    assert lay.all_full_nbytes == per_layer_token * 24 * 8192 == lay.bytes_per_token * 8192
    short = KvLayout(24, 8, 64, "bfloat16", 100, window=128, windowed_layers=lay.windowed_layers)
    assert short.window_tokens == 100 and short.nbytes == short.all_full_nbytes
    with pytest.raises(ValueError, match="two parts"):
        _ = lay.shape
    only_windowed = KvLayout(2, 1, 4, "float32", 10, window=4, windowed_layers=(0, 1))
    assert only_windowed.shape == (2, 2, 1, 4, 4)


@pytest.mark.parametrize(
    "window, layers",
    [(128, ()), (0, (0, 2)), (128, (2, 0)), (128, (0, 0)), (128, (0, 24)), (-1, (1,))],
)
def test_bad_windowed_layouts_refused(window: int, layers: tuple) -> None:
    with pytest.raises(ValueError):
        KvLayout(24, 8, 64, "bfloat16", 10, window=window, windowed_layers=layers)


def test_windowed_descriptor_round_trip_and_old_descriptors() -> None:
    desc = KvDescriptor(transfer_id="t", engine="torch", **GPT_OSS_20B_8K.descriptor_fields())
    assert desc.window == 128 and desc.windowed_layers == list(range(0, 24, 2))
    assert KvLayout.from_descriptor(decode(encode(desc), KvDescriptor)) == GPT_OSS_20B_8K
    # A layout without windows encodes no window fields: what older readers decode unchanged.
    plain = KvDescriptor(transfer_id="t", engine="torch", **SMOLLM2_2048.descriptor_fields())
    assert encode(plain) == encode(msgspec.structs.replace(plain, window=0, windowed_layers=[]))
    with pytest.raises(ValueError, match="bytes"):
        KvLayout.from_descriptor(msgspec.structs.replace(desc, windowed_layers=[0]))

from __future__ import annotations

import msgspec
import pytest

from dynamo_lite.kv.layout import KvLayout, host_id
from dynamo_lite.protocol import KvDescriptor, decode, encode

SMOLLM2_2048 = KvLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", num_tokens=2048)


def test_smollm2_layout_math() -> None:
    assert SMOLLM2_2048.itemsize == 4
    assert SMOLLM2_2048.bytes_per_token == 46_080  # the figure in shared/notes/reference-model.md
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

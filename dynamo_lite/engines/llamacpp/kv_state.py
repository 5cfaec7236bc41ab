"""One sequence's KV between llama.cpp's state bytes and the KV handoff's layout (``kv.KvLayout``).

llama.cpp 0.3.x (``llama_state_seq_get_data`` with a unified cache, one stream) writes::

    u32 magic 0xAF143CD8, i32 seq_id, u32 n_stream (1), u32 cell_count
    per cell: i32 pos, u32 n_seq_id (1), i32 seq_id
    u32 v_trans, u32 n_layer
    per layer: i32 type, u64 row bytes, K rows (cell_count x kv_heads*head_dim)
    not v_trans: per layer: i32 type, u64 row bytes, V rows (cell_count x kv_heads*head_dim)
    v_trans:     per layer: i32 type, u32 element bytes, u32 kv_heads*head_dim, V columns (kv_heads*head_dim x cells)

Cells come in cache order, not position order: ``parse`` sorts them. The handoff carries
``(layers, 2, kv_heads, tokens, head_dim)`` float16 (llama.cpp's F16 cache, as it is) with K in the
Hugging Face head layout: llama.cpp's llama-family GGUFs hold Q/K rows permuted for its interleaved RoPE
(``convert_hf_to_gguf``'s ``permute``), so a K row is un-permuted on the way out and permuted back on the way
in (``k_permuted``). The bytes in transit therefore mean the same as the torch engine's KV of that model.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = 0xAF143CD8
GGML_TYPE_F16 = 1


class KvStateError(ValueError):
    """Bytes that are not one sequence's F16 KV state of this model."""


def _unpermute_k(k: np.ndarray) -> np.ndarray:
    """llama.cpp's interleaved K (pairs 2i, 2i+1 rotate together) → HF's halves (i, i + head_dim/2)."""
    *lead, hd = k.shape
    return k.reshape(*lead, hd // 2, 2).swapaxes(-1, -2).reshape(*lead, hd)


def _permute_k(k: np.ndarray) -> np.ndarray:
    """The inverse of ``_unpermute_k``."""
    *lead, hd = k.shape
    return k.reshape(*lead, 2, hd // 2).swapaxes(-1, -2).reshape(*lead, hd)


class _Reader:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = memoryview(buf)
        self.at = 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise KvStateError("KV state ends early")
        out = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return out

    def array(self, count: int, dtype: type) -> np.ndarray:
        size = count * np.dtype(dtype).itemsize
        if self.at + size > len(self.buf):
            raise KvStateError("KV state ends early")
        out = np.frombuffer(self.buf, dtype, count, self.at)
        self.at += size
        return out


def parse(
    state: bytes | memoryview, num_layers: int, num_kv_heads: int, head_dim: int, k_permuted: bool
) -> np.ndarray:
    """``(num_layers, 2, num_kv_heads, tokens, head_dim)`` float16 of positions ``0..tokens-1`` (a new array)."""
    r = _Reader(state)
    magic, _seq, n_stream, cells = r.take("<IiII")
    if magic != MAGIC or n_stream != 1:
        raise KvStateError(f"not a one-stream sequence state (magic {magic:#x}, {n_stream} streams)")
    if cells == 0:
        raise KvStateError("the sequence has no KV")
    meta = r.array(cells * 3, np.int32).reshape(cells, 3)  # pos, n_seq_id, seq_id
    if (meta[:, 1] != 1).any():
        raise KvStateError("cells shared by several sequences")
    order = np.argsort(meta[:, 0], kind="stable")
    if not np.array_equal(meta[order, 0], np.arange(cells)):
        raise KvStateError(f"positions are not 0..{cells - 1}")
    v_trans, n_layer = r.take("<II")
    if n_layer != num_layers:
        raise KvStateError(f"{n_layer} layers, the model has {num_layers}")
    row = num_kv_heads * head_dim
    out = np.empty((num_layers, 2, num_kv_heads, cells, head_dim), np.float16)
    for kind in (0, 1):
        for layer in range(num_layers):
            if kind == 1 and v_trans:
                ktype, el_size, width = r.take("<iII")
                if ktype != GGML_TYPE_F16 or el_size != 2 or width != row:
                    raise KvStateError(f"V of type {ktype} x {width}, expected F16 x {row}")
                data = r.array(row * cells, np.float16).reshape(num_kv_heads, head_dim, cells)
                data = data[:, :, order].swapaxes(1, 2)  # (heads, tokens, head_dim)
            else:
                ktype, row_bytes = r.take("<iQ")
                if ktype != GGML_TYPE_F16 or row_bytes != row * 2:
                    raise KvStateError(
                        f"{'KV'[kind]} of type {ktype}, {row_bytes} B rows; expected F16 {row}"
                    )
                data = r.array(row * cells, np.float16).reshape(cells, num_kv_heads, head_dim)
                data = data[order].swapaxes(0, 1)
                if kind == 0 and k_permuted:
                    data = _unpermute_k(data)
            out[layer, kind] = data
    if r.at != len(r.buf):
        raise KvStateError(f"{len(r.buf) - r.at} bytes left over")
    return out


def build(kv: np.ndarray, seq: int, v_trans: bool, k_permuted: bool) -> bytes:
    """The state bytes that load ``kv`` (``(layers, 2, kv_heads, tokens, head_dim)``, any float dtype) as
    sequence ``seq``, positions ``0..tokens-1``."""
    layers, two, heads, tokens, head_dim = kv.shape
    if two != 2 or tokens == 0:
        raise KvStateError(f"KV of shape {kv.shape}")
    kv = np.asarray(kv, np.float16)
    row = heads * head_dim
    meta = np.empty((tokens, 3), np.int32)
    meta[:, 0] = np.arange(tokens)
    meta[:, 1] = 1
    meta[:, 2] = seq
    parts = [
        struct.pack("<IiII", MAGIC, seq, 1, tokens),
        meta.tobytes(),
        struct.pack("<II", int(v_trans), layers),
    ]
    for layer in range(layers):
        k = kv[layer, 0]
        if k_permuted:
            k = _permute_k(k)
        parts += [
            struct.pack("<iQ", GGML_TYPE_F16, row * 2),
            np.ascontiguousarray(k.swapaxes(0, 1)).tobytes(),
        ]
    for layer in range(layers):
        v = kv[layer, 1]  # (heads, tokens, head_dim)
        if v_trans:
            parts += [
                struct.pack("<iII", GGML_TYPE_F16, 2, row),
                np.ascontiguousarray(v.swapaxes(1, 2)).tobytes(),
            ]
        else:
            parts += [
                struct.pack("<iQ", GGML_TYPE_F16, row * 2),
                np.ascontiguousarray(v.swapaxes(0, 1)).tobytes(),
            ]
    return b"".join(parts)

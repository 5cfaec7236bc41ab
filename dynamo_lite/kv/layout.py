"""What a prompt's KV looks like in transit, and which machine we are on."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Any

import msgspec

from dynamo_lite.protocol import KvDescriptor

DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


class KvLayout(msgspec.Struct, frozen=True):
    """Shape of one sequence's KV in transit, C-contiguous: one part per kind of layer.

    Full-attention layers hold every position: ``(full_layers, 2, num_kv_heads, num_tokens, head_dim)``, K then V
    of each layer, layers in index order. Sliding-window layers (``windowed_layers``, each attending to the last
    ``window`` positions) hold only ``min(num_tokens, window)`` positions, after the full part:
    ``(len(windowed_layers), 2, num_kv_heads, min(num_tokens, window), head_dim)``, in ring order (position ``p``
    at index ``p % window``: the engines' cache keeps a window layer as such a ring, so either side copies it
    whole).

    >>> KvLayout(30, 3, 64, "float32", 2048).nbytes  # SmolLM2-135M, 2048 tokens
    94371840
    >>> gpt_oss_20b = KvLayout(24, 8, 64, "bfloat16", 8192, window=128, windowed_layers=tuple(range(0, 24, 2)))
    >>> gpt_oss_20b.nbytes, gpt_oss_20b.all_full_nbytes  # half the layers keep 128 of the 8192 positions
    (204472320, 402653184)
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_tokens: int
    window: int = 0
    windowed_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r} (one of {sorted(DTYPE_SIZES)})")
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.num_tokens) <= 0:
            raise ValueError(f"bad KV layout {self}")
        w = self.windowed_layers
        if (self.window > 0) != bool(w) or self.window < 0:
            raise ValueError(f"bad KV layout {self}: a window needs windowed layers and the reverse")
        if list(w) != sorted(set(w)) or (w and not 0 <= w[0] <= w[-1] < self.num_layers):
            raise ValueError(
                f"bad KV layout {self}: windowed_layers must be distinct layer indexes, ascending"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def full_layers(self) -> int:
        return self.num_layers - len(self.windowed_layers)

    @property
    def window_tokens(self) -> int:
        """Positions each windowed layer holds."""
        return min(self.num_tokens, self.window) if self.windowed_layers else 0

    @property
    def parts(self) -> list[tuple[tuple[int, int, int, int, int], int]]:
        """``(shape, byte offset)`` of each part: the full layers' (if any), then the windowed layers' (if any)."""
        out = []
        offset = 0
        for layers, tokens in (
            (self.full_layers, self.num_tokens),
            (len(self.windowed_layers), self.window_tokens),
        ):
            if layers:
                shape = (layers, 2, self.num_kv_heads, tokens, self.head_dim)
                out.append((shape, offset))
                offset += layers * 2 * self.num_kv_heads * tokens * self.head_dim * self.itemsize
        return out

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The shape of a layout with one part (no windowed layers, or only windowed ones)."""
        parts = self.parts
        if len(parts) != 1:
            raise ValueError("a layout of full and windowed layers has two parts: see parts")
        return parts[0][0]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per position of a layer holding every position, times the layers (all of them full)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def all_full_nbytes(self) -> int:
        """What this KV would take if every layer held every position."""
        return self.bytes_per_token * self.num_tokens

    @property
    def nbytes(self) -> int:
        per_layer_token = 2 * self.num_kv_heads * self.head_dim * self.itemsize
        return per_layer_token * (
            self.full_layers * self.num_tokens + len(self.windowed_layers) * self.window_tokens
        )

    @classmethod
    def from_descriptor(cls, desc: KvDescriptor) -> KvLayout:
        """The layout a descriptor announces; ``ValueError`` if malformed or disagreeing with ``nbytes``."""
        layout = cls(
            desc.num_layers,
            desc.num_kv_heads,
            desc.head_dim,
            desc.dtype,
            desc.num_tokens,
            desc.window,
            tuple(desc.windowed_layers),
        )
        if layout.nbytes != desc.nbytes:
            raise ValueError(f"descriptor says {desc.nbytes} bytes, its layout {layout.nbytes}")
        return layout

    def descriptor_fields(self) -> dict[str, Any]:
        """The ``KvDescriptor`` keyword arguments that describe this layout."""
        fields = {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "num_tokens": self.num_tokens,
            "nbytes": self.nbytes,
        }
        if self.windowed_layers:
            fields |= {"window": self.window, "windowed_layers": list(self.windowed_layers)}
        return fields


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


@functools.cache
def host_id() -> str:
    """A stable id of "these processes can share POSIX shared memory": machine, boot and the /dev/shm mount.

    Containers on one host that do not share /dev/shm get different ids (a different tmpfs device), and a
    machine id cloned into many images is told apart by the boot id.
    """
    try:
        shm_dev = str(os.stat("/dev/shm").st_dev)
    except OSError:
        shm_dev = ""
    parts = (
        _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id"),
        _read("/proc/sys/kernel/random/boot_id"),
        shm_dev,
        os.uname().nodename,
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def as_tensors(owner: Any, layout: KvLayout) -> list[Any]:
    """Torch tensors of ``layout.parts`` over ``owner``'s memory (no copy; torch is imported lazily).

    The tensors keep ``owner`` alive, so they stay valid even after the hold or pull that made them is closed.
    """
    import warnings

    import torch

    dtype = getattr(torch, layout.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": the caller only reads it
        flat = torch.frombuffer(owner, dtype=torch.uint8, count=layout.nbytes)
    out = []
    for shape, offset in layout.parts:
        n = math.prod(shape) * layout.itemsize
        out.append(flat[offset : offset + n].view(dtype).view(shape))
    return out


def as_tensor(owner: Any, layout: KvLayout) -> Any:
    """The one tensor of a single-part layout (see ``as_tensors``)."""
    parts = as_tensors(owner, layout)
    if len(parts) != 1:
        raise ValueError("a layout of full and windowed layers has two parts: use as_tensors")
    return parts[0]

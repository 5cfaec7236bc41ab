"""What a prompt's KV looks like in transit, and which machine we are on."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import msgspec

from dynamo_lite.protocol import KvDescriptor

DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


class KvLayout(msgspec.Struct, frozen=True):
    """Shape of one sequence's KV: ``(num_layers, 2, num_kv_heads, num_tokens, head_dim)``, C-contiguous,
    K then V for each layer.

    >>> KvLayout(30, 3, 64, "float32", 2048).nbytes  # SmolLM2-135M, 2048 tokens
    94371840
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    num_tokens: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"unsupported KV dtype {self.dtype!r} (one of {sorted(DTYPE_SIZES)})")
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.num_tokens) <= 0:
            raise ValueError(f"bad KV layout {self}")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.num_tokens, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.num_tokens

    @classmethod
    def from_descriptor(cls, desc: KvDescriptor) -> KvLayout:
        """The layout a descriptor announces; ``ValueError`` if malformed or disagreeing with ``nbytes``."""
        layout = cls(desc.num_layers, desc.num_kv_heads, desc.head_dim, desc.dtype, desc.num_tokens)
        if layout.nbytes != desc.nbytes:
            raise ValueError(f"descriptor says {desc.nbytes} bytes, its layout {layout.nbytes}")
        return layout

    def descriptor_fields(self) -> dict[str, Any]:
        """The ``KvDescriptor`` keyword arguments that describe this layout."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "num_tokens": self.num_tokens,
            "nbytes": self.nbytes,
        }


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


def as_tensor(owner: Any, layout: KvLayout) -> Any:
    """A torch tensor of ``layout.shape`` over ``owner``'s memory (no copy; torch is imported lazily).

    The tensor keeps ``owner`` alive, so it stays valid even after the hold or pull that made it is closed.
    """
    import warnings

    import torch

    dtype = getattr(torch, layout.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": the caller only reads it
        flat = torch.frombuffer(owner, dtype=torch.uint8, count=layout.nbytes)
    return flat.view(dtype).view(layout.shape)

"""What a weights holder and a worker say on the holder's local Unix socket: msgspec structs, never pickle.

A worker connects and sends an ``Attach``; the holder answers a ``Manifest``: where each storage of the weights
lives (a shared-memory file, or a CUDA IPC handle of the holder's device memory) and how each tensor views it.
The connection then stays open for as long as the worker runs, carrying nothing: it is the liveness signal both
ways. The holder logs a worker's detach when it closes; a worker treats its closing as the holder's death
(``client.watch_owner``).

Each message is a 4-byte big-endian length and a msgpack body of at most ``MAX_MANIFEST_BYTES``.
"""

from __future__ import annotations

import socket
import struct
from typing import TypeVar

import msgspec

from dynamo_lite.protocol import WIRE_VERSION, WireError, WireIntEnum, decode, encode

MAX_MANIFEST_BYTES = 8 * 1024 * 1024  # gpt-oss-120b's ~540 tensors take ~100 KB


class StorageKind(WireIntEnum):
    UNRECOGNIZED = -1  # a newer holder's: the worker refuses to attach
    SHM = 1  # a file under /dev/shm, mapped MAP_SHARED by every process
    CUDA_IPC = 2  # a cudaIpcMemHandle of the holder's allocation (torch's CUDA storage sharing)


class _Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """As ``dynamo_lite.protocol``'s wire messages: trailing fields a reader doesn't know are ignored."""


class Attach(_Wire):
    pid: int
    role: str = ""  # for the holder's log: prefill, decode, agg
    version: int = WIRE_VERSION


class StorageRef(_Wire):
    """One storage of the holder (several tensors may view it: tied weights, or a caching-allocator block)."""

    kind: StorageKind
    nbytes: int
    path: str = ""  # SHM: the file
    device: int = 0  # CUDA_IPC: the holder's device index; `gpu_uuid` says which GPU it is
    handle: bytes = b""  # CUDA_IPC: torch's ``_share_cuda_`` fields, in its order
    offset_bytes: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False


class TensorRef(_Wire):
    path: str  # where it sits in the weights tree ("layers.3.gate_up.blocks")
    storage: int  # index into Manifest.storages
    dtype: str  # torch dtype name ("bfloat16")
    shape: list[int]
    stride: list[int]
    offset: int  # storage offset, in elements


class NodeRef(_Wire):
    path: str
    kind: str  # a registered dataclass's name, "list", or "none"
    length: int = 0  # list: how many items


class Manifest(_Wire):
    fingerprint: str  # what the weights are (model, dtype, quantization, load format): a worker must agree
    device_type: str  # "cpu" or "cuda"
    gpu_uuid: str  # CUDA: the GPU the storages live on (a worker on another GPU can't use them)
    storages: list[StorageRef]
    tensors: list[TensorRef]
    nodes: list[NodeRef]
    holder_pid: int = 0
    error: str = ""  # set (and nothing else) when the holder will not serve: the worker reports it
    version: int = WIRE_VERSION


_LEN = struct.Struct(">I")
T = TypeVar("T")


def send(sock: socket.socket, msg: msgspec.Struct) -> None:
    body = encode(msg)
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket, kind: type[T]) -> T:
    """One framed message of type ``kind`` (``WireError`` if it is not one, ``ConnectionError`` on EOF)."""
    (size,) = _LEN.unpack(_recv_exactly(sock, _LEN.size))
    if size > MAX_MANIFEST_BYTES:
        raise WireError(f"{kind.__name__}: {size}-byte message exceeds {MAX_MANIFEST_BYTES}")
    return decode(_recv_exactly(sock, size), kind)

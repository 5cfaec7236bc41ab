"""The KV transfer's control messages and their framing on a raw socket.

One connection carries one transfer. The importer sends a ``KvRequest``; the exporter answers a ``KvReply``.

- ``CLAIM`` (shared memory): the importer has mapped the segment and asks for permission to read it. The
  connection stays open while it copies; ``DONE`` (or the connection closing) lets the exporter free it.
- ``FETCH`` (TCP): the exporter answers, then streams exactly ``nbytes`` raw bytes and frees the hold.
- ``RELEASE``: nobody will pull it (the request was cancelled between prefill and decode): free it now.
- ``CLAIM`` of a CUDA hold: the importer has opened the exporter's device pool (``cuda_ipc``) and copies
  from it; ``DONE`` once its copy has finished.
- ``STAGE`` (a CUDA hold the importer can't open): the exporter copies it into a new shm segment, answers its
  name, and frees both at ``DONE``, like ``CLAIM``.

Each message is a 4-byte big-endian length and a msgpack body, at most ``MAX_HEADER_BYTES``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TypeVar

import msgspec

from dynamo_lite.kv.config import MAX_HEADER_BYTES
from dynamo_lite.protocol import WIRE_VERSION, WireError, WireIntEnum, decode, encode


class KvOp(WireIntEnum):
    UNRECOGNIZED = -1  # a newer importer's: refused as BAD_REQUEST
    CLAIM = 1
    FETCH = 2
    DONE = 3
    RELEASE = 4
    STAGE = 5


class KvStatus(WireIntEnum):
    UNRECOGNIZED = -1  # a newer exporter's: the pull failed (the decode worker recomputes)
    OK = 0
    UNKNOWN = 1  # no such transfer: never published, already freed, or its lease expired
    DENIED = 2  # wrong secret
    CLAIMED = 3  # someone already claimed it
    BAD_REQUEST = 4


class _KvWire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """As ``dynamo_lite.protocol``'s wire messages: trailing fields a reader doesn't know are ignored; a
    ``KvReply`` is written in its request's version."""


class KvRequest(_KvWire):
    op: KvOp
    transfer_id: str = ""
    secret: str = ""
    checksums: list[str] = []  # what the importer can verify, preferred first
    version: int = WIRE_VERSION


class KvReply(_KvWire):
    status: KvStatus
    message: str = ""
    nbytes: int = 0
    checksum_algo: str = ""
    checksum: int = 0
    shm_name: str = ""  # STAGE: the segment the hold was staged into


_LEN = struct.Struct(">I")
T = TypeVar("T")


def frame(msg: msgspec.Struct) -> bytes:
    body = encode(msg)
    return _LEN.pack(len(body)) + body


async def recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ``ConnectionError`` if the peer closes first."""
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


async def recv_message(loop: asyncio.AbstractEventLoop, sock: socket.socket, kind: type[T]) -> T:
    head = bytearray(_LEN.size)
    await recv_exactly(loop, sock, memoryview(head))
    (size,) = _LEN.unpack(head)
    if size > MAX_HEADER_BYTES:
        raise WireError(f"{kind.__name__}: {size}-byte message exceeds {MAX_HEADER_BYTES}")
    body = bytearray(size)
    await recv_exactly(loop, sock, memoryview(body))
    return decode(bytes(body), kind)


def tune_socket(sock: socket.socket, buffer_bytes: int) -> None:
    """No Nagle delay on the small control messages; big buffers for the bulk bytes when the kernel allows
    them (setting a buffer disables autotuning, so a clamped small one would only slow us down)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes <= 0:
        return
    for opt, limit_file in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
        if buffer_bytes <= _kernel_limit(limit_file):
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)


_limits: dict[str, int] = {}


def _kernel_limit(name: str) -> int:
    if name not in _limits:
        try:
            with open(f"/proc/sys/net/core/{name}") as f:
                _limits[name] = int(f.read())
        except (OSError, ValueError):
            _limits[name] = 1 << 62  # not Linux: the OS clamps silently, nothing to protect
    return _limits[name]

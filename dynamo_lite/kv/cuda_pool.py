"""The exporter's side of the CUDA IPC handoff: one device buffer per process (``CudaKvPool``, plain
``cudaMalloc``) carved into holds, and the reference to a hold that travels in ``KvDescriptor.cuda_ipc``
(``CudaIpcRef``: the pool's IPC handle and the hold's offset)."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import msgspec

from dynamo_lite.kv.cudart import CudaIpcUnavailable, CudaRuntime, get_runtime, on_device
from dynamo_lite.kv.errors import KvPullError

_ALIGN = 1 << 16  # pool ranges start on 64 KiB: keeps pitched copies on aligned addresses


class CudaIpcRef(msgspec.Struct, array_like=True, frozen=True):
    """What ``KvDescriptor.cuda_ipc`` carries: the exporter's pool and where the hold lies in it."""

    handle: bytes  # cudaIpcMemHandle_t of the pool allocation
    offset: int
    pool_nbytes: int
    pid: int  # the exporting process: a process can't open its own handle, it uses the pointer directly


_ref_decoder = msgspec.msgpack.Decoder(CudaIpcRef)


def encode_ref(ref: CudaIpcRef) -> bytes:
    return msgspec.msgpack.encode(ref)


def decode_ref(data: bytes) -> CudaIpcRef:
    try:
        return _ref_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise KvPullError(f"bad cuda_ipc field in KV descriptor: {e}") from e


_local_pools: weakref.WeakValueDictionary[bytes, CudaKvPool] = weakref.WeakValueDictionary()


class CudaKvPool:
    """One device allocation that holds KV for transfer, carved into ranges (first fit, coalescing)."""

    def __init__(self, device_index: int, nbytes: int, runtime: CudaRuntime | None = None) -> None:
        rt = runtime or get_runtime()
        if rt is None:
            raise CudaIpcUnavailable("no CUDA runtime")
        self.runtime = rt
        self.device_index = device_index
        self.nbytes = nbytes // _ALIGN * _ALIGN
        if self.nbytes <= 0:
            raise ValueError(f"pool of {nbytes} bytes is too small")
        with on_device(rt, device_index):
            self.ptr = rt.malloc(self.nbytes)
            try:
                self.handle = rt.ipc_handle(self.ptr)
            except BaseException:
                rt.free(self.ptr)
                raise
        self.uuid = rt.gpu_uuid(device_index)
        self.tensor = rt.as_tensor(self.ptr, self.nbytes, device_index)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.nbytes)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}
        self._closed = False
        _local_pools[self.handle] = self

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh range of ``nbytes``, or None when no free range is large enough."""
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        with self._lock:
            if self._closed:
                return None
            for i, (off, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, free - size)
                    self._used[off] = size
                    return off
        return None

    def release(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset)
            self._free.append((offset, size))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for off, n in self._free:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((off, n))
            self._free = merged

    def view(self, offset: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
        """A torch view of ``shape``/``dtype`` over ``nbytes`` at ``offset``."""
        return self.tensor[offset : offset + nbytes].view(dtype).view(shape)

    def ref(self, offset: int) -> CudaIpcRef:
        return CudaIpcRef(self.handle, offset, self.nbytes, os.getpid())

    def synchronize(self) -> None:
        """Wait for writes issued on this device's current stream (before a descriptor leaves)."""
        self.runtime.synchronize(self.device_index)

    def close(self) -> None:
        """Free the device memory. Only once nothing is in transit: importers read it directly."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _local_pools.pop(self.handle, None)
        self.tensor = None
        with on_device(self.runtime, self.device_index):
            self.runtime.free(self.ptr)

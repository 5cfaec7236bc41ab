"""The few CUDA runtime calls the KV handoff needs (``CudaRuntime``), reached through ctypes (``Cudart``: the
``libcudart`` torch already loaded, so handles, devices and streams are shared with torch). ``set_runtime`` swaps
in another implementation: the tests use a host-memory fake, so the pool, the copy planning and the protocol run
on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from dynamo_lite.kv.errors import KvTransferError

log = logging.getLogger(__name__)

_IPC_HANDLE_BYTES = 64
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction inferred from the (unified) addresses
_LAZY_PEER = 1  # cudaIpcMemLazyEnablePeerAccess: a handle of another GPU opens in this GPU's context


class CudaIpcError(KvTransferError):
    """A CUDA runtime call failed."""


class CudaIpcUnavailable(CudaIpcError):
    """This pair of processes can't share device memory (no GPU runtime, GPU not visible, no peer access):
    the importer falls back to host staging or TCP."""


class CudaRuntime(Protocol):
    """The few CUDA runtime calls the handoff needs. Pointers and streams are plain ints."""

    def usable(self, device: Any) -> int:
        """The device index IPC can copy into for ``device`` (a torch device), or -1."""
        ...

    def get_device(self) -> int: ...

    def set_device(self, index: int) -> None: ...

    def malloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def ipc_handle(self, ptr: int) -> bytes: ...

    def ipc_open(self, handle: bytes) -> int: ...

    def ipc_close(self, ptr: int) -> None: ...

    def memcpy_2d_async(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int
    ) -> None: ...

    def stream(self, index: int) -> int:
        """The current torch stream of device ``index`` (what the caller's work is ordered on)."""
        ...

    def record_event(self, index: int, timing: bool = False) -> Any:
        """An object whose ``synchronize()`` waits for the work issued so far on ``stream(index)`` (``timing``:
        a CUDA event ``elapsed_time`` works on)."""
        ...

    def synchronize(self, index: int) -> None:
        """Wait for the work issued so far on ``stream(index)``."""
        ...

    def as_tensor(self, ptr: int, nbytes: int, index: int) -> Any:
        """A torch uint8 tensor over ``nbytes`` at ``ptr`` (no copy)."""
        ...

    def gpu_uuid(self, index: int) -> str: ...

    def index_of_uuid(self, uuid: str) -> int:
        """The local index of the GPU with ``uuid``; -1 if this process can't see it."""
        ...

    def can_access_peer(self, index: int, peer: int) -> bool: ...


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _IPC_HANDLE_BYTES)]


class _CudaArray:
    """``__cuda_array_interface__`` over a raw device pointer, for ``torch.as_tensor``."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def _find_libcudart() -> str | None:
    """The libcudart torch loaded (same runtime state as torch), else one found on disk."""
    with contextlib.suppress(OSError), open("/proc/self/maps") as f:
        for line in f:
            path = line.rsplit(maxsplit=1)[-1]
            if "libcudart.so" in os.path.basename(path):
                return path
    found = ctypes.util.find_library("cudart")
    if found:
        return found
    import torch

    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so*"), recursive=True))
        if hits:
            return hits[-1]
    return None


class Cudart:
    """``CudaRuntime`` over libcudart through ctypes."""

    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)
        self._lib = lib
        self.path = path
        c_int, c_size, vp = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
        sigs: dict[str, list[Any]] = {
            "cudaGetDevice": [ctypes.POINTER(c_int)],
            "cudaSetDevice": [c_int],
            "cudaMalloc": [ctypes.POINTER(vp), c_size],
            "cudaFree": [vp],
            "cudaIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), vp],
            "cudaIpcOpenMemHandle": [ctypes.POINTER(vp), _IpcHandle, ctypes.c_uint],
            "cudaIpcCloseMemHandle": [vp],
            "cudaMemcpy2DAsync": [vp, c_size, vp, c_size, c_size, c_size, c_int, vp],
            "cudaGetLastError": [],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = c_int
        lib.cudaGetErrorString.argtypes = [c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            self._lib.cudaGetLastError()  # clear it, or torch's next launch check reports our failure
            msg = self._lib.cudaGetErrorString(rc)
            raise CudaIpcError(f"{what}: {msg.decode() if msg else 'error'} ({rc})")

    def usable(self, device: Any) -> int:
        if getattr(device, "type", None) != "cuda":
            return -1
        import torch

        return device.index if device.index is not None else torch.cuda.current_device()

    def get_device(self) -> int:
        out = ctypes.c_int()
        self._check(self._lib.cudaGetDevice(ctypes.byref(out)), "cudaGetDevice")
        return out.value

    def set_device(self, index: int) -> None:
        self._check(self._lib.cudaSetDevice(index), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self._lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self._check(self._lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check(
            self._lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle"
        )
        return bytes(handle.reserved)

    def ipc_open(self, handle: bytes) -> int:
        if len(handle) != _IPC_HANDLE_BYTES:
            raise CudaIpcError(f"IPC handle of {len(handle)} bytes, expected {_IPC_HANDLE_BYTES}")
        h = _IpcHandle()
        ctypes.memmove(ctypes.addressof(h), handle, _IPC_HANDLE_BYTES)
        ptr = ctypes.c_void_p()
        self._check(self._lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, _LAZY_PEER), "cudaIpcOpenMemHandle")
        return int(ptr.value or 0)

    def ipc_close(self, ptr: int) -> None:
        self._check(self._lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")

    def memcpy_2d_async(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int
    ) -> None:
        rc = self._lib.cudaMemcpy2DAsync(
            ctypes.c_void_p(dst),
            dpitch,
            ctypes.c_void_p(src),
            spitch,
            width,
            height,
            _MEMCPY_DEFAULT,
            ctypes.c_void_p(stream),
        )
        self._check(rc, "cudaMemcpy2DAsync")

    def stream(self, index: int) -> int:
        import torch

        return int(torch.cuda.current_stream(index).cuda_stream)

    def record_event(self, index: int, timing: bool = False) -> Any:
        import torch

        event = torch.cuda.Event(enable_timing=timing)
        event.record(torch.cuda.current_stream(index))
        return event

    def synchronize(self, index: int) -> None:
        import torch

        torch.cuda.current_stream(index).synchronize()

    def as_tensor(self, ptr: int, nbytes: int, index: int) -> Any:
        import torch

        return torch.as_tensor(_CudaArray(ptr, nbytes), device=f"cuda:{index}")

    def gpu_uuid(self, index: int) -> str:
        import torch

        return str(torch.cuda.get_device_properties(index).uuid)

    def index_of_uuid(self, uuid: str) -> int:
        import torch

        for i in range(torch.cuda.device_count()):
            if self.gpu_uuid(i) == uuid:
                return i
        return -1

    def can_access_peer(self, index: int, peer: int) -> bool:
        import torch

        return bool(torch.cuda.can_device_access_peer(index, peer))


_runtime_lock = threading.Lock()
_runtime: CudaRuntime | None = None
_runtime_tried = False


def get_runtime() -> CudaRuntime | None:
    """The CUDA runtime (loaded once); None where there is no usable GPU."""
    global _runtime, _runtime_tried
    with _runtime_lock:
        if _runtime is None and not _runtime_tried:
            _runtime_tried = True
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.init()  # loads libcudart, so /proc/self/maps names it
                    path = _find_libcudart()
                    if path is None:
                        log.warning("CUDA IPC off: no libcudart found")
                    else:
                        _runtime = Cudart(path)
            except Exception as e:  # no torch, broken driver: the handoff goes through the host
                log.warning("CUDA IPC off: %s", e)
        return _runtime


def set_runtime(runtime: CudaRuntime | None) -> None:
    """Use ``runtime`` from now on (tests; None: find the real one again on next use)."""
    global _runtime, _runtime_tried
    with _runtime_lock:
        _runtime, _runtime_tried = runtime, runtime is not None


@contextlib.contextmanager
def on_device(rt: CudaRuntime, index: int) -> Iterator[None]:
    """Run runtime calls with ``index`` current, then restore the thread's device (torch relies on it)."""
    previous = rt.get_device()
    if previous != index:
        rt.set_device(index)
    try:
        yield
    finally:
        if previous != index:
            rt.set_device(previous)

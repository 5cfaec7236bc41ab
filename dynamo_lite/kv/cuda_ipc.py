"""KV handoff between processes of one host by CUDA IPC (same GPU or a peer GPU).

The prefill side keeps its KV holds in one device buffer per process (``CudaKvPool``, plain ``cudaMalloc``)
whose IPC handle travels in the ``KvDescriptor`` with the hold's offset. The decode side opens a pool once per
process and keeps it open (``open_source``: opening a mapping costs far more than copying a prompt's KV), then
copies a hold straight into its own cache slot on its own current stream, in the decode GPU's context, and
records an event: on one GPU with one Triton kernel over the slot's rows (``cuda_copy``), from a peer GPU with a
few pitched copies (``cudaMemcpy2DAsync``) so the decode GPU's copy engines pull over NVLink;
``KvPulled.close`` waits for that event before it tells the exporter DONE, so the pool range is reused only
after the copy finished. Nothing touches the prefill GPU's streams from the decode process.

Why not torch's own CUDA tensor sharing (what torch.multiprocessing does): measured on 2 H100s (NV18), it maps
a fresh IPC handle per transfer (0.15-1.6 ms each, the very first 7-16 ms) and copies across GPUs on the
*source* GPU's stream behind a full device sync: 96-152 GB/s overall for 64-256 MiB. Mapping the pool once
and copying on the consumer's stream, timed on the GPU: 322-375 GB/s GPU to GPU for 64-256 MiB (89-97% of a
plain peer copy), 1289-1401 GB/s on one GPU with the row kernel (95%; pitched copies reached 60-77% there).
``benchmarks/gpu/kv_handoff_cuda.py`` measures all of it.

The CUDA runtime is reached through ctypes (the ``libcudart`` torch already loaded, so handles, devices and
streams are shared with torch); ``set_runtime`` swaps in another implementation (the tests use a host-memory
fake, so the bookkeeping, the copy planning and the protocol run on machines without a GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import logging
import math
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from dynamo_lite.kv.errors import KvPullError, KvTransferError

log = logging.getLogger(__name__)

_ALIGN = 1 << 16  # pool ranges start on 64 KiB: keeps pitched copies on aligned addresses
_MAX_OPEN_POOLS = 16  # opened remote pools kept mapped per process (one per prefill process, normally)
_IPC_HANDLE_BYTES = 64
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction inferred from the (unified) addresses
_LAZY_PEER = 1  # cudaIpcMemLazyEnablePeerAccess: a handle of another GPU opens in this GPU's context


class CudaIpcError(KvTransferError):
    """A CUDA runtime call failed."""


class CudaIpcUnavailable(CudaIpcError):
    """This pair of processes can't share device memory (no GPU runtime, GPU not visible, no peer access):
    the importer falls back to host staging or TCP."""


class CudaIpcRef(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
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


# ---- the runtime ----


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


# ---- copy planning ----


@dataclass(frozen=True, slots=True)
class Copy2D:
    """One pitched copy, all in bytes: ``height`` rows of ``width`` bytes."""

    dst_offset: int
    dst_pitch: int
    src_offset: int
    src_pitch: int
    width: int
    height: int


MAX_PITCH = (1 << 31) - 1  # cudaMemcpy2D refuses larger pitches (cudaDevAttrMaxPitch)


def plan_copies(
    shape: tuple[int, ...],
    dst_strides: tuple[int, ...],
    src_strides: tuple[int, ...],
    itemsize: int,
    max_pitch: int = MAX_PITCH,
) -> list[Copy2D]:
    """The fewest pitched copies that move a ``shape`` tensor between two strided layouts (strides in
    elements; the innermost dimension must be dense in both). Dimensions that are contiguous with their
    inner neighbour in both layouts are merged first; of what is left, the largest outer dimension whose
    pitches stay within ``max_pitch`` becomes the copies' rows and the others are looped over."""
    if not (len(shape) == len(dst_strides) == len(src_strides)):
        raise ValueError("shape and strides disagree")
    dims = [(n, d, s) for n, d, s in zip(shape, dst_strides, src_strides, strict=True) if n != 1]
    if any(n == 0 for n in shape):
        return []
    if not dims:
        return [Copy2D(0, itemsize, 0, itemsize, itemsize, 1)]
    merged = [dims[-1]]
    for n, d, s in reversed(dims[:-1]):
        inner_n, inner_d, inner_s = merged[0]
        if d == inner_n * inner_d and s == inner_n * inner_s:
            merged[0] = (n * inner_n, inner_d, inner_s)
        else:
            merged.insert(0, (n, d, s))
    inner_n, inner_d, inner_s = merged[-1]
    if inner_d != 1 or inner_s != 1:
        raise ValueError("the innermost dimension must be contiguous in both layouts")
    width = inner_n * itemsize
    outer = merged[:-1]
    if not outer:
        return [Copy2D(0, width, 0, width, width, 1)]
    fits = [i for i, (_, d, s) in enumerate(outer) if max(d, s) * itemsize <= max_pitch]
    if fits:
        rows_at = max(fits, key=lambda i: outer[i][0])
        rows, row_d, row_s = outer[rows_at]
    else:  # every pitch too large: one row per copy
        rows_at, rows, row_d, row_s = -1, 1, 0, 0
    loops = [dim for i, dim in enumerate(outer) if i != rows_at]
    copies: list[Copy2D] = []

    def walk(level: int, d_off: int, s_off: int) -> None:
        if level == len(loops):
            d_pitch, s_pitch = (row_d * itemsize, row_s * itemsize) if rows > 1 else (width, width)
            copies.append(Copy2D(d_off * itemsize, d_pitch, s_off * itemsize, s_pitch, width, rows))
            return
        n, d, s = loops[level]
        for i in range(n):
            walk(level + 1, d_off + i * d, s_off + i * s)

    walk(0, 0, 0)
    return copies


@functools.lru_cache(maxsize=256)
def _cached_plan(shape: tuple[int, ...], dst_strides: tuple[int, ...], itemsize: int) -> tuple[Copy2D, ...]:
    """``plan_copies`` from a C-contiguous hold, memoized: a decode worker sees the same few layouts."""
    return tuple(plan_copies(shape, dst_strides, contiguous_strides(shape), itemsize))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


# ---- the exporter's pool ----

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


# ---- the importer's side ----


@dataclass(slots=True, eq=False)
class _Opened:
    ptr: int
    in_use: int = 0


_open_lock = threading.Lock()
_opened: OrderedDict[tuple[bytes, int], _Opened] = OrderedDict()
_stats = {"opens": 0, "closes": 0}
ALLOW_LOCAL_SHORTCUT = True  # tests switch it off to exercise the open path within one process
# How a hold is copied into the cache: "auto" (the kernel on one GPU, the copy engines from a peer, the faster
# of each measured on H100s by benchmarks/gpu/kv_handoff_cuda.py), "kernel" or "memcpy" (benchmarks).
COPY_METHOD = "auto"


class CudaSource:
    """A hold of another process's pool, readable from this process's GPU ``device_index``."""

    def __init__(
        self,
        ptr: int,
        nbytes: int,
        device_index: int,
        runtime: CudaRuntime,
        key: Any = None,
        source_index: int | None = None,
    ) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.device_index = device_index
        self.source_index = device_index if source_index is None else source_index
        self.started: Any = None  # with copy_into(timing=True): an event recorded just before the copy
        self.runtime = runtime
        self._key = key
        self._released = False

    def copy_into(
        self,
        dest: Any,
        shape: tuple[int, ...],
        itemsize: int,
        *,
        src_offset: int = 0,
        timing: bool = False,
        time_start: bool = True,
    ) -> Any:
        """Copy the C-contiguous ``shape`` at byte ``src_offset`` of the hold into the torch tensor ``dest``
        (same shape, any strides with a dense last dimension) on ``dest``'s current stream; returns an event to
        wait on (or None). ``timing`` (benchmarks): both events time the copy, ``started`` being recorded just
        before it (unless ``time_start`` is False: a later part of one transfer keeps the first's start)."""
        if tuple(dest.shape) != tuple(shape) or dest.element_size() != itemsize:
            raise ValueError(f"destination {tuple(dest.shape)}x{dest.element_size()} != {shape}x{itemsize}")
        nbytes = math.prod(shape) * itemsize
        if src_offset < 0 or src_offset + nbytes > self.nbytes:
            raise ValueError(f"bytes {src_offset}..{src_offset + nbytes} outside a hold of {self.nbytes}")
        rt = self.runtime
        index = rt.usable(dest.device)
        if index < 0:
            raise ValueError(f"can't copy device memory into {dest.device}")
        plan = _cached_plan(tuple(shape), tuple(dest.stride()), itemsize)
        base = dest.data_ptr()
        src = self.ptr + src_offset
        with on_device(rt, index):
            if time_start:
                self.started = rt.record_event(index, timing=True) if timing else None
            if not self._copy_by_kernel(plan, base, src, index):
                stream = rt.stream(index)
                for c in plan:
                    rt.memcpy_2d_async(
                        base + c.dst_offset,
                        c.dst_pitch,
                        src + c.src_offset,
                        c.src_pitch,
                        c.width,
                        c.height,
                        stream,
                    )
            return rt.record_event(index, timing=timing)

    def _copy_by_kernel(self, plan: tuple[Copy2D, ...], base: int, src: int, index: int) -> bool:
        """The one-launch row copy, where chosen and possible (real CUDA, Triton, aligned rows)."""
        method = (
            COPY_METHOD if COPY_METHOD != "auto" else ("kernel" if self.source_index == index else "memcpy")
        )
        if method != "kernel" or not isinstance(self.runtime, Cudart):
            return False
        from dynamo_lite.kv import cuda_copy

        table = cuda_copy.row_table(plan, index)
        return table is not None and cuda_copy.copy_rows(table, base, src, index)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._key is not None:
            with _open_lock:
                entry = _opened.get(self._key)
                if entry is not None:
                    entry.in_use -= 1


def open_source(cuda_ipc: bytes, gpu_uuid: str, nbytes: int, device: Any) -> CudaSource:
    """Map the hold a descriptor's ``cuda_ipc`` names for copying into ``device`` (a torch device).

    Raises ``CudaIpcUnavailable`` when this process can't reach it (the caller falls back), ``KvPullError``
    when the reference itself is malformed.
    """
    ref = decode_ref(cuda_ipc)
    if ref.offset < 0 or nbytes < 0 or ref.offset + nbytes > ref.pool_nbytes:
        raise KvPullError(f"KV range {ref.offset}+{nbytes} outside a pool of {ref.pool_nbytes} bytes")
    rt = get_runtime()
    if rt is None:
        raise CudaIpcUnavailable("no CUDA runtime here")
    index = rt.usable(device)
    if index < 0:
        raise CudaIpcUnavailable(f"{device} is not a CUDA device")
    if ALLOW_LOCAL_SHORTCUT and ref.pid == os.getpid():
        pool = _local_pools.get(ref.handle)
        if pool is not None:  # our own pool: the pointer is valid as it is
            if pool.device_index != index and not rt.can_access_peer(index, pool.device_index):
                raise CudaIpcUnavailable(f"GPU {index} has no peer access to GPU {pool.device_index}")
            return CudaSource(pool.ptr + ref.offset, nbytes, index, rt, source_index=pool.device_index)
    source_index = rt.index_of_uuid(gpu_uuid)
    if source_index < 0:
        raise CudaIpcUnavailable(f"GPU {gpu_uuid} is not visible to this process")
    if source_index != index and not rt.can_access_peer(index, source_index):
        raise CudaIpcUnavailable(f"GPU {index} has no peer access to GPU {source_index}")
    key = (ref.handle, index)
    with _open_lock:
        entry = _opened.get(key)
        if entry is None:
            try:
                with on_device(rt, index):
                    ptr = rt.ipc_open(ref.handle)
            except CudaIpcError as e:
                raise CudaIpcUnavailable(str(e)) from e
            _stats["opens"] += 1
            entry = _Opened(ptr)
            _opened[key] = entry
            _evict_idle(rt)
        _opened.move_to_end(key)
        entry.in_use += 1
    return CudaSource(entry.ptr + ref.offset, nbytes, index, rt, key, source_index)


def _evict_idle(rt: CudaRuntime) -> None:
    """Close the least recently used idle mappings beyond ``_MAX_OPEN_POOLS`` (called with the lock held)."""
    for key in list(_opened):
        if len(_opened) <= _MAX_OPEN_POOLS:
            return
        entry = _opened[key]
        if entry.in_use == 0:
            del _opened[key]
            try:
                with on_device(rt, key[1]):
                    rt.ipc_close(entry.ptr)
                _stats["closes"] += 1
            except CudaIpcError as e:
                log.warning("closing a CUDA IPC mapping failed: %s", e)


def open_count() -> dict[str, int]:
    """How many remote pools this process opened and closed (diagnostics and tests)."""
    with _open_lock:
        return {**_stats, "open": len(_opened)}


def close_all() -> None:
    """Close every idle mapping (tests, shutdown)."""
    rt = get_runtime()
    with _open_lock:
        for key, entry in list(_opened.items()):
            if entry.in_use == 0:
                del _opened[key]
                if rt is not None:
                    with contextlib.suppress(CudaIpcError), on_device(rt, key[1]):
                        rt.ipc_close(entry.ptr)
                    _stats["closes"] += 1

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

Its parts: ``cudart`` (the CUDA runtime calls, through ctypes; ``set_runtime`` swaps in the tests' host-memory
fake, so all of this runs without a GPU), ``cuda_pool`` (the exporter's pool and the reference a descriptor
carries), ``copy_plan`` (pitched copies between strided layouts), ``cuda_copy`` (the one-kernel row copy), and
this module: the importer's side, opening other processes' pools once and copying holds out of them. The parts'
names are importable from here too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from dynamo_lite.kv.copy_plan import Copy2D, _cached_plan, contiguous_strides, plan_copies
from dynamo_lite.kv.cuda_pool import CudaIpcRef, CudaKvPool, _local_pools, decode_ref, encode_ref
from dynamo_lite.kv.cudart import (
    CudaIpcError,
    CudaIpcUnavailable,
    Cudart,
    CudaRuntime,
    get_runtime,
    on_device,
    set_runtime,
)
from dynamo_lite.kv.errors import KvPullError

__all__ = [
    "ALLOW_LOCAL_SHORTCUT",
    "COPY_METHOD",
    "Copy2D",
    "CudaIpcError",
    "CudaIpcRef",
    "CudaIpcUnavailable",
    "CudaKvPool",
    "CudaRuntime",
    "CudaSource",
    "Cudart",
    "close_all",
    "contiguous_strides",
    "decode_ref",
    "encode_ref",
    "get_runtime",
    "on_device",
    "open_count",
    "open_source",
    "plan_copies",
    "set_runtime",
]

log = logging.getLogger(__name__)

_MAX_OPEN_POOLS = 16  # opened remote pools kept mapped per process (one per prefill process, normally)


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
        src_strides: tuple[int, ...] | None = None,
        timing: bool = False,
        time_start: bool = True,
    ) -> Any:
        """Copy the C-contiguous ``shape`` at byte ``src_offset`` of the hold into the torch tensor ``dest``
        (same shape, any strides with a dense last dimension) on ``dest``'s current stream; returns an event to
        wait on (or None). ``src_strides`` (elements, innermost dense): the source is a strided part of the hold
        instead — say some KV heads of every layer, what one rank of a ranked engine takes (pitched copies
        then, never the row kernel). ``timing`` (benchmarks): both events time the copy, ``started`` being
        recorded just before it (unless ``time_start`` is False: a later part of one transfer keeps the
        first's start)."""
        if tuple(dest.shape) != tuple(shape) or dest.element_size() != itemsize:
            raise ValueError(f"destination {tuple(dest.shape)}x{dest.element_size()} != {shape}x{itemsize}")
        self._check_range(shape, itemsize, src_offset, src_strides)
        rt = self.runtime
        index = rt.usable(dest.device)
        if index < 0:
            raise ValueError(f"can't copy device memory into {dest.device}")
        if src_strides is None:
            plan = _cached_plan(tuple(shape), tuple(dest.stride()), itemsize)
        else:
            plan = tuple(plan_copies(tuple(shape), tuple(dest.stride()), tuple(src_strides), itemsize))
        base = dest.data_ptr()
        src = self.ptr + src_offset
        with on_device(rt, index):
            if time_start:
                self.started = rt.record_event(index, timing=True) if timing else None
            if src_strides is not None or not self._copy_by_kernel(plan, base, src, index):
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

    def copy_from(
        self, src: Any, itemsize: int, *, dst_offset: int = 0, dst_strides: tuple[int, ...] | None = None
    ) -> Any:
        """The reverse of ``copy_into``: write the torch tensor ``src`` (any strides with a dense last dimension,
        on a GPU of this process) into the hold at byte ``dst_offset``, C-contiguous or laid out by
        ``dst_strides`` (elements) — a ranked engine's follower writing its KV heads into rank 0's export hold.
        Pitched copies on ``src``'s current stream: the source GPU's copy engines write to the hold's GPU, no
        kernel runs there. Returns an event to wait on."""
        shape = tuple(src.shape)
        if src.element_size() != itemsize:
            raise ValueError(f"source of {src.element_size()}-byte elements, expected {itemsize}")
        self._check_range(shape, itemsize, dst_offset, dst_strides)
        rt = self.runtime
        index = rt.usable(src.device)
        if index < 0:
            raise ValueError(f"can't copy {src.device} memory into device memory")
        plan = plan_copies(shape, dst_strides or contiguous_strides(shape), tuple(src.stride()), itemsize)
        base, dst = src.data_ptr(), self.ptr + dst_offset
        with on_device(rt, index):
            stream = rt.stream(index)
            for c in plan:
                rt.memcpy_2d_async(
                    dst + c.dst_offset,
                    c.dst_pitch,
                    base + c.src_offset,
                    c.src_pitch,
                    c.width,
                    c.height,
                    stream,
                )
            return rt.record_event(index)

    def _check_range(
        self, shape: tuple[int, ...], itemsize: int, offset: int, strides: tuple[int, ...] | None
    ) -> None:
        """Raise unless ``shape`` at byte ``offset`` of the hold (C-contiguous, or laid out by ``strides``) lies
        within it."""
        if strides is None:
            nbytes = math.prod(shape) * itemsize
        elif len(strides) != len(shape) or min(strides, default=1) < 0:
            raise ValueError(f"hold strides {strides} for a shape {tuple(shape)}")
        else:  # from the first element to one past the last
            last = sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
            nbytes = 0 if 0 in shape else (last + 1) * itemsize
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"bytes {offset}..{offset + nbytes} outside a hold of {self.nbytes}")

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

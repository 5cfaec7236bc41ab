"""Where the shared weights' bytes live, and how another process maps them: the holder's side (``export_*``)
and the worker's (``import_tensors``).

- CPU: one file under ``/dev/shm`` (an arena) holds every storage at a 4 KiB-aligned offset; every process maps
  it ``MAP_SHARED`` (``torch.UntypedStorage.from_file``), so the pages exist once. The holder copies its freshly
  built weights in and drops its private copy. A worker opens the file without ``O_CREAT``, and checks its size
  before mapping, so a holder gone between the manifest and the mapping is an error, never a zero-filled file.
- CUDA: the holder's own allocations, shared by torch's CUDA storage sharing (``_share_cuda_`` /
  ``_new_shared_cuda``: a ``cudaIpcMemHandle`` per caching-allocator block, opened once per block by each worker,
  an event the worker waits on before the first read). Nothing is copied: the worker's tensors are the holder's
  memory, which nvidia-smi counts in the holder alone. The fields travel as plain values in ``StorageRef``; a
  fresh export per attach gives each worker its own reference counter, as ``torch.multiprocessing`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dynamo_lite.engines.reference.shared_weights.wire import StorageKind, StorageRef, TensorRef

ALIGN = 4096  # storage offsets in the arena: a multiple of every element size, and page-aligned


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the weights manifest")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unique_storages(tensors: dict[str, torch.Tensor]) -> tuple[list[torch.UntypedStorage], dict[str, int]]:
    """The distinct storages under ``tensors`` (tied or viewing tensors share one) and each tensor's index."""
    storages: list[torch.UntypedStorage] = []
    index: dict[int, int] = {}
    of: dict[str, int] = {}
    for path, t in tensors.items():
        st = t.untyped_storage()
        key = st.data_ptr() if st.nbytes() else -1 - len(storages)  # empty storages all have pointer 0
        if key not in index:
            index[key] = len(storages)
            storages.append(st)
        of[path] = index[key]
    return storages, of


def _tensor_refs(tensors: dict[str, torch.Tensor], of: dict[str, int]) -> list[TensorRef]:
    return [
        TensorRef(path, of[path], _dtype_name(t.dtype), list(t.shape), list(t.stride()), t.storage_offset())
        for path, t in tensors.items()
    ]


class ShmArena:
    """The holder's CPU weights: one ``/dev/shm`` file with every storage, mapped for as long as it lives."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        storages, of = _unique_storages(tensors)
        offsets, size = [], 0
        for st in storages:
            offsets.append(size)
            size += -(-st.nbytes() // ALIGN) * ALIGN
        self.path = path
        self.nbytes = max(size, ALIGN)
        path.unlink(missing_ok=True)  # a stale arena of a holder killed before it could clean up
        self._arena = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=self.nbytes)
        arena = torch.empty(0, dtype=torch.uint8).set_(self._arena)
        for st, offset in zip(storages, offsets, strict=True):
            if st.nbytes():
                arena[offset : offset + st.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(st))
        self.storages = [
            StorageRef(StorageKind.SHM, st.nbytes(), path=str(path), offset_bytes=offset)
            for st, offset in zip(storages, offsets, strict=True)
        ]
        self.tensors = _tensor_refs(tensors, of)

    def close(self) -> None:
        """Remove the file (mappings that exist stay valid until their processes unmap them)."""
        self.path.unlink(missing_ok=True)


class CudaExport:
    """The holder's CUDA weights, kept alive here; ``refs`` shares them afresh for each attaching worker."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._storages, of = _unique_storages(tensors)
        self._tensors = tensors  # holds the memory for as long as the holder runs
        self.nbytes = sum(st.nbytes() for st in self._storages)
        self.tensors = _tensor_refs(tensors, of)
        torch.cuda.synchronize()  # every write done before any worker reads

    def refs(self) -> list[StorageRef]:
        out = []
        for st in self._storages:
            if not st.nbytes():
                out.append(StorageRef(StorageKind.CUDA_IPC, 0, device=st.device.index or 0))
                continue
            device, handle, size, offset, counter, counter_offset, event, sync = st._share_cuda_()
            out.append(
                StorageRef(
                    StorageKind.CUDA_IPC,
                    size,
                    device=device,
                    handle=handle,
                    offset_bytes=offset,
                    ref_counter_handle=counter,
                    ref_counter_offset=counter_offset,
                    event_handle=event or b"",
                    event_sync_required=bool(sync),
                )
            )
        return out


def _map_shm(path: str) -> torch.UntypedStorage:
    """The arena at ``path``, mapped shared; the file must exist and be whole (never created here)."""
    fd = os.open(path, os.O_RDWR)  # FileNotFoundError if the holder is gone: no empty file is made
    try:
        size = os.fstat(fd).st_size
        return torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=True, nbytes=size)
    finally:
        os.close(fd)  # the mapping keeps the pages


def import_tensors(
    storages: list[StorageRef], tensors: list[TensorRef], cuda_index: int | None = None
) -> dict[str, torch.Tensor]:
    """Map what a manifest describes: {path: tensor} viewing the holder's memory (no copy). ``cuda_index``:
    this process's index of the holder's GPU (CUDA storages)."""
    arenas: dict[str, torch.UntypedStorage] = {}
    opened: list[tuple[torch.UntypedStorage, int]] = []  # (storage, byte offset of the refs' storage in it)
    for ref in storages:
        if ref.kind == StorageKind.SHM:
            if ref.path not in arenas:
                arenas[ref.path] = _map_shm(ref.path)
            arena = arenas[ref.path]
            if ref.offset_bytes + ref.nbytes > arena.nbytes():
                raise ValueError(f"{ref.path}: {arena.nbytes()} bytes, the manifest needs more")
            opened.append((arena, ref.offset_bytes))
        elif ref.kind == StorageKind.CUDA_IPC:
            if cuda_index is None:
                raise ValueError("CUDA weights, but this process has no CUDA device for them")
            if ref.nbytes == 0:
                opened.append((torch.UntypedStorage(0, device=f"cuda:{cuda_index}"), 0))
                continue
            torch.cuda._lazy_init()
            storage = torch.UntypedStorage._new_shared_cuda(
                cuda_index,
                ref.handle,
                ref.nbytes,
                ref.offset_bytes,
                ref.ref_counter_handle,
                ref.ref_counter_offset,
                ref.event_handle or None,
                ref.event_sync_required,
            )
            opened.append((storage, 0))
        else:
            raise ValueError(f"storage kind {ref.kind!r} is not one this worker can map (a newer holder?)")
    out = {}
    for t in tensors:
        storage, base = opened[t.storage]
        dtype = _dtype(t.dtype)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        view = torch.empty(0, dtype=dtype, device=storage.device)
        out[t.path] = view.set_(storage, base // itemsize + t.offset, t.shape, t.stride)
    return out

"""The decode side: pull a prompt's KV from the prefill worker a descriptor names.

>>> async with await pull_kv(desc, config) as pulled:   # KvPullError on any failure
...     cache.load(pulled.tensor())                      # copy into the engine's own cache
>>> # leaving the block tells the exporter it can free the bytes

Same host (equal ``host_id``, a ``shm_name``, ``use_shm``): map the exporter's segment, claim it over TCP with
the secret, verify, and read it in place — the engine's copy into its cache is the only copy. Otherwise: fetch
over TCP straight into one preallocated buffer, checksummed as it arrives.

A CUDA hold (the descriptor has ``cuda_ipc``), pulled for a GPU ``device`` on the same host: open the
exporter's pool by CUDA IPC and claim; ``write_into`` then copies device to device. Where IPC is impossible
(no runtime, GPU not visible, no peer access) the exporter stages it into shared memory (``STAGE``); other
hosts fetch it over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import suppress
from typing import Any

from dynamo_lite.kv import checksum as ck
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.cuda_ipc import CudaIpcUnavailable, CudaSource, open_source
from dynamo_lite.kv.errors import KvPullError
from dynamo_lite.kv.layout import KvLayout, as_tensors, host_id
from dynamo_lite.kv.shm import ShmSegment, anonymous, bury
from dynamo_lite.kv.wire import KvOp, KvReply, KvRequest, KvStatus, frame, recv_message, tune_socket
from dynamo_lite.protocol import KvDescriptor, WireError
from dynamo_lite.timing import note_kv_transfer

__all__ = ["KvPullError", "KvPulled", "pull_kv"]

log = logging.getLogger(__name__)

_OFFLOAD_BYTES = 1 << 20  # hash buffers larger than this in a thread, not on the event loop


class KvPulled:
    """KV bytes that arrived. ``buffer`` is a read-only view of ``layout.nbytes`` in ``layout.shape`` order;
    it is valid until ``close()``, which lets the exporter free its copy (shm). A CUDA IPC pull
    (``transport == "cuda_ipc"``) has no host buffer: use ``write_into``."""

    def __init__(
        self,
        layout: KvLayout,
        owner: Any,
        transport: str,
        seconds: float,
        segment: ShmSegment | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.layout = layout
        self.nbytes = layout.nbytes
        self.transport = transport  # "shm" | "tcp" | "staged" | "cuda_ipc"
        self.seconds = seconds  # the pull itself, from connect to verified bytes
        self._owner = owner
        self._segment = segment
        self._sock = sock
        self._event: Any = None  # a CUDA copy in flight out of the exporter's pool
        # A CUDA IPC pull: the descriptor's reference to the hold and its GPU, for other processes of this host
        # (a ranked engine's followers) to open it themselves (``cuda_ipc.open_source``) while this is open.
        self.cuda_ipc = b""
        self.gpu_uuid = ""
        self.buffer: memoryview | None = None
        if not isinstance(owner, CudaSource):
            self.buffer = memoryview(owner).toreadonly()

    @property
    def on_device(self) -> bool:
        return isinstance(self._owner, CudaSource)

    @property
    def shm_name(self) -> str:
        """The shared-memory segment the bytes lie in ("" for private memory or a CUDA IPC pull): another
        process of this host (an engine's other ranks) may map it and read its part while this is open."""
        return self._segment.name if self._segment is not None and not self.closed else ""

    def tensors(self) -> list[Any]:
        """Torch views of ``layout.parts`` over the bytes (no copy): the full layers' part, then the windowed
        layers' part, whichever the layout has. Treat them as read-only; they stay valid after ``close()`` for
        as long as they live. Not for a CUDA IPC pull (another process's memory)."""
        if self._owner is None:
            raise ValueError("KvPulled is closed")
        if self.on_device:
            raise ValueError("a CUDA IPC pull has no tensor of its own: use write_into")
        return as_tensors(self._owner, self.layout)

    def tensor(self) -> Any:
        """The one view of a single-part layout (no windowed layers): see ``tensors``."""
        parts = self.tensors()
        if len(parts) != 1:
            raise ValueError("a layout of full and windowed layers has two parts: use tensors()")
        return parts[0]

    def copy_into(self, dest: Any) -> None:
        """memcpy the bytes into ``dest``, any writable C-contiguous buffer of at least ``nbytes``."""
        if self.buffer is None:
            raise ValueError("a CUDA IPC pull has no host bytes: use write_into")
        out = memoryview(dest).cast("B")
        out[: self.nbytes] = self.buffer

    def write_into(self, dest: Any, *, timing: bool = False) -> None:
        """Copy the KV into ``dest``: a torch tensor of ``layout.shape``, or one per part of ``layout.parts``
        (any device, any strides with a dense last dimension; e.g. views of a cache slot). A CUDA IPC copy runs
        on the destination's current stream; ``close()`` waits for it before the exporter may reuse the
        memory. ``timing``: see ``copy_seconds``."""
        if self._owner is None:
            raise ValueError("KvPulled is closed")
        dests = list(dest) if isinstance(dest, list | tuple) else [dest]
        parts = self.layout.parts
        if len(dests) != len(parts):
            raise ValueError(f"{len(dests)} destinations for a KV of {len(parts)} parts")
        if isinstance(self._owner, CudaSource):
            for i, (d, (shape, offset)) in enumerate(zip(dests, parts, strict=True)):
                first = i == 0
                event = self._owner.copy_into(
                    d, shape, self.layout.itemsize, src_offset=offset, timing=timing, time_start=first
                )
            self._event = event  # one stream: the last copy's event covers them all
        else:
            for d, src in zip(dests, self.tensors(), strict=True):
                d.copy_(src)

    def copy_seconds(self) -> float | None:
        """GPU time of the last CUDA IPC copy made by ``write_into(dest, timing=True)`` (waits for it)."""
        owner = self._owner
        if not isinstance(owner, CudaSource) or owner.started is None or self._event is None:
            return None
        self._event.synchronize()
        return owner.started.elapsed_time(self._event) / 1e3

    @property
    def closed(self) -> bool:
        return self._owner is None

    def close(self) -> None:
        """Unmap and tell the exporter we are done (shm). Idempotent; callable from any thread."""
        owner, self._owner = self._owner, None
        if owner is None:
            return
        event, self._event = self._event, None
        if event is not None:
            event.synchronize()  # the exporter reuses the range once we say DONE
        if isinstance(owner, CudaSource):
            owner.release()
        sock, self._sock = self._sock, None
        if sock is not None:
            with suppress(OSError):  # the socket is idle and empty: this tiny send never blocks
                sock.send(frame(KvRequest(KvOp.DONE)))
            sock.close()
        if self.buffer is not None:
            with suppress(BufferError):
                self.buffer.release()
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        if not isinstance(owner, CudaSource):
            bury(owner)

    def __enter__(self) -> KvPulled:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> KvPulled:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_owner", None) is not None:
            with suppress(Exception):
                self.close()


async def pull_kv(
    desc: KvDescriptor, config: KvTransferConfig | None = None, device: Any = None, shared: bool = False
) -> KvPulled:
    """Pull the KV ``desc`` describes; raises ``KvPullError`` on any failure (within ``pull_timeout_s``).

    ``device`` (a torch device) is where the caller will copy the KV: a CUDA device lets a CUDA hold on this
    host come by IPC, device to device. ``shared``: bytes fetched over TCP land in a shared-memory segment of
    our own (``KvPulled.shm_name``, unlinked at ``close``) rather than private memory, so that other processes
    of this host — a ranked engine's followers — read their part of it in place.
    """
    cfg = config or KvTransferConfig()
    try:
        layout = KvLayout.from_descriptor(desc)
    except (ValueError, TypeError) as e:
        raise KvPullError(f"bad KV descriptor: {e}") from e
    if desc.nbytes > cfg.max_transfer_bytes:
        raise KvPullError(f"KV of {desc.nbytes} bytes exceeds max_transfer_bytes={cfg.max_transfer_bytes}")
    if not desc.host or not 0 < desc.port < 65536:
        raise KvPullError(f"bad KV endpoint {desc.host!r}:{desc.port}")
    started = time.perf_counter()
    same_host = desc.host_id == host_id()
    source = _open_cuda(desc, device) if desc.cuda_ipc and same_host and cfg.use_cuda_ipc else None
    segment = _attach(desc) if cfg.use_shm and desc.shm_name and same_host else None
    try:
        async with asyncio.timeout(cfg.pull_timeout_s):
            if source is not None:
                pulled = await _pull_cuda(desc, cfg, layout, source, started)
            elif segment is not None:
                pulled = await _pull_shm(desc, cfg, layout, segment, started)
            elif desc.cuda_ipc and same_host and cfg.use_shm:
                pulled = await _pull_staged(desc, cfg, layout, started)
            else:
                pulled = await _pull_tcp(desc, cfg, layout, started, shared and cfg.use_shm)
        note_kv_transfer(pulled.seconds, pulled.nbytes, pulled.transport)  # the request's timing and trace
        return pulled
    except TimeoutError as e:
        raise KvPullError(f"KV pull of {desc.transfer_id} timed out after {cfg.pull_timeout_s} s") from e
    except (OSError, WireError) as e:
        raise KvPullError(f"KV pull of {desc.transfer_id} from {desc.host}:{desc.port} failed: {e}") from e


async def release_kv(desc: KvDescriptor, config: KvTransferConfig | None = None) -> bool:
    """Tell the exporter nobody will pull ``desc``: it frees the hold now instead of at lease expiry.

    Best effort (the lease frees it anyway): returns whether the exporter freed it.
    """
    cfg = config or KvTransferConfig()
    if not desc.host or not 0 < desc.port < 65536:
        return False
    loop = asyncio.get_running_loop()
    try:
        sock = await _connect(desc, cfg)
    except KvPullError:
        return False
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            await loop.sock_sendall(sock, frame(KvRequest(KvOp.RELEASE, desc.transfer_id, desc.secret)))
            reply = await recv_message(loop, sock, KvReply)
        return reply.status is KvStatus.OK
    except (TimeoutError, OSError, WireError):
        return False
    finally:
        sock.close()


def _open_cuda(desc: KvDescriptor, device: Any) -> CudaSource | None:
    if device is None:
        return None
    try:
        # The first pull from a prefill process maps its pool (a few ms, once); later ones find it open.
        return open_source(desc.cuda_ipc, desc.gpu_uuid, desc.nbytes, device)
    except CudaIpcUnavailable as e:
        log.info("KV %s: no CUDA IPC (%s): staging through host memory", desc.transfer_id, e)
        return None


async def _pull_cuda(
    desc: KvDescriptor, cfg: KvTransferConfig, layout: KvLayout, source: CudaSource, started: float
) -> KvPulled:
    sock: socket.socket | None = None
    try:
        sock = await _connect(desc, cfg)
        await _request(sock, KvRequest(KvOp.CLAIM, desc.transfer_id, desc.secret, []), desc, cfg)
        pulled = KvPulled(layout, source, "cuda_ipc", time.perf_counter() - started, sock=sock)
        pulled.cuda_ipc, pulled.gpu_uuid = desc.cuda_ipc, desc.gpu_uuid
        return pulled
    except BaseException:
        if sock is not None:
            sock.close()
        source.release()
        raise


async def _pull_staged(
    desc: KvDescriptor, cfg: KvTransferConfig, layout: KvLayout, started: float
) -> KvPulled:
    """A CUDA hold we can't map: the exporter copies it into shm, we read it there (``STAGE``)."""
    sock = await _connect(desc, cfg)
    segment: ShmSegment | None = None
    try:
        verify = ck.FAST if cfg.verify_shm is None else cfg.verify_shm
        offered = list(ck.SUPPORTED) if verify else []
        reply = await _request(sock, KvRequest(KvOp.STAGE, desc.transfer_id, desc.secret, offered), desc, cfg)
        try:
            segment = ShmSegment.attach(reply.shm_name, desc.nbytes)
        except (OSError, ValueError) as e:
            raise KvPullError(f"KV transfer {desc.transfer_id}: staged segment not attachable: {e}") from e
        if verify:
            await _verify(segment.buffer, reply, desc)
        return KvPulled(layout, segment.mapping, "staged", time.perf_counter() - started, segment, sock)
    except BaseException:
        sock.close()
        if segment is not None:
            segment.close()
        raise


def _attach(desc: KvDescriptor) -> ShmSegment | None:
    try:
        return ShmSegment.attach(desc.shm_name, desc.nbytes)
    except (OSError, ValueError) as e:
        # Not visible here (another container or user, or already freed): the exporter says which over TCP.
        log.debug("KV shm %s not attachable (%s): using TCP", desc.shm_name, e)
        return None


async def _pull_shm(
    desc: KvDescriptor, cfg: KvTransferConfig, layout: KvLayout, segment: ShmSegment, started: float
) -> KvPulled:
    sock: socket.socket | None = None
    try:
        sock = await _connect(desc, cfg)
        verify = ck.FAST if cfg.verify_shm is None else cfg.verify_shm
        offered = list(ck.SUPPORTED) if verify else []
        reply = await _request(sock, KvRequest(KvOp.CLAIM, desc.transfer_id, desc.secret, offered), desc, cfg)
        if verify:
            await _verify(segment.buffer, reply, desc)
        elapsed = time.perf_counter() - started
        return KvPulled(layout, segment.mapping, "shm", elapsed, segment, sock)
    except BaseException:
        if sock is not None:
            sock.close()  # the exporter sees the connection drop and frees the hold
        segment.close()
        raise


async def _pull_tcp(
    desc: KvDescriptor, cfg: KvTransferConfig, layout: KvLayout, started: float, shared: bool = False
) -> KvPulled:
    loop = asyncio.get_running_loop()
    sock = await _connect(desc, cfg)
    segment: ShmSegment | None = None
    try:
        offered = list(ck.SUPPORTED)
        reply = await _request(sock, KvRequest(KvOp.FETCH, desc.transfer_id, desc.secret, offered), desc, cfg)
        hasher = _hasher(reply)
        if shared:
            segment = ShmSegment.create(desc.nbytes)
        buf = segment.mapping if segment is not None else anonymous(desc.nbytes)
        view = memoryview(buf)
        got = 0
        while got < desc.nbytes:
            n = await loop.sock_recv_into(sock, view[got:])
            if n == 0:
                raise KvPullError(f"KV transfer {desc.transfer_id}: exporter closed after {got} bytes")
            hasher.update(view[got : got + n])  # overlaps with the kernel receiving the next chunk
            got += n
        if hasher.value != reply.checksum:
            raise KvPullError(f"KV transfer {desc.transfer_id}: corrupt bytes ({hasher.algo} mismatch)")
        view.release()
        return KvPulled(layout, buf, "tcp", time.perf_counter() - started, segment)
    except BaseException:
        if segment is not None:
            segment.close()
        raise
    finally:
        sock.close()


async def _connect(desc: KvDescriptor, cfg: KvTransferConfig) -> socket.socket:
    loop = asyncio.get_running_loop()
    last: OSError = OSError(f"no address for {desc.host}")
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            infos = await loop.getaddrinfo(desc.host, desc.port, type=socket.SOCK_STREAM)
            for family, type_, proto, _, addr in infos:
                sock = socket.socket(family, type_, proto)
                try:
                    sock.setblocking(False)
                    tune_socket(sock, cfg.socket_buffer_bytes)  # before connect: the window is set at SYN
                    await loop.sock_connect(sock, addr)
                    return sock
                except OSError as e:
                    sock.close()
                    last = e
                except BaseException:
                    sock.close()
                    raise
    except TimeoutError as e:
        raise KvPullError(
            f"KV exporter {desc.host}:{desc.port} did not accept within {cfg.connect_timeout_s} s"
        ) from e
    raise KvPullError(f"KV exporter {desc.host}:{desc.port} unreachable: {last}") from last


async def _request(sock: socket.socket, req: KvRequest, desc: KvDescriptor, cfg: KvTransferConfig) -> KvReply:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            await loop.sock_sendall(sock, frame(req))
            reply = await recv_message(loop, sock, KvReply)
    except TimeoutError as e:
        raise KvPullError(f"KV exporter {desc.host}:{desc.port} did not answer {req.op.name}") from e
    if reply.status is not KvStatus.OK:
        raise KvPullError(f"KV transfer {desc.transfer_id} refused: {reply.status.name}: {reply.message}")
    if reply.nbytes != desc.nbytes:
        raise KvPullError(
            f"KV transfer {desc.transfer_id}: exporter has {reply.nbytes} bytes, the descriptor {desc.nbytes}"
        )
    return reply


def _hasher(reply: KvReply) -> ck.Hasher:
    if reply.checksum_algo not in ck.ALGORITHMS:
        raise KvPullError(f"exporter answered with checksum {reply.checksum_algo!r}; we have {ck.SUPPORTED}")
    return ck.Hasher(reply.checksum_algo)


async def _verify(view: memoryview, reply: KvReply, desc: KvDescriptor) -> None:
    algo = _hasher(reply).algo
    if len(view) > _OFFLOAD_BYTES:
        value = await asyncio.to_thread(ck.checksum, view, algo)
    else:
        value = ck.checksum(view, algo)
    if value != reply.checksum:
        raise KvPullError(f"KV transfer {desc.transfer_id}: corrupt bytes ({algo} mismatch)")

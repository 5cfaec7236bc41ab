"""The prefill side: hold a prompt's KV under a lease and serve it to exactly one importer.

>>> exporter = KvExporter(KvTransferConfig())
>>> await exporter.start()
>>> hold = exporter.allocate(KvLayout(30, 3, 64, "float32", n), request_id)  # from the engine thread
>>> hold.tensor()[:] = kv                                                     # fill it in place
>>> # (a layout with sliding-window layers has two parts: hold.tensors())
>>> desc = exporter.publish(hold)  # -> travels to the decode worker inside the prefill result

On a GPU engine, ``use_cuda_pool(pool)`` makes holds device memory (a ``CudaKvPool`` range, shared by CUDA IPC
with importers on this host; see ``cuda_ipc``); a full pool falls back to host memory.

A hold is freed exactly once: when its importer is done, when it is released (request cancelled), when its
lease expires (importer never came, or died), or at ``stop()``. ``held_bytes`` is what a gauge should show.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hmac
import logging
import math
import secrets
import socket
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from dynamo_lite.kv import checksum as ck
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.cuda_pool import CudaKvPool, encode_ref
from dynamo_lite.kv.errors import KvCapacityError, KvTransferError
from dynamo_lite.kv.layout import KvLayout, as_tensors, host_id
from dynamo_lite.kv.shm import ShmSegment, anonymous, bury
from dynamo_lite.kv.wire import KvOp, KvReply, KvRequest, KvStatus, frame, recv_message, tune_socket
from dynamo_lite.protocol import EngineKind, KvDescriptor, WireError, WireVersionError

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class KvHold:
    """Memory for one sequence's KV, owned by the exporter until it is freed.

    ``buffer`` is a writable view of ``layout.nbytes`` (a POSIX shm segment when ``use_shm``, else private
    anonymous memory): the engine writes the KV straight into it, in ``layout.shape`` order. A CUDA hold
    (``cuda_offset >= 0``) has an empty ``buffer``: write through ``tensor()``, a device view.
    """

    transfer_id: str
    request_id: str
    layout: KvLayout
    buffer: memoryview
    shm_name: str = ""
    _owner: Any = field(default=None, repr=False)  # the mmap behind ``buffer``; the CudaKvPool of a CUDA hold
    cuda_offset: int = -1  # the hold's range in the pool, for a CUDA hold

    @property
    def on_device(self) -> bool:
        return self.cuda_offset >= 0

    def tensors(self) -> list[Any]:
        """Writable torch views of ``layout.parts`` over the hold's memory (on the pool's GPU for a CUDA
        hold): the full layers' part, then the windowed layers' part, whichever the layout has."""
        if self._owner is None:
            raise KvTransferError(f"transfer {self.transfer_id} is freed")
        if self.on_device:
            dtype = getattr(__import__("torch"), self.layout.dtype)
            return [
                self._owner.view(
                    self.cuda_offset + offset, math.prod(shape) * self.layout.itemsize, dtype, shape
                )
                for shape, offset in self.layout.parts
            ]
        return as_tensors(self._owner, self.layout)

    def tensor(self) -> Any:
        """The one view of a single-part layout (no windowed layers): see ``tensors``."""
        parts = self.tensors()
        if len(parts) != 1:
            raise ValueError("a layout of full and windowed layers has two parts: use tensors()")
        return parts[0]

    def cuda_ref(self) -> tuple[bytes, str]:
        """A CUDA hold's reference and GPU (as its descriptor will carry them), for other processes of this host
        to write into it before it is published (a ranked engine's followers: ``cuda_ipc.open_source``, then
        ``CudaSource.copy_from``)."""
        if not self.on_device or self._owner is None:
            raise KvTransferError(f"transfer {self.transfer_id} is not a CUDA hold")
        pool: CudaKvPool = self._owner
        return encode_ref(pool.ref(self.cuda_offset)), pool.uuid


@dataclass(slots=True)
class ExporterStats:
    """Counters since start (for the worker's metrics)."""

    transfers: int = 0  # holds served to an importer
    bytes: int = 0
    seconds: float = 0.0  # summed from claim to done/sent
    shm_transfers: int = 0
    tcp_transfers: int = 0
    expired: int = 0  # leases that ran out (importer never came or never said done)
    released: int = 0  # cancelled by the engine
    failed: int = 0  # a send broke off
    rejected: int = 0  # requests refused: unknown id, bad secret, double claim, malformed
    cuda_transfers: int = 0  # CUDA holds read by IPC (staged ones count as shm, fetched ones as tcp)


class _State(enum.Enum):
    ALLOCATED = 0
    PUBLISHED = 1
    CLAIMED = 2


@dataclass(slots=True, eq=False)
class _Entry:
    hold: KvHold
    segment: ShmSegment | None
    deadline: float
    state: _State = _State.ALLOCATED
    secret: bytes = b""
    checksum_algo: str = ""
    checksum: int = 0
    claimed_at: float = 0.0
    # Taken at claim: the bytes stay valid for the serving task even if the hold is freed meanwhile.
    view: memoryview | None = None


class KvExporter:
    """Holds KV for transfer and runs the TCP endpoint importers pull from. ``allocate``, ``publish`` and
    ``release`` are thread-safe; ``start``/``stop`` run on the event loop that serves the transfers."""

    def __init__(self, config: KvTransferConfig, engine_name: EngineKind = EngineKind.TORCH) -> None:
        self.config = config
        self.engine_name = engine_name
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._held_bytes = 0
        self._stats = ExporterStats()
        self._listener: socket.socket | None = None
        self._host = ""
        self._port = 0
        self._tasks: set[asyncio.Task] = set()
        self._connections: set[asyncio.Task] = set()
        self._pool: CudaKvPool | None = None

    def use_cuda_pool(self, pool: CudaKvPool | None) -> None:
        """Allocate holds in ``pool`` (device memory, CUDA IPC) from now on; None: host memory again."""
        self._pool = pool

    @property
    def cuda_pool(self) -> CudaKvPool | None:
        return self._pool

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the transfer endpoint (``bind_host``:``port``) and start serving and expiring leases."""
        if self._listener is not None:
            return
        cfg = self.config
        if cfg.use_shm:
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()  # now, rather than inside the first request's allocate
        family = socket.AF_INET6 if ":" in cfg.bind_host else socket.AF_INET
        listener = socket.create_server((cfg.bind_host, cfg.port), family=family, backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._host = cfg.advertise_host or cfg.bind_host
        if self._host in ("0.0.0.0", "::"):
            self._host = socket.getfqdn()
        loop = asyncio.get_running_loop()
        for coro in (self._accept_loop(), self._expiry_loop()):
            task = loop.create_task(coro)
            self._tasks.add(task)
        log.info("KV exporter serving on %s:%d (advertised as %s)", cfg.bind_host, self._port, self._host)

    async def stop(self) -> None:
        """Stop serving and free every hold."""
        tasks = [*self._tasks, *self._connections]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._connections.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            ids = list(self._entries)
        for tid in ids:
            self._free(tid, "stopped")

    @property
    def address(self) -> tuple[str, int]:
        """(advertised host, port) of the transfer endpoint; port 0 before ``start``."""
        return self._host, self._port

    # ---- the engine's side ------------------------------------------------------------------------------

    def allocate(self, layout: KvLayout, request_id: str) -> KvHold:
        """Reserve memory for ``layout``; its lease starts now (an unpublished hold expires too).
        Raises ``KvCapacityError`` beyond ``max_transfer_bytes`` or ``max_held_bytes``."""
        cfg = self.config
        nbytes = layout.nbytes
        if nbytes > cfg.max_transfer_bytes:
            raise KvCapacityError(f"KV of {nbytes} bytes exceeds max_transfer_bytes={cfg.max_transfer_bytes}")
        with self._lock:
            if self._held_bytes + nbytes > cfg.max_held_bytes:
                held, limit = self._held_bytes, cfg.max_held_bytes
                raise KvCapacityError(f"holding {held} bytes, {nbytes} more exceeds max_held_bytes={limit}")
            # Reserve before the (slow) allocation, so racing threads can't overshoot the limit.
            self._held_bytes += nbytes
        pool = self._pool
        offset = pool.alloc(nbytes) if pool is not None else None
        if pool is not None and offset is not None:
            tid = uuid.uuid4().hex
            hold = KvHold(tid, request_id, layout, memoryview(b""), "", pool, offset)
            with self._lock:
                self._entries[tid] = _Entry(hold, None, time.monotonic() + cfg.lease_s)
            return hold
        if pool is not None:
            log.debug("CUDA KV pool full: %d bytes held in host memory", nbytes)
        try:
            segment: ShmSegment | None = None
            if cfg.use_shm:
                segment = ShmSegment.create(nbytes)
                owner: Any = segment.mapping
                buffer = segment.buffer
            else:
                owner = anonymous(nbytes)
                buffer = memoryview(owner)
        except BaseException:
            with self._lock:
                self._held_bytes -= nbytes
            raise
        tid = uuid.uuid4().hex
        hold = KvHold(tid, request_id, layout, buffer, segment.name if segment else "", owner)
        with self._lock:
            self._entries[tid] = _Entry(hold, segment, time.monotonic() + cfg.lease_s)
        return hold

    def publish(self, hold: KvHold) -> KvDescriptor:
        """Seal the hold (checksum its bytes: ~10 ms per 94 MB with xxhash, ~30 ms with crc32 — call it from
        the engine thread), restart its lease and describe it for the importer."""
        if self._listener is None:
            raise KvTransferError("KvExporter.publish before start()")
        self._published_entry(hold)  # fail fast, before hashing, if it is already gone
        cuda: dict[str, Any] = {}
        if hold.on_device:
            # No checksum: the bytes never leave this host's GPUs (staged or fetched copies are hashed then).
            pool: CudaKvPool = hold._owner
            pool.synchronize()  # the engine's writes must land before an importer can read
            algo, value = "", 0
            cuda = {
                "cuda_ipc": encode_ref(pool.ref(hold.cuda_offset)),
                "device_index": pool.device_index,
                "gpu_uuid": pool.uuid,
            }
        else:
            algo = ck.SUPPORTED[0]
            try:
                value = ck.checksum(hold.buffer, algo)
            except ValueError as e:  # freed (expired/released) while we hashed: its view was released
                raise KvTransferError(f"transfer {hold.transfer_id} is not held (expired or released)") from e
        secret = secrets.token_urlsafe(24)
        with self._lock:
            entry = self._published_entry(hold)
            entry.state = _State.PUBLISHED
            entry.secret = secret.encode()
            entry.checksum_algo, entry.checksum = algo, value
            entry.deadline = time.monotonic() + self.config.lease_s
        return KvDescriptor(
            transfer_id=hold.transfer_id,
            engine=self.engine_name,
            secret=secret,
            host=self._host,
            port=self._port,
            host_id=host_id(),
            shm_name=hold.shm_name,
            lease_s=self.config.lease_s,
            **hold.layout.descriptor_fields(),
            **cuda,
        )

    def _published_entry(self, hold: KvHold) -> _Entry:
        entry = self._entries.get(hold.transfer_id)
        if entry is None or entry.hold is not hold:
            raise KvTransferError(f"transfer {hold.transfer_id} is not held (expired or released)")
        if entry.state is not _State.ALLOCATED:
            raise KvTransferError(f"transfer {hold.transfer_id} is already published")
        return entry

    def release(self, transfer_id: str) -> bool:
        """Free a hold now (request cancelled or failed). False if it was already gone."""
        return self._free(transfer_id, "released")

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @property
    def held_count(self) -> int:
        return len(self._entries)

    @property
    def stats(self) -> ExporterStats:
        """A snapshot of the counters."""
        with self._lock:
            return dataclasses.replace(self._stats)

    # ---- freeing ----------------------------------------------------------------------------------------

    def _free(self, tid: str, reason: str, nbytes_sent: int = 0, transport: str = "") -> bool:
        with self._lock:
            entry = self._entries.pop(tid, None)
            if entry is None:
                return False
            self._held_bytes -= entry.hold.layout.nbytes
            s = self._stats
            if reason == "served":
                s.transfers += 1
                s.bytes += nbytes_sent
                s.seconds += time.monotonic() - entry.claimed_at
                if transport == "shm":
                    s.shm_transfers += 1
                elif transport == "cuda_ipc":
                    s.cuda_transfers += 1
                else:
                    s.tcp_transfers += 1
            elif reason == "expired":
                s.expired += 1
            elif reason == "released":
                s.released += 1
            elif reason == "failed":
                s.failed += 1
        owner, entry.hold._owner = entry.hold._owner, None  # a KvHold the engine keeps must not pin memory
        if entry.hold.on_device:
            owner.release(entry.hold.cuda_offset)
            owner = None
            entry.view = None
        if entry.segment is not None:
            entry.segment.close()
        elif not entry.hold.on_device:
            with suppress(BufferError):  # a view the engine still exports keeps the memory alive
                entry.hold.buffer.release()
        bury(owner)
        del owner
        log.debug("KV transfer %s freed (%s)", tid, reason)
        return True

    async def _expiry_loop(self) -> None:
        tick = min(1.0, max(0.01, self.config.lease_s / 20))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            with self._lock:
                expired = [tid for tid, e in self._entries.items() if e.deadline <= now]
            for tid in expired:
                try:
                    if self._free(tid, "expired"):
                        log.info("KV transfer %s expired unpulled", tid)
                except Exception:  # one bad free must not stop expiring the rest
                    log.exception("KV transfer %s: freeing failed", tid)

    # ---- serving importers ------------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as e:  # e.g. out of file descriptors: keep serving once some are closed
                log.warning("KV exporter accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if len(self._connections) >= self.config.max_connections:
                conn.close()
                continue
            conn.setblocking(False)
            tune_socket(conn, self.config.socket_buffer_bytes)
            task = loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                async with asyncio.timeout(self.config.connect_timeout_s):
                    req = await recv_message(loop, conn, KvRequest)
            except WireVersionError as e:  # a newer importer, across a breaking change: say why
                await loop.sock_sendall(conn, frame(KvReply(KvStatus.BAD_REQUEST, str(e))))
                return
            except (TimeoutError, ConnectionError, WireError, OSError):
                with self._lock:
                    self._stats.rejected += 1
                return
            if req.op is KvOp.RELEASE:
                await loop.sock_sendall(conn, frame(self._release_remote(req)))
                return
            entry, reply = self._claim(req)
            if entry is None:
                await loop.sock_sendall(conn, frame(reply))
                return
            await self._transfer(loop, conn, req, entry, reply)
        except (ConnectionError, OSError) as e:
            log.debug("KV connection ended: %s", e)
        except Exception:
            log.exception("KV transfer connection failed")
        finally:
            conn.close()

    def _release_remote(self, req: KvRequest) -> KvReply:
        """A RELEASE from whoever holds the descriptor (its secret): free an unclaimed hold at once."""
        with self._lock:
            entry = self._entries.get(req.transfer_id)
            if entry is None:
                return KvReply(KvStatus.UNKNOWN, message="unknown transfer")
            if not hmac.compare_digest(entry.secret, req.secret.encode()):
                self._stats.rejected += 1
                return KvReply(KvStatus.DENIED, message="bad secret")
            if entry.state is _State.CLAIMED:
                return KvReply(KvStatus.CLAIMED, message="being pulled; freed when done")
        self._free(req.transfer_id, "released")
        return KvReply(KvStatus.OK)

    def _claim(self, req: KvRequest) -> tuple[_Entry | None, KvReply]:
        """Check a CLAIM/FETCH and mark the hold claimed, so it can be pulled once only."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(req.transfer_id)
            if req.op not in (KvOp.CLAIM, KvOp.FETCH, KvOp.STAGE):
                status, msg = KvStatus.BAD_REQUEST, f"unexpected {req.op.name}"
            elif entry is None or entry.state is _State.ALLOCATED or entry.deadline <= now:
                status, msg = KvStatus.UNKNOWN, "unknown transfer (never published, freed, or lease expired)"
            elif not hmac.compare_digest(entry.secret, req.secret.encode()):
                status, msg = KvStatus.DENIED, "bad secret"
            elif entry.state is _State.CLAIMED:
                status, msg = KvStatus.CLAIMED, "already claimed"
            elif req.op is KvOp.CLAIM and entry.segment is None and not entry.hold.on_device:
                status, msg = KvStatus.BAD_REQUEST, "not in shared memory: fetch it over TCP"
            elif req.op is KvOp.STAGE and not entry.hold.on_device:
                status, msg = KvStatus.BAD_REQUEST, "not in device memory: claim or fetch it"
            else:
                entry.state = _State.CLAIMED
                entry.claimed_at = now
                # A CUDA hold gets its host view when staged (STAGE, FETCH); CLAIM reads the device directly.
                entry.view = None if entry.hold.on_device else memoryview(entry.hold._owner)
                entry.deadline = max(entry.deadline, now + self.config.pull_timeout_s)
                nbytes = entry.hold.layout.nbytes
                return entry, KvReply(KvStatus.OK, nbytes=nbytes)
            self._stats.rejected += 1
        log.warning("KV %s of %s refused: %s", req.op.name, req.transfer_id[:64], msg)
        return None, KvReply(status, message=msg)

    async def _checksum_for(self, entry: _Entry, offered: list[str]) -> tuple[str, int]:
        if not offered:  # the importer won't verify (shm with verify_shm off)
            return "", 0
        if entry.checksum_algo in offered:
            return entry.checksum_algo, entry.checksum
        algo = ck.choose(offered)  # an importer without our fast hash: compute one it has, off the loop
        return algo, await asyncio.to_thread(ck.checksum, entry.view, algo)

    async def _transfer(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: socket.socket,
        req: KvRequest,
        entry: _Entry,
        reply: KvReply,
    ) -> None:
        """Serve a claimed hold, then free it whatever happens.

        shm: the importer has the segment mapped; it copies, then says DONE, or the connection drops if it
        died; the lease bounds the wait. TCP: stream the bytes; the hold is done once they are sent.
        """
        reason = "failed"
        nbytes = entry.hold.layout.nbytes
        transport = {KvOp.FETCH: "tcp", KvOp.STAGE: "shm"}.get(req.op, "shm")
        if req.op is KvOp.CLAIM and entry.hold.on_device:
            transport = "cuda_ipc"
        try:
            if entry.hold.on_device and req.op in (KvOp.STAGE, KvOp.FETCH):
                reply.shm_name = await self._stage(entry, shared=req.op is KvOp.STAGE)
            reply.checksum_algo, reply.checksum = await self._checksum_for(entry, req.checksums)
            async with asyncio.timeout(self.config.pull_timeout_s):
                await loop.sock_sendall(conn, frame(reply))
                if req.op is KvOp.FETCH:
                    assert entry.view is not None
                    await loop.sock_sendall(conn, entry.view)
                    reason = "served"
                    return
            try:
                async with asyncio.timeout(max(0.0, entry.deadline - time.monotonic())):
                    done = await recv_message(loop, conn, KvRequest)
            except TimeoutError:
                reason = "expired"
                log.warning("KV transfer %s: the importer never said done", req.transfer_id)
                return
            reason = "served" if done.op is KvOp.DONE else "failed"
        except TimeoutError:
            log.warning("KV transfer %s: sending timed out", req.transfer_id)
        except (ConnectionError, OSError, WireError) as e:
            log.info("KV transfer %s: importer went away (%s)", req.transfer_id, e)
        finally:
            entry.view = None
            self._free(req.transfer_id, reason, nbytes, transport)

    async def _stage(self, entry: _Entry, shared: bool) -> str:
        """Copy a CUDA hold into host memory (a new shm segment if ``shared``, else private memory for TCP),
        off the event loop; returns the segment's name ("" for private memory)."""
        hold = entry.hold
        layout = hold.layout
        segment = ShmSegment.create(layout.nbytes) if shared else None
        owner: Any = segment.mapping if segment is not None else anonymous(layout.nbytes)
        if segment is not None:
            entry.segment = segment  # freed with the hold

        def copy() -> None:
            for host, device in zip(as_tensors(owner, layout), hold.tensors(), strict=True):
                host.copy_(device)  # synchronous device-to-host copy

        await asyncio.to_thread(copy)
        entry.view = segment.buffer if segment is not None else memoryview(owner)
        return segment.name if segment is not None else ""

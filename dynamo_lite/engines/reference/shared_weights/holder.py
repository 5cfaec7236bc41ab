"""The weights holder: a small process that owns one copy of the model's weights on a device and lets every
worker on that device map it (``python -m dynamo_lite.engines.reference.shared_weights``).

Why a holder process rather than one of the workers owning the weights: the weights must outlive any worker.
Workers are what dies in practice (an OOM in a long prefill, a kernel fault, a kill -9 of a stuck decode); with
a worker as the owner, that worker's death would take the weights, and so every other worker on the GPU, with
it. The holder runs no model code, takes no requests and allocates nothing after loading, so it has little
reason to die; a restarted worker maps the same memory again and no second copy is ever made. If the holder
does die, its memory goes with it (CUDA frees an exporting process's allocations), so every worker attached to it
exits at once with a clear message (``client.watch_owner``), and their requests migrate as for any worker death.

Serving: a Unix socket (mode 0600, in a directory of the operator's choice). Each connection gets one
``Manifest`` and then stays open as the liveness signal (see ``wire``). The socket is bound only once the
weights are loaded, so a worker that starts first simply waits for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch

from dynamo_lite.engines.reference.shared_weights.storage import CudaExport, ShmArena
from dynamo_lite.engines.reference.shared_weights.tree import flatten
from dynamo_lite.engines.reference.shared_weights.wire import Attach, Manifest, NodeRef, recv, send

log = logging.getLogger(__name__)

ATTACH_READ_TIMEOUT_S = 10.0  # a connecting worker sends its Attach at once; a silent peer is dropped


def weights_fingerprint(
    model_config: Any, model_name: str, dtype: str, quantization: str, load_format: str
) -> str:
    """What must agree between a holder and a worker for the weights to be the worker's: the model (its name and
    architecture facts), dtype, expert format and load format (``dummy`` draws random weights)."""
    facts = json.dumps(repr(model_config), sort_keys=True).encode()
    return f"{model_name}|{dtype}|{quantization}|{load_format}|{hashlib.sha1(facts).hexdigest()[:16]}"


def gpu_uuid(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def arena_path(socket_path: Path) -> Path:
    """The CPU arena of the holder serving ``socket_path`` (one name per socket, so a restarted holder replaces
    what a killed one left)."""
    tag = hashlib.sha1(str(socket_path.resolve()).encode()).hexdigest()[:16]
    return Path("/dev/shm") / f"dynamo-lite-weights-{tag}"


class WeightsHolder:
    """Holds ``weights`` (a tree of ``tree.WEIGHT_CLASSES``) on ``device`` and serves them on ``socket_path``.

    >>> holder = WeightsHolder(Path("/run/dynamo/gpu0.sock"), fingerprint, weights, torch.device("cuda:0"))
    >>> holder.start()          # bound: workers may attach
    >>> holder.close()          # attached workers see the socket close and exit
    """

    def __init__(self, socket_path: Path, fingerprint: str, weights: Any, device: torch.device) -> None:
        self.socket_path = Path(socket_path)
        self.fingerprint = fingerprint
        self.device = device
        tensors, nodes = flatten(weights)
        self._nodes = [NodeRef(path, kind, length) for path, kind, length in nodes]
        self._shm: ShmArena | None = None
        self._cuda: CudaExport | None = None
        if device.type == "cuda":
            self._cuda = CudaExport(tensors)
            self.nbytes = self._cuda.nbytes
        else:  # the private copy goes once the arena has it
            self._shm = ShmArena(arena_path(self.socket_path), tensors)
            self.nbytes = self._shm.nbytes
        del tensors
        self._gpu_uuid = gpu_uuid(device)
        self._listener: socket.socket | None = None
        self._conns: dict[socket.socket, int] = {}  # attached workers' connections -> pid
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.attaches = 0  # every attach since the start (a restarted worker counts again)

    @property
    def attached(self) -> list[int]:
        with self._lock:
            return sorted(self._conns.values())

    def start(self) -> None:
        """Bind the socket (refusing if another live holder has it) and accept workers on a thread."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a dead holder's socket
            else:
                probe.close()
                raise RuntimeError(f"another weights holder is serving {path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket 0600: only this user's workers may map the weights
        try:
            listener.bind(str(path))
        finally:
            os.umask(old_umask)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, name="weights-holder", daemon=True).start()
        log.info("weights holder: %.2f GB on %s served at %s", self.nbytes / 1e9, self.device, path)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="weights-worker", daemon=True).start()

    def _manifest(self) -> Manifest:
        if self._cuda is not None:
            storages, tensors = self._cuda.refs(), self._cuda.tensors
        else:
            assert self._shm is not None
            storages, tensors = self._shm.storages, self._shm.tensors
        return Manifest(
            fingerprint=self.fingerprint,
            device_type=self.device.type,
            gpu_uuid=self._gpu_uuid,
            storages=storages,
            tensors=tensors,
            nodes=self._nodes,
            holder_pid=os.getpid(),
        )

    def _serve(self, conn: socket.socket) -> None:
        pid = 0
        try:
            conn.settimeout(ATTACH_READ_TIMEOUT_S)
            hello = recv(conn, Attach)
            pid = hello.pid
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            send(conn, self._manifest())
            with self._lock:
                self._conns[conn] = pid
                self.attaches += 1
                count = len(self._conns)
            log.info(
                "weights holder: worker pid %d (%s) attached; %d attached", pid, hello.role or "?", count
            )
            conn.settimeout(None)
            while conn.recv(4096):  # nothing is expected: an empty read is the worker's exit
                pass
        except (OSError, ValueError) as e:  # a peer that vanished or spoke nonsense: only its connection ends
            if not self._closed.is_set():
                log.info("weights holder: connection of pid %d ended (%s)", pid, e)
        finally:
            with self._lock:
                known = self._conns.pop(conn, None) is not None
                count = len(self._conns)
            if known and not self._closed.is_set():
                log.info("weights holder: worker pid %d detached; %d attached", pid, count)
            conn.close()

    def close(self) -> None:
        """Stop serving: every attached worker sees its connection close (and exits); the CPU arena's file and
        the socket are removed."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socket_path.unlink(missing_ok=True)
        if self._shm is not None:
            self._shm.close()

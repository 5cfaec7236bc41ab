"""A worker's side of the shared weights: attach to the holder, map its weights, and die with it.

``attach`` waits (bounded) for the holder's socket, checks that the holder's weights are the ones this worker
would have loaded (fingerprint, device type, the same GPU), maps them without a copy and rebuilds the weights
tree. ``watch_owner`` then blocks on the open connection in a daemon thread: when the holder dies the connection
closes, and the worker exits at once (``HOLDER_LOST_EXIT``) — its weights were the holder's memory, so it must not
compute another token; its in-flight requests fail over as for any dead worker.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynamo_lite.engines.reference.shared_weights.holder import gpu_uuid
from dynamo_lite.engines.reference.shared_weights.storage import import_tensors
from dynamo_lite.engines.reference.shared_weights.tree import unflatten
from dynamo_lite.engines.reference.shared_weights.wire import Attach, Manifest, StorageKind, recv, send

log = logging.getLogger(__name__)

HOLDER_LOST_EXIT = 75  # the worker's exit status when its weights holder died (EX_TEMPFAIL: restart both)
RETRY_S = 0.5  # between connection attempts while the holder is still loading


class SharedWeightsError(RuntimeError):
    """The worker can't use the holder's weights (none there in time, different weights, another GPU)."""


@dataclass(slots=True)
class AttachedWeights:
    """The holder's weights as this process sees them, and the connection that keeps them (and tells of the
    holder's death)."""

    weights: Any
    manifest: Manifest
    sock: socket.socket
    _closing: threading.Event = field(default_factory=threading.Event)

    def watch_owner(self, on_lost: Callable[[str], None] | None = None) -> threading.Thread:
        """Call ``on_lost(reason)`` (default: ``exit_on_owner_loss``) from a daemon thread when the holder's
        connection closes, unless ``close`` closed it."""
        handler = on_lost or exit_on_owner_loss

        def watch() -> None:
            try:
                while self.sock.recv(4096):
                    pass
                reason = "its connection closed"
            except OSError as e:
                reason = f"its connection failed ({e})"
            if not self._closing.is_set():
                handler(f"weights holder pid {self.manifest.holder_pid} is gone: {reason}")

        thread = threading.Thread(target=watch, name="weights-owner-watch", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Detach on purpose (the engine stops): the holder logs it; the watcher does not fire."""
        self._closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def exit_on_owner_loss(reason: str) -> None:
    """The default reaction to the holder's death: say so plainly and leave now (``os._exit``: no step may run
    on weights that are gone, and nothing may wait on a lock the engine thread holds)."""
    message = (
        f"FATAL: {reason}. This worker's model weights lived in that process's memory; exiting "
        f"(status {HOLDER_LOST_EXIT}) so that its requests move to another worker. Restart the weights holder, "
        "then the workers."
    )
    log.critical(message)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(HOLDER_LOST_EXIT)


def _connect(path: Path, timeout_s: float) -> socket.socket:
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise SharedWeightsError(
                    f"no weights holder at {path} after {timeout_s:.0f} s ({e.strerror}); start one with "
                    f"`python -m dynamo_lite.engines.reference.shared_weights --socket {path} ...`"
                ) from e
            if not waited:
                log.info("waiting up to %.0f s for the weights holder at %s", timeout_s, path)
                waited = True
            time.sleep(RETRY_S)


def _local_cuda_index(uuid: str, device: torch.device) -> int:
    """This process's index of the GPU the holder's weights are on; it must be ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if gpu_uuid(torch.device("cuda", index)) != uuid:
        raise SharedWeightsError(f"the weights holder's GPU ({uuid}) is not this worker's {device}")
    return index


def attach(
    socket_path: str | Path, fingerprint: str, device: torch.device, role: str = "", timeout_s: float = 600.0
) -> AttachedWeights:
    """Map the weights the holder at ``socket_path`` serves; they must be ``fingerprint``'s on ``device``."""
    path = Path(socket_path)
    started = time.monotonic()
    sock = _connect(path, timeout_s)
    try:
        sock.settimeout(max(1.0, timeout_s - (time.monotonic() - started)))
        send(sock, Attach(pid=os.getpid(), role=role))
        manifest = recv(sock, Manifest)
        if manifest.error:
            raise SharedWeightsError(f"weights holder at {path}: {manifest.error}")
        if manifest.fingerprint != fingerprint:
            raise SharedWeightsError(
                f"the weights holder at {path} serves {manifest.fingerprint}, this worker needs {fingerprint}"
            )
        if manifest.device_type != device.type:
            raise SharedWeightsError(f"the weights holder at {path} holds them on {manifest.device_type}, "
                                     f"this worker runs on {device.type}")  # fmt: skip
        if any(s.kind == StorageKind.UNRECOGNIZED for s in manifest.storages):
            raise SharedWeightsError(
                f"the weights holder at {path} shares memory in a way this worker can't map"
            )
        cuda_index = _local_cuda_index(manifest.gpu_uuid, device) if device.type == "cuda" else None
        tensors = import_tensors(manifest.storages, manifest.tensors, cuda_index)
        weights = unflatten(tensors, [(n.path, n.kind, n.length) for n in manifest.nodes])
        sock.settimeout(None)
    except SharedWeightsError:
        sock.close()
        raise
    except (OSError, ValueError) as e:
        sock.close()
        raise SharedWeightsError(f"attaching to the weights holder at {path} failed: {e}") from e
    log.info("mapped %d tensors of the weights holder at %s (pid %d): no copy", len(tensors), path,
             manifest.holder_pid)  # fmt: skip
    return AttachedWeights(weights, manifest, sock)

"""Every knob of the KV transfer in one place, with its default."""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEADER_BYTES = 4096
"""Upper bound on one control message (claim/fetch/reply); anything longer is refused unread."""


@dataclass(slots=True)
class KvTransferConfig:
    """Limits, timeouts and endpoints of the KV transfer, shared by the exporter and the importer.

    >>> KvTransferConfig(bind_host="10.0.0.5", lease_s=10.0)  # a prefill worker reachable on one interface
    """

    bind_host: str = "127.0.0.1"
    advertise_host: str = ""  # what descriptors name as the host; "" -> bind_host
    port: int = 0  # 0 -> a free port
    # How long a prefill worker holds KV nobody pulled (``--kv-lease``), unless told sooner that nobody will.
    lease_s: float = 30.0
    use_shm: bool = True  # exporter: back holds by POSIX shm; importer: map it when host_id matches
    pull_timeout_s: float = 10.0  # a whole pull, bytes included; exporter: a claimed hold lives at least this
    connect_timeout_s: float = 2.0  # connect plus the exporter's answer to a claim
    max_held_bytes: int = 8 << 30  # refuse new holds beyond this (KvCapacityError)
    max_transfer_bytes: int = 4 << 30  # refuse (either side) any single transfer above this
    max_connections: int = 256  # exporter: concurrent importer connections; more are closed at once
    # Socket buffers for the TCP path. Setting them switches off the kernel's autotuning, so they are only
    # applied when the kernel lets them be this large (net.core.[rw]mem_max); 0 leaves autotuning alone.
    socket_buffer_bytes: int = 4 << 20
    # Checksum the shm path too (TCP is always checked). None: only when xxhash is installed (xxh3 costs
    # ~10 ms per 94 MB; zlib's crc32, the fallback, ~30 ms: half the 60 ms handoff budget).
    verify_shm: bool | None = None
    # CUDA holds (an engine on a GPU): the exporter keeps KV in one device pool of this size and importers on
    # this host open it by CUDA IPC; off, or pool full, or IPC impossible: host staging, then TCP.
    use_cuda_ipc: bool = True
    cuda_pool_bytes: int = 2 << 30

"""How a process meets the others (``RuntimeSettings``) and every time limit on a request's path (``Timeouts``):
read once at the edge (CLI/env), passed down. Their defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEFAULT_NAMESPACE = "dynamo"
DEFAULT_ROOT = "dynamo_lite"
# Like Dynamo, a process meets the others through etcd and NATS on this machine unless told otherwise.
DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:2379"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every time limit on a request's path, in seconds, in one object: a process builds one from its flags and
    hands the same object to each of its settings (``RuntimeSettings``, ``FrontendSettings``, ``RouterSettings``,
    ``WorkerSettings``); each part reads its own.

    >>> Timeouts(first_token_s=60.0, request_s=600.0)  # doctest: +ELLIPSIS
    Timeouts(first_token_s=60.0, request_s=600.0, ...)
    """

    # A request, at the frontend (HTTP)
    first_token_s: float = 300.0  # accepted → first token (queueing + prefill); also each hop's first answer
    request_s: float = 1800.0  # a whole request, first byte to last
    queue_s: float = 300.0  # waiting for a worker with room, then 503 + Retry-After (the wait counts in TTFT)
    # A started stream whose role lost its last worker waits this long for one to come back (the restarting
    # decode worker of a 1P+1D GPU), then fails; 0: it fails at once (a client is never left waiting silently).
    worker_return_s: float = 0.0
    retry_after_s: int = 1  # what a refused request (429, 503 from the queue) is told to wait: Retry-After
    # Idle keep-alive connections are closed after this long. Longer than clients keep idle connections pooled
    # (aiperf: 300 s), so that the client closes first: a server closing as the client reuses the connection
    # fails that request (aiperf counted 14 such errors at 30 s, after its warmup phase).
    keep_alive_s: float = 600.0
    # Stopping (SIGTERM)
    stream_close_s: float = 5.0  # frontend: closing a finished request's backend stream (never held hostage)
    send_error_s: float = 5.0  # frontend: delivering an error to a client that may have stopped reading
    shutdown_s: float = 5.0  # frontend: in-flight streams may finish this long
    drain_s: float = (
        30.0  # worker, once deregistered: in-flight requests may finish this long, then cancelled
    )
    deregister_s: float = 3.0  # worker: removing its records from discovery (else its lease expires them)
    # The runtime: etcd and NATS
    connect_s: float = 5.0
    close_s: float = 3.0  # closing the NATS connection on the way out
    probe_s: float = 1.5  # the first reachability check of etcd/NATS at start (fail fast)
    heartbeat_interval_s: float = 0.25  # how often a serving instance says it is alive on the request plane
    heartbeat_s: float = 1.25  # a stream whose instance was silent this long fails (never a hang)
    nats_ping_interval_s: float = 5.0  # the NATS client's pings: a dead server connection is noticed
    nats_reconnect_wait_s: float = 0.5  # between the NATS client's reconnect attempts (it retries forever)
    # A request that its (heartbeating) instance neither acknowledged nor followed with a later acknowledgement
    # fails after this long; requests are known lost sooner by their order (request_plane_nats.py).
    ack_s: float = 10.0
    # A worker holds a request's ACK this long: a first frame sent meanwhile acknowledges the request itself, so a
    # fast answer (a prefill at c=1) costs no extra message at either end. 0: ACK at once.
    ack_delay_s: float = 0.005


@dataclass(slots=True)
class RuntimeSettings:
    """How a process meets the others: discovery (etcd or memory) and the request plane (NATS or in-process).

    ``etcd_endpoints=""`` means in-memory discovery and ``nats_url=""`` the in-process request plane: both
    reach only this process (``RuntimeSettings.embedded()``, what ``python -m dynamo_lite serve`` uses).
    """

    namespace: str = DEFAULT_NAMESPACE
    etcd_endpoints: str = DEFAULT_ETCD_ENDPOINTS  # "host:port[,host:port]"
    nats_url: str = DEFAULT_NATS_URL  # "nats://host:port[,...]"
    lease_ttl_s: int = 10
    root: str = DEFAULT_ROOT
    etcd_username: str = ""
    etcd_password: str = ""
    etcd_tls_ca: str = ""  # set: connect to etcd over TLS, verifying its certificate against this CA
    etcd_tls_cert: str = ""  # client certificate (etcd --client-cert-auth)
    etcd_tls_key: str = ""
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    timeouts: Timeouts = field(default_factory=Timeouts)
    discovery_resync_s: float = 10.0  # a live view re-lists this often, repairing any change its watch missed
    # nats-py's read path patched for speed (``request_plane_nats``'s fast paths), if they pass their check
    nats_fast_path: bool = True
    # Once it serves, the process's startup heap is frozen out of garbage collection and its youngest generation
    # collected at this many new container objects (CPython: 700) (``runtime.gc_tuning``); 0: CPython's as is
    gc_young_threshold: int = 10_000

    @classmethod
    def embedded(cls, **overrides: object) -> RuntimeSettings:
        """In-memory discovery and the in-process request plane: every runtime of this process, no other."""
        return replace(cls(etcd_endpoints="", nats_url=""), **overrides)  # type: ignore[arg-type]

    @property
    def distributed(self) -> bool:
        return bool(self.etcd_endpoints or self.nats_url)

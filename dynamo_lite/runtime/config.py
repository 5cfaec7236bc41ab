"""Runtime settings: read once at the edge (CLI/env), passed down. Defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass, replace

DEFAULT_NAMESPACE = "dynamo"
DEFAULT_ROOT = "dynamo_lite"
# Like Dynamo, a process meets the others through etcd and NATS on this machine unless told otherwise.
DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:2379"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


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
    connect_timeout_s: float = 5.0
    probe_timeout_s: float = 1.5  # the first reachability check of etcd/NATS at start (fail fast)
    heartbeat_interval_s: float = 0.25  # request plane: how often a serving instance says it is alive
    heartbeat_timeout_s: float = 1.25  # a stream whose instance was silent this long fails (never a hang)
    # A request that its (heartbeating) instance neither acknowledged nor followed with a later acknowledgement
    # fails after this long; requests are known lost sooner by their order (request_plane_nats.py).
    ack_timeout_s: float = 10.0
    discovery_resync_s: float = 10.0  # a live view re-lists this often, repairing any change its watch missed

    @classmethod
    def embedded(cls, **overrides: object) -> RuntimeSettings:
        """In-memory discovery and the in-process request plane: every runtime of this process, no other."""
        return replace(cls(etcd_endpoints="", nats_url=""), **overrides)  # type: ignore[arg-type]

    @property
    def distributed(self) -> bool:
        return bool(self.etcd_endpoints or self.nats_url)

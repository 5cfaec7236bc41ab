"""Runtime settings: read once at the edge (CLI/env), passed down. Defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "dynamo"
DEFAULT_ROOT = "dynamo_lite"


@dataclass(slots=True)
class RuntimeSettings:
    """How a process meets the others: discovery (etcd or memory) and the request plane (NATS or in-process)."""

    namespace: str = DEFAULT_NAMESPACE
    etcd_endpoints: str = ""  # "host:port[,host:port]"; empty: in-memory discovery (one process)
    nats_url: str = ""  # "nats://host:port[,...]"; empty: in-process request plane (one process)
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
    heartbeat_interval_s: float = 0.25  # request plane: how often a serving instance says it is alive
    heartbeat_timeout_s: float = 1.25  # a stream whose instance was silent this long fails (never a hang)
    # A request that its (heartbeating) instance neither acknowledged nor followed with a later acknowledgement
    # fails after this long; requests are known lost sooner by their order (request_plane_nats.py).
    ack_timeout_s: float = 10.0
    discovery_resync_s: float = 10.0  # a live view re-lists this often, repairing any change its watch missed

    @property
    def distributed(self) -> bool:
        return bool(self.etcd_endpoints or self.nats_url)

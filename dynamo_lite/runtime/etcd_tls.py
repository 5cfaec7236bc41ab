"""An aetcd client over TLS: aetcd itself only opens plaintext gRPC channels.

``TlsEtcdClient`` is ``aetcd.Client`` with ``connect`` opening a ``grpc.aio.secure_channel`` (server verified
against a CA bundle; optional client certificate for etcd's ``--client-cert-auth``). Everything else is aetcd's.
"""

from __future__ import annotations

from pathlib import Path

import aetcd
import grpc
from aetcd import rpc, watcher


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Credentials from PEM files (read once, at connect)."""
    ca = Path(ca_file).read_bytes() if ca_file else None
    cert = Path(cert_file).read_bytes() if cert_file else None
    key = Path(key_file).read_bytes() if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class TlsEtcdClient(aetcd.Client):
    def __init__(self, *args: object, credentials: grpc.ChannelCredentials, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._credentials = credentials

    async def connect(self) -> None:
        """aetcd's ``connect``, with a TLS channel."""
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        self.channel = rpc.secure_channel(target, self._credentials, options=self._options.items())
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

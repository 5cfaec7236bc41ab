"""etcd discovery (aetcd): one lease per process, kept alive; keys re-written if the lease is ever lost.

An etcd outage shorter than the lease TTL drops nothing: keep-alives resume when etcd is back. If the lease did
expire (a long outage, a paused process), a new lease is granted and every key this process owns is written
again — registration heals without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aetcd
import aetcd.exceptions

from dynamo_lite.protocol import DiscoveryEvent
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.etcd_tls import TlsEtcdClient, channel_credentials

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """PEM files for etcd over TLS: the CA that signed the server's certificate, and an optional client pair."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""


_CONNECTION_ERRORS = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """``"http://127.0.0.1:2379,host2:2379"`` → ``[("127.0.0.1", 2379), ("host2", 2379)]``."""
    out: list[tuple[str, int]] = []
    for raw in endpoints.split(","):
        raw = raw.strip()
        if not raw:
            continue
        for scheme in ("http://", "https://"):
            if raw.startswith(scheme):
                raw = raw[len(scheme) :]
        host, _, port = raw.rstrip("/").rpartition(":")
        if not host:
            host, port = port, "2379"
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError(f"no etcd endpoint in {endpoints!r}")
    return out


def etcd_tls(settings: RuntimeSettings) -> EtcdTls | None:
    if not settings.etcd_tls_ca:
        return None
    return EtcdTls(settings.etcd_tls_ca, settings.etcd_tls_cert, settings.etcd_tls_key)


class EtcdDiscovery:
    """``Discovery`` on etcd v3. Use ``await EtcdDiscovery.connect(...)``."""

    def __init__(
        self,
        endpoints: list[tuple[str, int]],
        ttl_s: int,
        username: str,
        password: str,
        call_timeout_s: float,
        tls: EtcdTls | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._credentials = channel_credentials(tls.ca_file, tls.cert_file, tls.key_file) if tls else None
        self._endpoint_index = 0
        self._ttl_s = max(2, int(ttl_s))
        self._username = username or None
        self._password = password or None
        self._call_timeout_s = call_timeout_s
        self._client: aetcd.Client | None = None
        self._lease: aetcd.Lease | None = None
        self._own: dict[str, bytes] = {}
        self._keepalive_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.lease_renewals = 0  # how many times the lease was lost and re-granted

    def _new_client(self, host: str, port: int) -> aetcd.Client:
        kwargs = {
            "host": host,
            "port": port,
            "username": self._username,
            "password": self._password,
            "timeout": self._call_timeout_s,
        }
        if self._credentials is not None:
            return TlsEtcdClient(**kwargs, credentials=self._credentials)
        return aetcd.Client(**kwargs)

    @classmethod
    async def connect(
        cls,
        endpoints: str,
        ttl_s: int = 10,
        username: str = "",
        password: str = "",
        timeout_s: float = 5.0,
        tls: EtcdTls | None = None,
    ) -> EtcdDiscovery:
        """Connect (the first reachable endpoint), grant the lease, start its keep-alive. ``tls``: verify the
        server against a CA (and present a client certificate); ``https://`` endpoints need it."""
        self = cls(parse_endpoints(endpoints), ttl_s, username, password, timeout_s, tls)
        await asyncio.wait_for(self._open(), timeout_s)
        self._keepalive_task = asyncio.create_task(self._keepalive(), name="etcd-keepalive")
        return self

    @property
    def lease_id(self) -> int:
        return self._lease.id if self._lease else 0

    async def _open(self) -> None:
        last: Exception | None = None
        for _ in range(len(self._endpoints)):
            host, port = self._endpoints[self._endpoint_index]
            client = self._new_client(host, port)
            try:
                await client.connect()
                self._lease = await client.lease(self._ttl_s)
                self._client = client
                return
            except Exception as e:  # noqa: BLE001 — try the next endpoint
                last = e
                await _close_quietly(client)
                self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        raise ConnectionError(f"etcd unreachable at {self._endpoints}: {last}")

    async def _regrant(self) -> None:
        """The lease is gone (expired during an outage): new lease, every owned key written again."""
        async with self._lock:
            assert self._client is not None
            self._lease = await self._client.lease(self._ttl_s)
            for key, value in self._own.items():
                await self._client.put(key.encode(), value, lease=self._lease)
            self.lease_renewals += 1
            log.warning(
                "etcd lease was lost; re-registered %d keys under lease %x", len(self._own), self._lease.id
            )

    async def _keepalive(self) -> None:
        interval = self._ttl_s / 3
        timeouts = 0
        while True:
            await asyncio.sleep(interval)
            try:
                assert self._lease is not None
                reply = await asyncio.wait_for(self._lease.refresh(), interval)
                if reply is None or reply.TTL <= 0:
                    await self._regrant()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 — etcd down: keep trying, the lease outlives short outages
                log.warning("etcd keep-alive failed (%r); retrying", e)
                timeouts = timeouts + 1 if isinstance(e, TimeoutError) else 0
                # A single timeout may be a leader election on a healthy member: move on only after a
                # connection error, or after timeouts in a row.
                if not isinstance(e, TimeoutError) or timeouts >= 2:
                    await self._failover(self._client)

    async def _failover(self, client: aetcd.Client | None) -> None:
        """Move to the next endpoint — once per failure, whichever of keep-alive and watch notices it first."""
        if client is not None and client is self._client:
            async with self._lock:
                if client is self._client:
                    await self._reconnect_quietly()

    async def _reconnect_quietly(self) -> None:
        # grpc channels reconnect by themselves to the same endpoint; with several endpoints, move on.
        if len(self._endpoints) < 2 or self._client is None:
            return
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)
        host, port = self._endpoints[self._endpoint_index]
        old, lease_id = self._client, self.lease_id
        client = self._new_client(host, port)
        try:
            await client.connect()
        except Exception:  # noqa: BLE001
            await _close_quietly(client)
            return
        self._client = client
        self._lease = aetcd.Lease(lease_id=lease_id, ttl=self._ttl_s, etcd_client=client)
        await _close_quietly(old)

    async def put(self, key: str, value: bytes) -> None:
        async with self._lock:
            assert self._client is not None
            self._own[key] = value
            await self._client.put(key.encode(), value, lease=self._lease)

    async def put_shared(self, key: str, value: bytes) -> None:
        assert self._client is not None
        await self._client.put(key.encode(), value)

    async def delete(self, key: str) -> None:
        async with self._lock:
            assert self._client is not None
            self._own.pop(key, None)
            await self._client.delete(key.encode())

    async def get_prefix(self, prefix: str) -> list[DiscoveryEvent]:
        client = self._client
        assert client is not None
        try:
            result = await client.get_prefix(prefix.encode())
        except _CONNECTION_ERRORS:
            await self._failover(client)  # the watcher re-lists at once; don't wait for the keep-alive
            raise
        return [DiscoveryEvent(kv.key.decode(), kv.value, kv.mod_revision) for kv in result]

    async def watch_prefix(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        client = self._client
        assert client is not None
        try:
            watch = await client.watch_prefix(prefix.encode())
        except Exception as e:  # noqa: BLE001
            if isinstance(e, _CONNECTION_ERRORS):
                await self._failover(client)
            raise ConnectionError(f"etcd watch failed: {e}") from e
        try:
            async for event in watch:
                kv = event.kv
                value = kv.value if event.kind == "PUT" else None
                yield DiscoveryEvent(kv.key.decode(), value, kv.mod_revision)
        except aetcd.exceptions.ClientError as e:
            if isinstance(e, _CONNECTION_ERRORS):
                await self._failover(client)
            raise ConnectionError(f"etcd watch broke: {e}") from e
        finally:
            try:
                await asyncio.wait_for(watch.cancel(), 1.0)
            except Exception:  # noqa: BLE001 — the channel may already be gone
                pass

    async def delete_prefix(self, prefix: str) -> int:
        assert self._client is not None
        reply = await self._client.delete_prefix(prefix.encode())
        return int(getattr(reply, "deleted", 0))

    async def close(self) -> None:
        """Revoke the lease (our keys vanish at once) and close the connection."""
        if self._keepalive_task:
            self._keepalive_task.cancel()
            await asyncio.gather(self._keepalive_task, return_exceptions=True)
        if self._client is not None:
            if self._lease is not None:
                try:
                    await asyncio.wait_for(self._lease.revoke(), 2.0)
                except Exception:  # noqa: BLE001 — etcd gone: the lease expires by itself
                    pass
            await _close_quietly(self._client)
            self._client = None


async def _close_quietly(client: aetcd.Client) -> None:
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except Exception:  # noqa: BLE001
        pass

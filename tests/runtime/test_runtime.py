"""Runtime.connect: embedded (shared in-process backends) and distributed (fails fast when unreachable)."""

from __future__ import annotations

import socket
import time

import pytest

from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.discovery_memory import MemoryDiscovery
from dynamo_lite.runtime.request_plane_inproc import InProcRequestPlane
from dynamo_lite.runtime.runtime import Runtime


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


async def test_embedded_runtimes_share_one_key_space_and_request_plane() -> None:
    settings = RuntimeSettings.embedded(namespace="embedded")
    assert not settings.distributed
    a, b = await Runtime.connect(settings), await Runtime.connect(settings)
    try:
        assert isinstance(a.discovery, MemoryDiscovery) and isinstance(a.request_plane, InProcRequestPlane)
        assert a.request_plane is b.request_plane and a.instance_id != b.instance_id
        await a.discovery.put("dynamo_lite/embedded/x", b"1")
        assert [e.key for e in await b.discovery.get_prefix("dynamo_lite/embedded/")] == [
            "dynamo_lite/embedded/x"
        ]
        await a.close()  # a's keys go; the shared request plane stays up for b
        assert await b.discovery.get_prefix("dynamo_lite/embedded/") == []
        assert not a.owns_request_plane
    finally:
        await b.close()


@pytest.mark.parametrize("which", ["etcd", "nats"])
async def test_unreachable_services_fail_fast_with_connection_error(which: str) -> None:
    port = closed_port()
    settings = RuntimeSettings(
        etcd_endpoints=f"127.0.0.1:{port}" if which == "etcd" else "",
        nats_url=f"nats://127.0.0.1:{port}" if which == "nats" else "",
        timeouts=Timeouts(connect_s=1.0),
    )
    assert settings.distributed
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        await Runtime.connect(settings)
    assert time.monotonic() - t0 < settings.timeouts.connect_s + 1.5

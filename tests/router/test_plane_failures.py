"""The router when the request plane fails (NATS down), not a worker: a request not yet started is placed again
without counting as a migration, and a stream the plane broke continues on any worker, its own included."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import pytest

from dynamo_lite.protocol import PLANE_DOWN, InstanceLost, RequestPlaneDown
from dynamo_lite.router.settings import RouterSettings
from tests.router.test_orchestrator import Cluster, cluster, ntokens, req, run  # noqa: F401 (cluster: fixture)

Wrap = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]


def fail_first_stream(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, wrap: Wrap) -> list[str]:  # noqa: F811
    """The router's first stream goes through ``wrap``; the addresses of all its streams are returned."""
    assert cluster.runtime is not None
    plane = cluster.runtime.request_plane
    real, addresses = plane.stream, []

    def stream(address: str, payload: bytes, *, first_timeout: float | None) -> AsyncIterator[bytes]:
        addresses.append(address)
        inner = real(address, payload, first_timeout=first_timeout)
        return wrap(inner) if len(addresses) == 1 else inner

    monkeypatch.setattr(plane, "stream", stream)
    return addresses


async def plane_down(inner: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    await inner.aclose()  # type: ignore[attr-defined]
    raise RequestPlaneDown("request plane (NATS) is not connected")
    yield b""  # an async generator


async def plane_breaks_after_one(inner: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with aclosing(inner) as payloads:  # type: ignore[type-var]
        async for payload in payloads:
            yield payload
            raise InstanceLost("lost the connection to NATS; replies sent meanwhile are lost", PLANE_DOWN)


async def test_a_request_the_plane_could_not_send_is_placed_again_not_migrated(
    cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await cluster.worker("agg")
    router = await cluster.start_router(RouterSettings(migration_limit=0))
    addresses = fail_first_stream(cluster, monkeypatch, plane_down)
    chunks = await run(router, req(max_tokens=12))
    assert ntokens(chunks) == 12 and len(addresses) == 2 and addresses[0] == addresses[1]


async def test_a_stream_the_plane_broke_migrates_to_any_worker_its_own_included(
    cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await cluster.worker("agg", speedup=1.0)  # the only worker: excluding it would leave none
    router = await cluster.start_router(RouterSettings(migration_limit=1))
    addresses = fail_first_stream(cluster, monkeypatch, plane_breaks_after_one)
    chunks = await run(router, req(max_tokens=30))
    assert ntokens(chunks) == 30 and len(addresses) == 2 and addresses[0] == addresses[1]


async def test_without_migration_a_stream_the_plane_broke_fails_typed(
    cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await cluster.worker("agg", speedup=1.0)
    router = await cluster.start_router(RouterSettings(migration_limit=0))
    fail_first_stream(cluster, monkeypatch, plane_breaks_after_one)
    with pytest.raises(InstanceLost) as lost:
        await run(router, req(max_tokens=30))
    assert lost.value.plane_failed and lost.value.info.status == 503

"""The router when the decode worker it picked no longer serves (a scale-down's worker deregistered as the
router picked it): nothing ran there, so the request is placed on another worker — no migration needed, the
prefill's KV still used."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from dynamo_lite.protocol import InstanceUnavailable
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.config import Timeouts
from tests.router.test_orchestrator import Cluster, cluster, ntokens, req, run  # noqa: F401 (cluster: fixture)


async def nobody_serves(inner: AsyncIterator[bytes], address: str) -> AsyncIterator[bytes]:
    await inner.aclose()  # type: ignore[attr-defined]
    raise InstanceUnavailable(f"no instance serves {address}")
    yield b""  # an async generator


async def test_a_decode_worker_that_no_longer_serves_is_passed_over_without_migration(
    cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await cluster.worker("prefill")
    decodes = [await cluster.worker("decode"), await cluster.worker("decode")]
    router = await cluster.start_router(RouterSettings(migration_limit=0))
    assert cluster.runtime is not None
    plane = cluster.runtime.request_plane
    real, decode_addresses = plane.stream, []

    def stream(address: str, payload: bytes, *, first_timeout: float | None) -> AsyncIterator[bytes]:
        inner = real(address, payload, first_timeout=first_timeout)
        if ".decode." not in address:
            return inner
        decode_addresses.append(address)
        return nobody_serves(inner, address) if len(decode_addresses) == 1 else inner

    monkeypatch.setattr(plane, "stream", stream)
    chunks = await run(router, req(max_tokens=10))
    assert ntokens(chunks) == 10 and chunks[-1].finish_reason == "length"
    assert len(decode_addresses) == 2 and decode_addresses[0] != decode_addresses[1]
    # the second decode worker imported the prefill's KV: nothing was recomputed
    assert sum(d.engine.stats().kv_transfers for d in decodes) == 1


async def test_when_no_other_worker_is_left_the_request_fails_typed(
    cluster: Cluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await cluster.worker("agg")
    router = await cluster.start_router(RouterSettings(migration_limit=0, timeouts=Timeouts(queue_s=0.5)))
    assert cluster.runtime is not None
    plane = cluster.runtime.request_plane
    real = plane.stream

    def stream(address: str, payload: bytes, *, first_timeout: float | None) -> AsyncIterator[bytes]:
        return nobody_serves(real(address, payload, first_timeout=first_timeout), address)

    monkeypatch.setattr(plane, "stream", stream)
    with pytest.raises(Exception) as failed:  # noqa: B017 — whatever the admission answers, typed, not a hang
        await run(router, req(max_tokens=4))
    assert getattr(failed.value, "info", None) is not None and failed.value.info.status == 503

"""The NATS fast paths are used only where they pass their check at connect, can be turned off, and say which
way runs; every publish, subscribe and flush of the plane fails typed."""

from __future__ import annotations

import argparse
import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client
from nats.protocol.parser import Parser
from prometheus_client import CollectorRegistry

from dynamo_lite.protocol import RequestPlaneDown, StreamError
from dynamo_lite.runtime.cli import add_runtime_args, runtime_settings_from
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.runtime.nats_fast_path import export_read_path
from dynamo_lite.runtime.nats_parser import FastParser
from dynamo_lite.runtime.request_plane_nats import (
    NatsRequestPlane,
    publish_typed,
    subscribe_typed,
    sync_with_server,
)

if TYPE_CHECKING:
    from conftest import Proc

_n = iter(range(1_000_000))


def settings_for(nats_server: Proc, fast: bool = True) -> RuntimeSettings:
    return RuntimeSettings(
        nats_url=f"nats://127.0.0.1:{nats_server.port}",
        timeouts=Timeouts(heartbeat_interval_s=0.2, heartbeat_s=1.0),
        nats_fast_path=fast,
    )


async def serves(plane: NatsRequestPlane, client: NatsRequestPlane) -> list[bytes]:
    """A request from ``client`` to a handler served on ``plane``: what it answered."""

    async def handler(payload: bytes):  # noqa: ANN202
        for i in range(3):
            yield payload + b"%d" % i

    address = f"test.fastpath.{next(_n)}"
    served = await plane.serve(address, handler)
    try:
        async with aclosing(client.stream(address, b"x", first_timeout=5.0)) as stream:
            return [p async for p in stream]
    finally:
        await served.stop()


@pytest.mark.parametrize("fast", [True, False])
async def test_the_read_path_is_the_one_asked_for_and_exported(nats_server: Proc, fast: bool) -> None:
    plane = await NatsRequestPlane.connect(settings_for(nats_server, fast))
    try:
        assert plane.read_path == ("fast" if fast else "standard")
        assert (type(plane.nc._ps) is FastParser) is fast
        assert await serves(plane, plane) == [b"x0", b"x1", b"x2"]
        registry = CollectorRegistry()
        export_read_path(registry, plane)
        assert registry.get_sample_value("dynamo_lite_nats_read_path", {"path": "fast"}) == float(fast)
        assert registry.get_sample_value("dynamo_lite_nats_read_path", {"path": "standard"}) == float(
            not fast
        )
    finally:
        await plane.close()


class _StrSubjects:
    """What a parser of the imagined nats-py release calls: subjects and replies as str."""

    def __init__(self, nc: Any) -> None:
        self._nc = nc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:  # noqa: ANN001
        await self._nc._process_msg(sid, subject.decode(), reply.decode(), data, headers)


async def test_a_nats_py_that_keeps_the_names_but_changes_their_meaning_falls_back_and_serves(
    nats_server: Proc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A release whose parser hands ``Client._process_msg`` str subjects (same names, other meaning): the check
    at connect sees direct delivery fail, undoes the patches and logs it; serving works the standard way."""
    process_msg = Client._process_msg

    async def process_msg_of_str(self, sid, subject, reply, data, headers) -> None:  # noqa: ANN001
        await process_msg(self, sid, subject.encode(), reply.encode(), data, headers)

    parser_init = Parser.__init__

    def init(self, nc) -> None:  # noqa: ANN001
        parser_init(self, _StrSubjects(nc))

    monkeypatch.setattr(Client, "_process_msg", process_msg_of_str)
    monkeypatch.setattr(Parser, "__init__", init)
    with caplog.at_level(logging.WARNING, logger="dynamo_lite.runtime.nats_fast_path"):
        server = await NatsRequestPlane.connect(settings_for(nats_server))
        client = await NatsRequestPlane.connect(settings_for(nats_server))
    try:
        assert server.read_path == client.read_path == "standard"
        assert type(client.nc._ps) is Parser and "_process_msg" not in vars(client.nc)
        assert "falling back to nats-py's own read path" in caplog.text
        assert "a plain message delivered directly did not arrive" in caplog.text
        assert await serves(server, client) == [b"x0", b"x1", b"x2"]
    finally:
        await client.close()
        await server.close()


def test_the_environment_turns_the_fast_paths_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def parsed(*argv: str) -> RuntimeSettings:
        parser = argparse.ArgumentParser()
        add_runtime_args(parser)
        return runtime_settings_from(parser.parse_args(list(argv)), Timeouts())

    assert parsed().nats_fast_path and not parsed("--no-nats-fast-path").nats_fast_path
    monkeypatch.setenv("DYNAMO_LITE_NATS_FAST_PATH", "0")
    assert not parsed().nats_fast_path and parsed("--nats-fast-path").nats_fast_path


class _Failing:
    """A nats-py client whose every call fails with ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def publish(self, *args: object, **kwargs: object) -> None:
        raise self.error

    async def subscribe(self, *args: object, **kwargs: object) -> None:
        raise self.error

    async def flush(self, *args: object, **kwargs: object) -> None:
        raise self.error


NATS_FAILURES = [
    nats_errors.ConnectionClosedError(),
    nats_errors.OutboundBufferLimitError(),
    nats_errors.ConnectionDrainingError(),
    nats_errors.ConnectionReconnectingError(),
    nats_errors.StaleConnectionError(),
    nats_errors.FlushTimeoutError(),
    nats_errors.BadSubjectError(),
    ConnectionResetError("reset by peer"),
]


@pytest.mark.parametrize("error", NATS_FAILURES, ids=lambda e: type(e).__name__)
async def test_every_publish_subscribe_and_flush_fails_typed(error: BaseException) -> None:
    nc: Any = _Failing(error)
    with pytest.raises(RequestPlaneDown) as published:
        await publish_typed(nc, "a.b", b"x")
    with pytest.raises(RequestPlaneDown):
        await subscribe_typed(nc, "a.b", lambda msg: None)
    with pytest.raises(RequestPlaneDown):
        await sync_with_server(nc, 1.0)
    info = published.value.info
    assert (info.status, info.code) == (503, "request_plane_down") and published.value.retryable
    assert type(error).__name__ in info.message


async def test_a_message_over_the_max_payload_fails_413() -> None:
    nc: Any = _Failing(nats_errors.MaxPayloadError())
    with pytest.raises(StreamError) as err:
        await publish_typed(nc, "a.b", b"x")
    assert err.value.info.status == 413


async def test_a_closed_connection_fails_streams_typed(nats_server: Proc) -> None:
    plane = await NatsRequestPlane.connect(settings_for(nats_server))
    await plane.nc.close()
    try:
        with pytest.raises(RequestPlaneDown):
            async with aclosing(plane.stream("test.fastpath.closed", b"x", first_timeout=1.0)) as stream:
                await stream.__anext__()
        with pytest.raises(RequestPlaneDown):
            await plane.subscribe("test.fastpath.events.", lambda subject, payload: None)
        await plane.publish("test.fastpath.events.x", b"")  # an event while down is dropped, not raised
    finally:
        await plane.close()

"""A worker one wire version behind its frontend (a rolling upgrade): a request with a field it doesn't know is
served; one it can't read (newer version, unknown phase) is refused 503 ``IncompatibleWire``, retryable."""

from __future__ import annotations

from contextlib import aclosing

import msgspec
import pytest

from dynamo_lite.protocol import WIRE_VERSION, FinishReason, GenerateChunk, IncompatibleWire, decode, encode
from dynamo_lite.worker.worker import Worker
from tests.worker.test_worker import request, start, started  # noqa: F401 (started: the fixture)


async def send(w: Worker, payload: bytes) -> list[GenerateChunk]:
    assert w.runtime is not None and w.info is not None
    stream = w.runtime.request_plane.stream(w.info.address, payload, first_timeout=5.0)
    async with aclosing(stream) as chunks:
        return [decode(p, GenerateChunk) async for p in chunks]


def as_next_version(fields: list) -> bytes:
    return msgspec.msgpack.encode([*fields, {"a field": "of the next version"}])


async def test_a_request_with_a_next_version_field_is_served(started: list[Worker]) -> None:  # noqa: F811
    w = await start(started, "agg")
    fields = msgspec.msgpack.decode(encode(request(max_tokens=4)))
    chunks = await send(w, as_next_version(fields))
    assert sum(len(c.token_ids) for c in chunks) == 4 and chunks[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(("at", "value", "says"), [(-1, WIRE_VERSION + 1, "wire version"), (4, 9, "phase")])
async def test_a_request_it_cannot_read_is_refused_as_a_server_error(
    started: list[Worker],  # noqa: F811
    at: int,
    value: int,
    says: str,
) -> None:
    w = await start(started, "agg")
    fields = msgspec.msgpack.decode(encode(request()))
    fields[at] = value
    with pytest.raises(IncompatibleWire, match=says) as refused:
        await send(w, msgspec.msgpack.encode(fields))
    assert refused.value.info.status == 503 and refused.value.retryable

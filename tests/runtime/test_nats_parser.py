"""``FastParser`` dispatches exactly what nats-py's own parser does, however the bytes are split into reads."""

from __future__ import annotations

from nats.protocol.parser import Parser

from dynamo_lite.runtime.nats_parser import FastParser

WIRE = (
    b'INFO {"server_id":"x","max_payload":1048576}\r\n'
    b"MSG _INBOX.abc.1 7 5\r\nhello\r\n"
    b"+OK\r\n"
    b"MSG a.b 3 _INBOX.r.2 0\r\n\r\n"
    b"PING\r\n"
    b"HMSG _INBOX.abc.2 7 29 31\r\nNATS/1.0 503\r\nStatus: 503\r\n\r\nhi\r\n"
    b"MSG _INBOX.abc.3 7 12\r\nwith\r\nCRLF!!\r\n"
    b"PONG\r\n"
    b"MSG x 9 3\r\n\x00\x01\x02\r\n"
)


class Recorder:
    """The client side a parser calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def _process_msg(self, sid, subject, reply, data, headers) -> None:  # noqa: ANN001
        self.calls.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


async def _run(parser_class: type[Parser], reads: list[bytes]) -> list[tuple]:
    nc = Recorder()
    parser = parser_class(nc)
    for data in reads:
        await parser.parse(data)
    assert not parser.buf
    return nc.calls


async def test_same_dispatch_as_nats_py_for_every_split_point() -> None:
    expected = await _run(Parser, [WIRE])
    assert [c[0] for c in expected].count("msg") == 5
    for cut in range(1, len(WIRE)):
        assert await _run(FastParser, [WIRE[:cut], WIRE[cut:]]) == expected, cut


async def test_same_dispatch_byte_by_byte() -> None:
    expected = await _run(Parser, [WIRE])
    assert await _run(FastParser, [WIRE[i : i + 1] for i in range(len(WIRE))]) == expected

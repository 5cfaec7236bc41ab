"""The load client's parsers: chunked transfer encoding and SSE, fed split at every byte boundary."""

from __future__ import annotations

import orjson
import pytest

from benchmarks.load.http import ChunkedDecoder, HttpProtocolError, _parse_head
from benchmarks.load.openai_api import StreamRecorder
from benchmarks.load.records import RequestRecord
from benchmarks.load.sse import SseParser


def chunked(*pieces: bytes, ext: bool = False, trailer: bytes = b"") -> bytes:
    out = b""
    for p in pieces:
        out += b"%x%s\r\n%s\r\n" % (len(p), b";name=v" if ext else b"", p)
    return out + b"0\r\n" + trailer + b"\r\n"


def decode_all(decoder: ChunkedDecoder, parts: list[bytes]) -> bytes:
    return b"".join(decoder.feed(p) for p in parts)


def splits(data: bytes):
    """Every way to cut ``data`` in two, plus byte-by-byte."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("ext", [False, True])
def test_chunked_decoder_any_split(ext: bool) -> None:
    payload = [b'data: {"a":1}\n\n', b"x" * 300, b"\r\n\r\n", b"z"]
    wire = chunked(*payload, ext=ext, trailer=b"X-Trailer: 1\r\n")
    for parts in splits(wire):
        dec = ChunkedDecoder()
        assert decode_all(dec, parts) == b"".join(payload)
        assert dec.done


def test_chunked_decoder_not_done_before_last_chunk() -> None:
    wire = chunked(b"hello")
    dec = ChunkedDecoder()
    assert dec.feed(wire[:-2]) == b"hello"
    assert not dec.done
    dec.feed(wire[-2:])
    assert dec.done


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"3\r\nabcXY"])
def test_chunked_decoder_rejects_garbage(bad: bytes) -> None:
    with pytest.raises(HttpProtocolError):
        ChunkedDecoder().feed(bad)


def test_parse_head() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream"
    assert _parse_head(head) == (200, True, True, None)
    assert _parse_head(b"HTTP/1.1 500 Oops\r\ncontent-length: 12\r\nConnection: close") == (
        500,
        False,
        False,
        12,
    )
    assert _parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 3") == (200, False, False, 3)
    with pytest.raises(HttpProtocolError):
        _parse_head(b"SPDY nonsense")


SSE_STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"n": 1}\n\n'
    b'event: message\nid: 7\ndata: {"n": 2}\n\n'
    b"data: line one\ndata: line two\n\n"
    b"data:no-space\n\n"
    b"\n\n"
    b"data: [DONE]\n\n"
)
SSE_EVENTS = [b'{"n": 1}', b'{"n": 2}', b"line one\nline two", b"no-space", b"[DONE]"]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_parser_any_split_and_line_ending(newline: bytes) -> None:
    wire = SSE_STREAM.replace(b"\n", newline)
    for parts in splits(wire):
        parser = SseParser()
        events = [e for p in parts for e in parser.feed(p)] + parser.end()
        assert events == SSE_EVENTS, parts
        assert parser.pending == b""


def test_sse_parser_holds_incomplete_event() -> None:
    parser = SseParser()
    assert parser.feed(b'data: {"a": 1}\n') == []
    assert parser.pending == b'data: {"a": 1}\n'
    assert parser.feed(b"\n") == [b'{"a": 1}']


def _chat_chunk(content: str | None, finish: str | None = None, role: bool = False) -> bytes:
    delta = {"role": "assistant", "content": ""} if role else {"content": content}
    obj = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_stream_recorder_through_chunked_framing_any_split() -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
    body = (
        _chat_chunk(None, role=True)
        + _chat_chunk("Hel")
        + _chat_chunk("lo")
        + _chat_chunk(" there", finish="length")
        + b"data: "
        + orjson.dumps(usage)
        + b"\n\n"
        + b"data: [DONE]\n\n"
    )
    # One HTTP chunk per SSE event, as servers send them.
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    wire = chunked(*events)
    for parts in splits(wire):
        rec = RequestRecord(index=0)
        dec = ChunkedDecoder()
        sink = StreamRecorder(rec, chat=True)
        for i, p in enumerate(parts):
            payload = dec.feed(p)
            if payload:
                sink.on_body(payload, float(i))
        assert dec.done
        assert rec.chunk_texts == ["Hel", "lo", " there"]
        assert len(rec.chunk_times) == 3
        assert (rec.prompt_tokens, rec.completion_tokens) == (11, 3)
        assert rec.finish_reason == "length"
        assert rec.done_marker
        assert rec.events == 6  # every data: event, the role-only one, usage and [DONE] included
        assert rec.ok


def test_stream_recorder_flags_error_events_and_garbage() -> None:
    rec = RequestRecord(index=0)
    StreamRecorder(rec, chat=True).on_body(b'data: {"error": {"message": "engine died"}}\n\n', 1.0)
    assert rec.error_kind == "stream_error" and "engine died" in (rec.error or "")
    rec = RequestRecord(index=0)
    StreamRecorder(rec, chat=True).on_body(b"data: not json\n\n", 1.0)
    assert rec.error_kind == "bad_event"


def test_stream_recorder_completions_text() -> None:
    rec = RequestRecord(index=0)
    obj = {"choices": [{"index": 0, "text": " hi", "finish_reason": None}]}
    StreamRecorder(rec, chat=False).on_body(b"data: " + orjson.dumps(obj) + b"\n\n", 2.0)
    assert rec.chunk_texts == [" hi"] and rec.chunk_times == [2.0]

"""The response writer: a request's backend chunks → each choice's text, stop strings and logprobs → SSE events
or one JSON body → the socket. One writer for every request: n = 1 is one choice of n.

Per chunk (the hot path): one output step (detokenizer, stop strings), the logprobs when asked for, one
preformatted event (usage added when asked for in every chunk). Events that are ready at once leave in one
socket write (``BufferedBody``). Streams end with the ``nvext`` chunk (when asked for), usage (when asked for)
and ``[DONE]``; whole responses are one body with every choice, encoded once.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from dynamo_lite.frontend.choices import Choices, MergedStreams
from dynamo_lite.frontend.chunks import chat_choice, completion_body, text_choice, with_usage
from dynamo_lite.frontend.extra_fields import nvext_chunk
from dynamo_lite.frontend.logprobs import splice
from dynamo_lite.frontend.output import Transcript
from dynamo_lite.frontend.parsers import Delta
from dynamo_lite.frontend.prepared import CHAT, PreparedRequest, StreamFormat
from dynamo_lite.frontend.sse import JSON_HEADERS, SSE_HEADERS, BufferedBody, Exchange
from dynamo_lite.protocol import GenerateChunk
from dynamo_lite.timing import RequestTiming

Source = AsyncIterator[GenerateChunk] | MergedStreams
"""The backend's chunks: one stream (n = 1), or n merged ones that yield ``(choice, chunk)``."""
Item = GenerateChunk | tuple[int, GenerateChunk | None] | None
"""What a ``Source`` yields; None: a single stream ended."""


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


@dataclass(slots=True)
class Reply:
    """Everything the writer of one response reads."""

    request: PreparedRequest
    exchange: Exchange
    request_id: tuple[bytes, bytes]  # the x-request-id header
    choices: Choices
    timing: RequestTiming  # what ``nvext.extra_fields`` reports
    itl: Observer  # inter-token latency (seconds per token, between a choice's chunks)


async def write_response(reply: Reply, source: Source, first: Item) -> None:
    """Answer ``reply.request`` from ``source``, whose first item (``first``) has arrived."""
    if reply.request.stream:
        await _write_stream(reply, source, first)
    else:
        await _write_whole(reply, source, first)


async def _write_stream(r: Reply, source: Any, item: Any) -> None:
    p, ex, choices = r.request, r.exchange, r.choices
    items = choices.items
    formats: list[StreamFormat] = [c.fmt for c in items if c.fmt is not None]
    multi = len(items) > 1
    continuous = p.continuous_usage
    itl = r.itl
    perf_counter = time.perf_counter
    await ex.start(200, [*SSE_HEADERS, r.request_id])
    body = BufferedBody(ex)
    head = formats[0].head()
    if head:
        body.add(head)
    echo = p.echo
    first_pending = True  # no event with output went out yet
    try:
        while True:
            if multi:
                if item is None:
                    break
                i, chunk = item
            else:
                i, chunk = 0, item
            c = items[i]
            out = c.out
            if not out.finish_reason:
                if chunk is not None and chunk.token_ids:
                    t_chunk = perf_counter()
                    if c.token_at:
                        itl.observe((t_chunk - c.token_at) / len(chunk.token_ids))
                    c.token_at = t_chunk
                counted = out.completion_tokens
                delta = out.process(chunk) if chunk is not None else out.end()
                if echo:  # the prompt goes out with the first event
                    delta.content, echo = echo + delta.content, None
                finish = out.finish_reason
                logprobs = c.logprobs
                if logprobs is not None and chunk is not None:
                    logprobs.add(chunk, out.completion_tokens - counted)
                if delta or finish:
                    data = formats[i].delta(delta, finish)
                    if data and logprobs is not None:
                        taken = logprobs.take()  # what arrived since the last event, with this event's text
                        data = splice(data, taken) if taken is not None else data
                    if data:
                        body.add(with_usage(data, p.usage(choices)) if continuous else data)
                        if first_pending:
                            # The first event is what TTFT measures: out now, not when the source next waits.
                            # In prefill_first that is after the decode request was built and published.
                            first_pending = False
                            await body.flush()
                if finish and multi and chunk is not None and chunk.finish_reason is None:
                    source.stop(i)  # ended here: the backend need not go on
            if out.finish_reason and (not multi or choices.finished):
                break
            item = await body.next_of(source)
    except Exception:
        await body.flush()  # the events that were ready go out before the error event
        raise
    if p.extra_fields:
        obj = "chat.completion.chunk" if p.endpoint == CHAT else "text_completion"
        report = r.timing.report(p.extra_fields, choices.completion_tokens)
        body.add(nvext_chunk(p.response_id, p.created, p.model, obj, report))
    first = items[0].out
    body.add(formats[0].tail(p.usage(choices), first.finish_reason or "stop", first.stop_sequence))
    await ex.end(body.take())


async def _write_whole(r: Reply, source: Any, item: Any) -> None:
    p, choices = r.request, r.choices
    items = choices.items
    multi = len(items) > 1
    itl = r.itl
    perf_counter = time.perf_counter
    transcripts = [Transcript() for _ in items]
    if p.echo:
        transcripts[0].add(Delta(content=p.echo))
    while True:
        if multi:
            if item is None:
                break
            i, chunk = item
        else:
            i, chunk = 0, item
        c = items[i]
        out = c.out
        if not out.finish_reason:
            if chunk is not None and chunk.token_ids:
                t_chunk = perf_counter()
                if c.token_at:
                    itl.observe((t_chunk - c.token_at) / len(chunk.token_ids))
                c.token_at = t_chunk
            counted = out.completion_tokens
            transcripts[i].add(out.process(chunk) if chunk is not None else out.end())
            if c.logprobs is not None and chunk is not None:
                c.logprobs.add(chunk, out.completion_tokens - counted)
            if out.finish_reason and multi and chunk is not None and chunk.finish_reason is None:
                source.stop(i)  # ended here: the backend need not go on
        if out.finish_reason and (not multi or choices.finished):
            break
        item = await anext(source, None)
    usage = p.usage(choices)
    if p.responses is not None:
        first = items[0].out
        body = p.responses.body(transcripts[0], first.finish_reason or "stop", usage, first.stop_sequence)
    else:
        chat = p.endpoint == CHAT
        choice = chat_choice if chat else text_choice
        parts = [
            choice(
                i,
                transcript,
                c.out.finish_reason or "stop",
                c.logprobs.whole() if c.logprobs is not None else None,
            )
            for i, (c, transcript) in enumerate(zip(items, transcripts, strict=True))
        ]
        nvext = r.timing.report(p.extra_fields, choices.completion_tokens) if p.extra_fields else None
        obj = "chat.completion" if chat else "text_completion"
        body = completion_body(p.response_id, obj, p.created, p.model, parts, usage, nvext)
    await r.exchange.respond(200, [*JSON_HEADERS, r.request_id], body)

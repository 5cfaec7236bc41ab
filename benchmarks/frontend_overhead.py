"""How many SSE chunks per second the frontend sustains per CPU core, with a backend that yields instantly.

    python benchmarks/frontend_overhead.py                      # the real app: template, tokenize, detokenize
    python benchmarks/frontend_overhead.py --bare               # baseline: FastAPI streaming prebuilt chunks
    python benchmarks/frontend_overhead.py --tokens-per-chunk 4 # coalesced chunks (several tokens per chunk)

The server runs in a child process (pinned to CPU 0 where possible; the client to the other CPUs). Its CPU
time is read from /proc, so "chunks per core-second" holds even on a busy, shared machine.

The fake backend has no delay, but it yields to the event loop between chunks (``await asyncio.sleep(0)``), as
a real one does when each chunk arrives from the network: every chunk is its own loop iteration and its own
socket write. ``--no-loop-yield`` streams a whole response in one go (kernel-coalesced writes: a best case).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

MODEL = "smollm2"
TEXT = (
    "The quick brown fox jumps over the lazy dog. Streaming servers send one event per token, and every "
    "microsecond spent per event limits how many tokens a single core can deliver to its clients. "
)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- server side ---------------------------------------------------------------------------------------------


def _card():
    from dynamo_lite.model_files import resolve_model
    from dynamo_lite.protocol import ModelCard

    files = resolve_model()
    special = files.special_tokens
    return ModelCard(
        served_name=MODEL,
        model_path=str(files.folder),
        tokenizer_path=str(files.tokenizer_json),
        chat_template=files.chat_template,
        context_length=files.context_length,
        bos_token=special.get("bos_token", ""),
        eos_token=special.get("eos_token", ""),
        vocab_size=files.vocab_size,
    )


class InstantBackend:
    """Yields ``max_tokens`` real token ids, ``per_chunk`` at a time, without ever waiting."""

    def __init__(self, per_chunk: int, loop_yield: bool = True) -> None:
        from tokenizers import Tokenizer

        self.card = _card()
        ids = Tokenizer.from_file(self.card.tokenizer_path).encode(TEXT * 200, add_special_tokens=False).ids
        self._ids = ids
        self._per_chunk = per_chunk
        self._loop_yield = loop_yield

    def model_cards(self):
        return [self.card]

    def health(self) -> dict:
        return {"status": "healthy"}

    async def generate(self, model: str, request) -> AsyncIterator:
        from dynamo_lite.protocol import GenerateChunk

        n, k = request.sampling.max_tokens, self._per_chunk
        for i in range(0, n, k):
            if self._loop_yield:
                await asyncio.sleep(0)
            finish = "length" if i + k >= n else None
            yield GenerateChunk(token_ids=self._ids[i : min(i + k, n)], finish_reason=finish)


def _bare_app(tokens: int, loop_yield: bool):
    import orjson
    from fastapi import FastAPI
    from starlette.responses import StreamingResponse

    app = FastAPI()
    chunk = (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
            }
        )
        + b"\n\n"
    )

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        async def body():
            for _ in range(tokens):
                if loop_yield:
                    await asyncio.sleep(0)
                yield chunk
            yield b"data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


async def _serve(args: argparse.Namespace) -> None:
    from dynamo_lite.frontend import FrontendSettings, HttpServer, create_app

    settings = FrontendSettings(http_port=args.serve_port)
    loop_yield = not args.no_loop_yield
    if args.bare:
        app = _bare_app(args.tokens, loop_yield)
    else:
        app = create_app(InstantBackend(args.tokens_per_chunk, loop_yield), settings)
    server = HttpServer(app, settings)
    await server.start()
    print("READY", flush=True)
    await server.wait()


# -- client side ---------------------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.events = 0
        self.errors = 0


async def _connection(port: int, request: bytes, stats: Stats, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    end = b"data: [DONE]\n\n\r\n0\r\n\r\n"
    try:
        while not stop.is_set():
            writer.write(request)
            buf = bytearray()
            while not buf.endswith(end):
                data = await reader.read(65536)
                if not data:
                    stats.errors += 1
                    return
                buf += data
            if not buf.startswith(b"HTTP/1.1 200"):
                stats.errors += 1
            stats.requests += 1
            stats.events += buf.count(b"\r\ndata: ") - 1  # each event is one HTTP chunk; minus [DONE]
    finally:
        writer.close()


async def _load(args: argparse.Namespace, port: int, server_pid: int) -> dict:
    import orjson

    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": TEXT * 4}],  # ~200 prompt tokens with the template
            "max_tokens": args.tokens,
            "stream": True,
            "ignore_eos": True,
        }
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    stats, stop = Stats(), asyncio.Event()
    tasks = [asyncio.create_task(_connection(port, request, stats, stop)) for _ in range(args.concurrency)]
    await asyncio.sleep(args.warmup)
    r0, e0, c0, t0 = stats.requests, stats.events, _cpu_seconds(server_pid), time.perf_counter()
    await asyncio.sleep(args.duration)
    r1, e1, c1, t1 = stats.requests, stats.events, _cpu_seconds(server_pid), time.perf_counter()
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    wall, cpu, events = t1 - t0, c1 - c0, e1 - e0
    return {
        "mode": "bare FastAPI (prebuilt chunks)" if args.bare else "dynamo_lite frontend",
        "concurrency": args.concurrency,
        "tokens_per_request": args.tokens,
        "tokens_per_chunk": 1 if args.bare else args.tokens_per_chunk,
        "loop_yield_per_chunk": not args.no_loop_yield,
        "req_per_s": round((r1 - r0) / wall, 1),
        "chunks_per_s": round(events / wall),
        "server_cpu_pct": round(100 * cpu / wall, 1),
        "server_us_per_chunk": round(1e6 * cpu / max(events, 1), 2),
        "chunks_per_core_s": round(events / cpu) if cpu else None,
        "errors": stats.errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--bare", action="store_true", help="baseline: FastAPI streaming prebuilt chunks")
    p.add_argument("--no-loop-yield", action="store_true", help="stream each response without yielding")
    p.add_argument("--port", type=int, default=18931)
    p.add_argument("--serve-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()

    import uvloop

    if args.serve_port:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {0})
        uvloop.run(_serve(args))
        return

    cmd = [sys.executable, __file__, "--serve-port", str(args.port)] + sys.argv[1:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if server.stdout.readline().strip() != "READY":
            raise SystemExit("the server did not start")
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, set(range(1, os.cpu_count())))
        result = uvloop.run(_load(args, args.port, server.pid))
        print(result)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()

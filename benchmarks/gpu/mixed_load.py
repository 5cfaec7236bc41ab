"""Disaggregated (P prefill + D decode workers) vs aggregated (P + D workers) serving, one worker per GPU, same load.

One worker process per GPU (``--devices``; the first ``--prefill-workers`` of them prefill when disaggregated),
each a torch engine (bf16, Llama-3.2-1B's architecture with random weights,
chunked prefill of ``--chunk`` tokens, CUDA graphs for decode). The engines are driven directly through
``generate()`` (no HTTP): this process plays the frontend and router, and each worker reports its own token
timestamps (CLOCK_MONOTONIC, comparable across processes).

The load, identical for both topologies: ``--chat`` streams kept running (closed loop: a finished chat is
replaced at once; ``--chat-prompt`` tokens in, ``--chat-output`` out) while long prompts (``--long-prompt``
tokens, ``--long-output`` out) arrive every ``--long-period`` seconds (open loop).

- agg: requests go round-robin over all workers; each prefills (chunked, mixed with its decodes) and decodes.
- disagg: every request is prefilled on a prefill GPU (round-robin; phase PREFILL: first token + KV left in its
  CUDA pool), then decoded on a decode GPU (round-robin; phase DECODE: KV pulled by CUDA IPC, peer copy).

``--long-period 0`` sends no long prompts; ``--ramp`` spreads the first chat streams' starts over that many
seconds. The seed's shape on 4 GPUs (2P + 2D vs 4 agg; streaming chat, ISL 1000, OSL 2000, ignore_eos):

    python -m benchmarks.gpu.mixed_load --devices cuda:0 cuda:1 cuda:2 cuda:3 --prefill-workers 2 \
        --chat 256 --chat-prompt 1000 --chat-output 2000 --long-period 0 --ramp 8 --max-batch 160

Reported over the measurement window (after ``--warmup`` s): output tokens/s, TTFT p50/p99 (chat and long
separately; disagg TTFT is the prefill worker's first token), ITL p50/p99 over all streamed tokens (a chunk of
n tokens after a gap g counts n gaps of g/n; the prefill-to-decode gap of a disagg request is included).

    python -m benchmarks.gpu.mixed_load [--duration 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.gpu.child import Child, ChildError
from benchmarks.gpu.common import LLAMA_1B, emit, log, percentile, write_random_llama
from dynamo_lite.protocol import GenerateRequest, KvDescriptor, Phase, SamplingOptions

ME = "benchmarks.gpu.mixed_load"


class Command(msgspec.Struct):
    op: str
    req: GenerateRequest | None = None


class Done(msgspec.Struct):
    op: str
    rid: str = ""
    chunks: list[tuple[float, int]] = []
    tokens: list[int] = []
    kv: KvDescriptor | None = None
    error: str | None = None


# ---- worker ----


async def _serve(engine: Any, req: GenerateRequest) -> None:
    chunks: list[tuple[float, int]] = []
    tokens: list[int] = []
    kv = None
    error = None
    try:
        async for chunk in engine.generate(req):
            if chunk.token_ids:
                chunks.append((time.perf_counter(), len(chunk.token_ids)))
            if req.phase is Phase.PREFILL:
                tokens.extend(chunk.token_ids)
            if chunk.kv is not None:
                kv = chunk.kv
    except Exception as e:
        error = repr(e)
    emit(Done("done", req.request_id, chunks, tokens, kv, error))


async def worker(args: argparse.Namespace) -> None:
    import torch

    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))  # this process's threads stay on its GPU
    settings = EngineSettings(
        role=args.mode,
        model_path=args.model,
        dtype=args.dtype,
        device=args.device,
        threads=1 if args.device == "cpu" else 0,
        max_batch_size=args.max_batch,
        max_num_tokens=args.chunk,
        max_seq_len=args.max_seq,
        free_gpu_memory_fraction=0.85,
        kv_lease_s=60.0,
        extra={"kv_cuda_pool_bytes": 6 << 30, "kv_pull_timeout_s": 30.0},
    )
    started = time.perf_counter()
    engine = build_engine(settings)
    await engine.start()
    emit(
        {
            "op": "ready",
            "seconds": time.perf_counter() - started,
            "graphs": engine._graphs is not None,
            "graph_capture_s": engine._graphs.capture_seconds if engine._graphs else 0.0,
            "triton_decode": engine._model.decode_attention is not None,
            "slots": engine._cache.free_slots,
            "cuda_pool": engine._pool is not None,
        }
    )
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[str | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(inbox.put_nowait, line)
        loop.call_soon_threadsafe(inbox.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    tasks: set[asyncio.Task] = set()
    while (line := await inbox.get()) is not None:
        cmd = msgspec.json.decode(line, type=Command)
        if cmd.op == "gen" and cmd.req is not None:
            task = asyncio.create_task(_serve(engine, cmd.req))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif cmd.op == "stats":
            exporter = engine.exporter.stats if engine.exporter is not None else None
            emit(
                {
                    "op": "stats",
                    "engine": dataclasses.asdict(engine.stats()),
                    "exporter": dataclasses.asdict(exporter) if exporter else None,
                }
            )
        elif cmd.op == "quit":
            break
    for task in tasks:
        task.cancel()
    await engine.stop()


# ---- the load ----


@dataclasses.dataclass
class Req:
    rid: str
    kind: str  # chat | long
    arrival: float
    prompt: list[int]
    max_tokens: int
    stage: str = "agg"  # agg | prefill | decode
    chunks: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    done: bool = False
    error: str | None = None


def _request(
    r: Req, phase: Phase, kv: KvDescriptor | None = None, generated: list[int] | None = None
) -> Command:
    opts = SamplingOptions(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
    req = GenerateRequest(
        request_id=r.rid,
        model="llama-1b-random",
        token_ids=r.prompt,
        sampling=opts,
        phase=phase,
        kv=kv,
        generated_ids=generated or [],
    )
    return Command("gen", req)


def run_trace(topology: str, workers: list[Child], args: argparse.Namespace) -> dict:
    rng = random.Random(42)  # the same prompts and arrival plan for both topologies
    events: queue.Queue[str | None] = queue.Queue()
    for w in workers:
        w.redirect(events)
    reqs: dict[str, Req] = {}
    counter = {"chat": 0, "long": 0, "rr": 0, "prefill": 0, "decode": 0}
    prefill_workers = workers[: args.prefill_workers]
    decode_workers = workers[args.prefill_workers :]
    t0 = time.perf_counter()
    window = (t0 + args.warmup, t0 + args.warmup + args.duration)
    issue_until = window[1]

    def submit(kind: str) -> None:
        counter[kind] += 1
        n_prompt = args.chat_prompt if kind == "chat" else args.long_prompt
        r = Req(
            rid=f"{topology}-{kind}-{counter[kind]}",
            kind=kind,
            arrival=time.perf_counter(),
            prompt=[rng.randrange(1000, 128000) for _ in range(n_prompt)],
            max_tokens=args.chat_output if kind == "chat" else args.long_output,
        )
        reqs[r.rid] = r
        if topology == "agg":
            workers[counter["rr"] % len(workers)].send(_request(r, Phase.AGGREGATED))
            counter["rr"] += 1
        else:
            r.stage = "prefill"
            prefill_workers[counter["prefill"] % len(prefill_workers)].send(_request(r, Phase.PREFILL))
            counter["prefill"] += 1

    ramp_step = args.ramp / max(1, args.chat)
    to_start = args.chat
    next_chat = t0
    next_long = t0 + 0.5 if args.long_period > 0 else float("inf")
    while True:
        now = time.perf_counter()
        while to_start and now >= next_chat:
            submit("chat")
            to_start -= 1
            next_chat += ramp_step
        if now >= next_long and now < issue_until:
            submit("long")
            next_long += args.long_period
        if now >= issue_until and all(r.done for r in reqs.values()):
            break
        if now >= issue_until + args.drain:
            log(
                f"{topology}: {sum(not r.done for r in reqs.values())} requests still running at drain timeout"
            )
            break
        try:
            wake = min(next_long, next_chat if to_start else float("inf"))
            line = events.get(timeout=max(0.0, min(wake - now, 0.05)) if now < issue_until else 0.1)
        except queue.Empty:
            continue
        if line is None:
            raise ChildError("a worker exited")
        msg = msgspec.json.decode(line, type=Done)
        if msg.op != "done":
            continue
        r = reqs[msg.rid]
        r.chunks.extend(msg.chunks)
        if r.stage == "prefill" and msg.error is None and msg.kv is not None:
            r.stage = "decode"
            decode_workers[counter["decode"] % len(decode_workers)].send(
                _request(r, Phase.DECODE, msg.kv, msg.tokens)
            )
            counter["decode"] += 1
            continue
        r.done, r.error = True, msg.error
        if r.kind == "chat" and time.perf_counter() < issue_until:
            submit("chat")
    return _metrics(topology, list(reqs.values()), window, len(workers))


def _metrics(topology: str, reqs: list[Req], window: tuple[float, float], gpus: int) -> dict:
    lo, hi = window
    ttft: dict[str, list[float]] = {"chat": [], "long": []}
    itl: list[float] = []
    tokens = 0
    for r in reqs:
        chunks = sorted(r.chunks)
        if chunks and lo <= r.arrival <= hi:
            ttft[r.kind].append(chunks[0][0] - r.arrival)
        for (t_prev, _), (t, n) in zip(chunks, chunks[1:], strict=False):
            if lo <= t <= hi:
                itl.extend([(t - t_prev) / n] * n)
        tokens += sum(n for t, n in chunks if lo <= t <= hi)
    ms = 1e3
    return {
        "topology": topology,
        "output_tok_s": tokens / (hi - lo),
        "output_tok_s_per_gpu": tokens / (hi - lo) / gpus,
        "ttft_chat_p50_ms": percentile(ttft["chat"], 50) * ms,
        "ttft_chat_p99_ms": percentile(ttft["chat"], 99) * ms,
        "ttft_long_p50_ms": percentile(ttft["long"], 50) * ms,
        "ttft_long_p99_ms": percentile(ttft["long"], 99) * ms,
        "itl_p50_ms": percentile(itl, 50) * ms,
        "itl_p90_ms": percentile(itl, 90) * ms,
        "itl_p99_ms": percentile(itl, 99) * ms,
        "itl_max_ms": max(itl, default=float("nan")) * ms,
        "requests": len(reqs),
        "completed": sum(r.done and r.error is None for r in reqs),
        "errors": sum(r.error is not None for r in reqs),
        "first_error": next((r.error for r in reqs if r.error), None),
        "chat_ttft_n": len(ttft["chat"]),
        "long_ttft_n": len(ttft["long"]),
    }


def _print_row(m: dict) -> None:
    print(
        f"  {m['topology']:<7} out {m['output_tok_s']:8.0f} tok/s ({m['output_tok_s_per_gpu']:.0f}/GPU) | "
        f"TTFT chat p50 {m['ttft_chat_p50_ms']:6.1f} "
        f"p99 {m['ttft_chat_p99_ms']:6.1f} ms | TTFT long p50 {m['ttft_long_p50_ms']:6.1f} "
        f"p99 {m['ttft_long_p99_ms']:6.1f} ms | ITL p50 {m['itl_p50_ms']:5.2f} p90 {m['itl_p90_ms']:5.2f} "
        f"p99 {m['itl_p99_ms']:6.2f} max {m['itl_max_ms']:6.1f} ms | {m['completed']}/{m['requests']} ok, "
        f"{m['errors']} errors",
        flush=True,
    )


def _stats(workers: list[Child]) -> list[dict]:
    events: queue.Queue[str | None] = queue.Queue()
    out = []
    for w in workers:
        w.redirect(events)
        w.send({"op": "stats"})
        while True:
            line = events.get(timeout=30)
            if line is None:
                raise ChildError("a worker exited")
            msg = msgspec.json.decode(line)
            if msg.get("op") == "stats":
                out.append(msg)
                break
    return out


TINY = {**LLAMA_1B, "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
"""For a smoke test of the orchestration on CPU (``--tiny --devices cpu cpu``)."""


def _print_handoffs(stats: list[dict], prefill_workers: int) -> None:
    """KV handoff figures from the decode workers' engine counters (both topologies' runs together)."""
    for i, st in enumerate(stats[prefill_workers:], start=prefill_workers):
        eng = st["engine"]
        pulls = eng.get("kv_transfers", 0)
        if pulls:
            nbytes, seconds = eng.get("kv_transfer_bytes", 0), eng.get("kv_transfer_seconds", 0.0)
            print(
                f"  decode worker {i}: {pulls} KV pulls, {nbytes / 2**30:.2f} GiB, mean {seconds / pulls * 1e3:.2f} ms "
                f"each ({nbytes / seconds / 1e9 if seconds else 0:.1f} GB/s incl. claim), "
                f"{eng.get('kv_recomputes', 0)} recomputed",
                flush=True,
            )


def main_run(args: argparse.Namespace, result: dict[str, Any]) -> dict:
    import torch

    result |= {"args": vars(args), "gpus": torch.cuda.device_count()}
    folder = Path(args.model_dir)
    if not (folder / "model.safetensors").exists():
        started = time.perf_counter()
        dev = "cuda:0" if torch.cuda.is_available() else "cpu"
        write_random_llama(folder, TINY if args.tiny else LLAMA_1B, getattr(torch, args.dtype), dev)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log(f"random Llama-3.2-1B-shaped weights written in {time.perf_counter() - started:.1f} s")
    common = ["--model", str(folder), "--max-batch", str(args.max_batch), "--chunk", str(args.chunk)]
    common += ["--max-seq", str(args.max_seq), "--dtype", args.dtype]
    if not 0 < args.prefill_workers < len(args.devices):
        raise SystemExit("--prefill-workers must leave at least one of --devices for decode")
    workers = [
        Child(ME, "--role", "worker", "--device", d, "--mode", "prefill" if i < args.prefill_workers else "decode",
              *common, name=f"worker-{d}")
        for i, d in enumerate(args.devices)
    ]  # fmt: skip
    try:
        result["ready"] = [w.recv(300) for w in workers]
        log(f"workers ready: {result['ready']}")
        print(
            f"{args.prefill_workers}P + {len(args.devices) - args.prefill_workers}D vs {len(args.devices)} agg on "
            f"{', '.join(args.devices)}; "
            f"mixed load: {args.chat} chat streams ({args.chat_prompt} in / {args.chat_output} out) + "
            + (
                f"a {args.long_prompt}-token prompt ({args.long_output} out) every {args.long_period} s; "
                if args.long_period > 0
                else "no long prompts; "
            )
            + f"{args.duration} s measured after {args.warmup} s; chunked prefill {args.chunk}",
            flush=True,
        )
        for topology in args.topologies:
            m = run_trace(topology, workers, args)
            result[topology] = m
            _print_row(m)
        result["worker_stats"] = _stats(workers)
        _print_handoffs(result["worker_stats"], args.prefill_workers)
    finally:
        for w in workers:
            w.close()
    if "agg" in result and "disagg" in result:
        a, d = result["agg"], result["disagg"]
        result["itl_p99_agg_over_disagg"] = a["itl_p99_ms"] / d["itl_p99_ms"]
        result["throughput_disagg_over_agg"] = d["output_tok_s"] / a["output_tok_s"]
        print(
            f"  p99 ITL: disagg {result['itl_p99_agg_over_disagg']:.2f}x better than agg; output throughput "
            f"disagg/agg = {result['throughput_disagg_over_agg']:.2f}",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["main", "worker"], default="main")
    p.add_argument("--device", default="cuda:0", help="worker: its device")
    p.add_argument(
        "--devices", nargs="+", default=["cuda:0", "cuda:1"], help="one worker per device (at least 2)"
    )
    p.add_argument("--prefill-workers", type=int, default=1, help="disagg: the first N devices prefill")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds over which the chat streams start")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke test of the harness)")
    p.add_argument("--mode", default="agg")
    p.add_argument("--model", default="")
    p.add_argument("--model-dir", default="/tmp/llama-1b-random")
    p.add_argument("--max-batch", type=int, default=96)
    p.add_argument("--chunk", type=int, default=2048, help="max_num_tokens per engine step (chunked prefill)")
    p.add_argument("--max-seq", type=int, default=8704)
    p.add_argument("--chat", type=int, default=64)
    p.add_argument("--chat-prompt", type=int, default=512)
    p.add_argument("--chat-output", type=int, default=256)
    p.add_argument("--long-prompt", type=int, default=8000)
    p.add_argument("--long-output", type=int, default=64)
    p.add_argument("--long-period", type=float, default=0.5)
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--drain", type=float, default=20.0)
    p.add_argument("--topologies", nargs="+", default=["agg", "disagg"])
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.role == "worker":
        asyncio.run(worker(args))
        return 0
    result: dict[str, Any] = {}
    try:
        main_run(args, result)
    except Exception as e:  # what was measured is printed already
        import traceback

        traceback.print_exc()
        result["error"] = repr(e)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

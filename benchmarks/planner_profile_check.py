"""Does a profile predict the real thing? Serve an engine (1 prefill + 1 decode worker, etcd, NATS, a frontend
on loopback), measure its profile, then compare the profile's TTFT and ITL with what clients see at a few
concurrencies (closed loop).

Profiles, all with the planner's ``measure_profile`` on the same grid:

- ``served``: measured through the frontend, on the very worker processes the load then runs on (same threads,
  same processes, same box in the same minutes). Prefill = TTFT of a lone ``max_tokens=1`` request (answered by
  the prefill worker alone); decode = the steady ITL of ``c`` streams decoding together.
- the same with the other role kept busy (``kept_busy``): prefill while one long stream decodes, decode steps
  while prefill-only requests run back to back — on a box whose cores the two workers share, each slows the
  other; and the KV hand-off (first → second token) idle and with the prefill worker busy.
- ``alone`` (``--alone``, for comparison): the engine in one process by itself
  (``python -m dynamo_lite.planner profile``), as the first version of this check did.

Predicted (``simulate_closed_loop``): the closed loop run step by step on the profile's times — ``c`` clients
through one FCFS prefill worker, the hand-off, and the decode batch whose step takes ITL(batch size); each
phase at the alone or the busy pace as the other worker is idle or busy at that moment. Clients of a closed loop
fall into step (the second queues behind the first, then each prefills while the other decodes), which is why
neither the planner's M/D/1 formula (open loop, Poisson arrivals) nor mean value analysis (``predict_closed_loop``,
which treats where each client is as independent) is the prediction; both are printed beside it.
Measured: the mean over requests of TTFT and of each request's mean ITL, through HTTP, after each client's
first request (the start, where every client arrives at once, is not the loop's steady state).

    flock /tmp/bench.lock python -m benchmarks.planner_profile_check --engine torch --threads 1 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.load_trace import RequestResult, TracePoint, _one
from benchmarks.local_stack import LocalStack, free_port, wait_for
from benchmarks.planner_compare import BoxSampler, machine
from dynamo_lite.planner.profile import EngineProfile, measure_profile
from dynamo_lite.protocol import GenerateChunk, GenerateRequest

MODEL = "profiled"


class ServedEngine:
    """The ``Engine`` face of a running frontend: ``generate`` streams ``/v1/completions`` with the request's
    token ids as the prompt, one chunk per token. ``measure_profile`` measures through it as it does an
    engine in-process."""

    name = "served"

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=300)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        assert self._client is not None
        body = {
            "model": self.model,
            "prompt": request.token_ids,
            "max_tokens": request.sampling.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": request.sampling.ignore_eos,
        }
        sent = 0
        async with self._client.stream("POST", self.url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    sent += 1
                    yield GenerateChunk(token_ids=[0])
                if chunk.get("usage") and chunk["usage"].get("completion_tokens", 0) > sent:
                    # tokens that came coalesced (or without text) count at the end
                    yield GenerateChunk(token_ids=[0] * (chunk["usage"]["completion_tokens"] - sent))


@asynccontextmanager
async def kept_busy(url: str, role: str, isl: int) -> AsyncIterator[None]:
    """While inside, keep ``role``'s worker busy through the frontend: ``"decode"`` — one long stream
    decoding throughout; ``"prefill"`` — prefill-only requests (``max_tokens=1``) back to back. On a box whose
    cores the two workers share, that is how one role runs while the other works."""
    from dynamo_lite.protocol import SamplingOptions

    background = ServedEngine(url, MODEL)
    await background.start()
    max_tokens = 1 if role == "prefill" else 4 * isl

    async def keep() -> None:
        for n in range(10**9):
            ids = [500 + (n * 31 + i * 17) % 700 for i in range(isl)]
            req = GenerateRequest(
                f"busy-{n}", MODEL, ids, SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
            )
            async for _ in background.generate(req):
                pass

    task = asyncio.create_task(keep())
    try:
        await asyncio.sleep(2.0)  # the background's own prefill done: it is decoding (or prefilling) now
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await background.stop()


async def busy_profile(url: str, role: str, isl: int, **measure) -> EngineProfile:
    """``measure_profile`` through the frontend while ``role``'s worker is kept busy."""
    async with kept_busy(url, role, isl):
        return await measure_profile(ServedEngine(url, MODEL), **measure)


async def handoff_s(url: str, isl: int, repeats: int = 3, busy: str = "") -> float:
    """First → second token of a lone request: the KV hand-off from the prefill to the decode worker plus one
    decode step. Median of ``repeats``; with ``busy``, while that role's worker is kept busy."""
    if busy:
        async with kept_busy(url, busy, isl):
            return await handoff_s(url, isl, repeats)
    gaps = []
    async with httpx.AsyncClient(timeout=300) as client:
        for i in range(repeats):
            times = []
            prompt = [300 + (i * 7 + j + 97 * len(busy)) % 900 for j in range(isl)]
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "stream": True, "ignore_eos": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"text"' in line:
                        times.append(time.perf_counter())
            if len(times) >= 2:
                gaps.append(times[1] - times[0])
    return sorted(gaps)[len(gaps) // 2]


async def closed_loop(
    url: str, concurrency: int, requests: int, isl: int, osl: int, warm_up: bool = False
) -> list[RequestResult]:
    """``concurrency`` clients, each sending its next request when its last one ends; each client's first
    request is left out of the results (all clients start at once: a burst, not the steady loop)."""
    point = TracePoint(0.0, 0.0, isl, osl)
    results: list[RequestResult] = []
    base = (7 * concurrency + (3 if warm_up else 0)) * 10**6  # distinct prompts in every loop: no cache hits
    serial = iter(range(base, base + 10**6))
    async with httpx.AsyncClient(timeout=300) as client:

        async def client_loop() -> None:
            await _one(client, url, MODEL, point, next(serial))
            while len(results) < requests:
                results.append(await _one(client, url, MODEL, point, next(serial)))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


@dataclass(slots=True)
class LoopPrediction:
    ttft_s: float
    itl_s: float  # a request's mean ITL, hand-off included
    step_s: float  # the decode step at the mean number decoding
    decoding: float  # mean number of clients decoding
    prefill_busy: float  # prefill worker utilization


def predict_closed_loop(
    profile: EngineProfile,
    clients: int,
    isl: int,
    osl: int,
    handoff: float,
    busy: tuple[EngineProfile, EngineProfile] | None = None,
) -> LoopPrediction:
    """Mean value analysis of the closed loop: prefill = one FCFS server with deterministic service s
    (an arriving request waits for the queue ahead of it and half a service for the one being served);
    decode = a delay of hand-off + (OSL − 2) steps, a step taking ITL(number decoding, ISL + OSL/2).

    ``busy``: the profiles measured with the other role kept busy (prefill while decoding, decode while
    prefilling). Then a prefill takes s_alone + (s_busy − s_alone)·P(the decode worker is busy), and a decode
    step likewise with P(the prefill worker is busy); each P from where the other n − 1 clients are (each
    decoding or at the prefill worker for its share of the cycle, independently)."""
    context = isl + osl / 2
    s_busy = profile if busy is None else busy[0]
    itl_busy = profile if busy is None else busy[1]
    queue, util = 0.0, 0.0  # at the prefill worker: mean number there and utilization, with one client fewer
    s, step = profile.prefill_seconds(isl), profile.itl(1, context)
    resp, rate, decoding = s, 0.0, 0.0
    for n in range(1, clients + 1):
        # arrival theorem: a request sees the loop as it is with n - 1 clients
        for _ in range(200):  # fixed point: the times depend on the overlap, which depends on the times
            resp = s + s * (queue - util) + util * s / 2
            delay = handoff + (osl - 2) * step  # the hand-off includes the first decode step
            rate = n / (resp + delay)
            decoding = rate * (osl - 1) * step  # Little: clients in the decode batch
            p_decode_busy = 1 - (1 - delay / (resp + delay)) ** (n - 1)
            p_prefill_busy = 1 - (1 - resp / (resp + delay)) ** (n - 1)
            s0, s1 = profile.prefill_seconds(isl), s_busy.prefill_seconds(isl)
            batch = max(decoding, 1.0)
            i0, i1 = profile.itl(batch, context), itl_busy.itl(batch, context)
            new_s, new_step = s0 + (s1 - s0) * p_decode_busy, i0 + (i1 - i0) * p_prefill_busy
            if abs(new_s - s) < 1e-7 and abs(new_step - step) < 1e-7:
                break
            s, step = 0.5 * s + 0.5 * new_s, 0.5 * step + 0.5 * new_step
        queue, util = rate * resp, min(rate * s, 1.0)
    itl = (handoff + (osl - 2) * step) / (osl - 1)
    return LoopPrediction(resp, itl, step, decoding, util)


def simulate_closed_loop(
    profile: EngineProfile,
    clients: int,
    isl: int,
    osl: int,
    handoff: float,
    requests: int,
    busy: tuple[EngineProfile, EngineProfile] | None = None,
    handoff_busy: float | None = None,
    dt: float = 0.0005,
) -> LoopPrediction:
    """The closed loop run step by step (``dt``) on the profile's times, as the benchmark runs it: every
    client sends at t = 0, its first request is left out, ``requests`` are kept. The prefill worker serves one
    request at a time in arrival order; a request's KV then travels (``handoff`` less the one step it includes,
    ``handoff_busy`` while the prefill worker is busy with the next) and it joins the decode batch at the next
    step; a step emits one token for every sequence in the batch and takes ITL(batch size). With ``busy``, a
    prefill advances at the pace of the decode-busy profile while the decode batch is not empty, and a step at
    the pace of the prefill-busy profile while a prefill runs — the overlap as it happens, not its average."""
    context = isl + osl / 2
    s_busy = profile if busy is None else busy[0]
    itl_busy = profile if busy is None else busy[1]
    s0, s1 = profile.prefill_seconds(isl), s_busy.prefill_seconds(isl)
    transfer = max(handoff - profile.itl(1, context), 0.0)
    transfer_busy = transfer if handoff_busy is None else max(handoff_busy - itl_busy.itl(1, context), 0.0)
    queue = list(range(clients))  # clients waiting for (or at) the prefill worker, in order
    sent = [0.0] * clients
    count = [0] * clients
    joining: list[tuple[float, int]] = []  # (joins at, client)
    batch: list[int] = []
    tokens = [0] * clients
    first = [0.0] * clients
    prefill_done, step_done = 0.0, 0.0  # fractions of the current prefill and decode step
    kept: list[tuple[float, float]] = []  # (TTFT, mean ITL)
    decoding_time, prefill_busy_time = 0.0, 0.0
    t = 0.0
    while len(kept) < requests and t < 3600:
        prefilling = bool(queue)
        if prefilling:
            prefill_done += dt / (s1 if batch else s0)
        if batch:
            n = len(batch)
            step_done += dt / (itl_busy.itl(n, context) if prefilling else profile.itl(n, context))
        t += dt
        decoding_time += len(batch) * dt
        prefill_busy_time += dt if prefilling else 0.0
        if prefilling and prefill_done >= 1.0:
            c = queue.pop(0)
            prefill_done = 0.0
            first[c], tokens[c] = t, 1
            joining.append((t + (transfer_busy if queue else transfer), c))
        if batch and step_done >= 1.0:
            step_done = 0.0
            for c in list(batch):
                tokens[c] += 1
                if tokens[c] == osl:  # done: the client sends its next request at once
                    batch.remove(c)
                    if count[c] > 0:
                        kept.append((first[c] - sent[c], (t - first[c]) / (osl - 1)))
                    count[c] += 1
                    sent[c] = t
                    queue.append(c)
        if not batch:
            step_done = 0.0
        ready = [c for at, c in joining if at <= t]
        if ready:
            joining = [(at, c) for at, c in joining if at > t]
            batch.extend(ready)  # they join at the next step boundary (a step in flight is not restarted)
    ttft = sum(k[0] for k in kept) / len(kept)
    itl = sum(k[1] for k in kept) / len(kept)
    return LoopPrediction(ttft, itl, 0.0, decoding_time / t, prefill_busy_time / t)


def md1_ttft(s: float, concurrency: int, decode_s: float) -> float:
    """The planner's open-loop model (M/D/1 wait at the loop's utilization), for comparison."""
    ttft = s
    for _ in range(100):
        rho = min(concurrency / (ttft + decode_s) * s, 0.99)
        ttft = 0.5 * ttft + 0.5 * (s + rho * s / (2 * (1 - rho)))
    return ttft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.planner_profile_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--engine", default="torch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (profile measured alike)")
    p.add_argument("--isl", type=int, default=256)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--requests", type=int, default=16, help="measured requests per concurrency")
    p.add_argument("--repeats", type=int, default=3, help="profile: runs per point")
    p.add_argument(
        "--statistic",
        choices=("best", "median"),
        default="median",
        help="profile: a point is the best or the median of its runs (median: the typical time on this box, "
        "as the measured means are)",
    )
    p.add_argument(
        "--decode-tokens",
        type=int,
        default=128,
        help="profile: tokens per decode stream (enough that the first stream still decodes when the last "
        "one's prefill ends)",
    )
    p.add_argument("--alone", action="store_true", help="also measure the profile in-process, alone")
    p.add_argument("--no-busy", action="store_true", help="don't measure with the other role kept busy")
    p.add_argument("--output", default=None, help="write profiles, predictions and measurements here (JSON)")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    grid = {
        "isls": (args.isl // 2, args.isl, args.isl * 2),
        "concurrencies": tuple(sorted({1, *levels})),
        "contexts": (args.isl + args.osl // 2,),
    }
    out: dict = {"machine": machine(), "args": vars(args), "profiles": {}, "rows": []}
    print(f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores", flush=True)
    print(f"cpu flags: {out['machine']['flags']}", flush=True)
    stack = LocalStack()
    profiles: dict[str, EngineProfile] = {}
    busy: tuple[EngineProfile, EngineProfile] | None = None
    handoff_busy: float | None = None
    try:
        if args.alone:
            path = str(Path(stack.tmp) / "profile.json")
            cmd = [
                sys.executable,
                "-m",
                "dynamo_lite.planner",
                "profile",
                "--engine",
                args.engine,
                "-o",
                path,
            ]
            cmd += ["--threads", str(args.threads), "--max-batch-size", str(max(levels))]
            cmd += ["--isls", ",".join(map(str, grid["isls"]))]
            cmd += ["--concurrencies", ",".join(map(str, grid["concurrencies"]))]
            cmd += ["--contexts", ",".join(map(str, grid["contexts"]))]
            cmd += ["--decode-tokens", str(args.decode_tokens)]  # (in-process: best of its runs)
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
            profiles["alone"] = EngineProfile.load(path)
        runtime = stack.start_services()
        worker = [sys.executable, "-m", "dynamo_lite.worker", "--engine", args.engine]
        worker += ["--served-model-name", MODEL, "--threads", str(args.threads)]
        worker += ["--max-batch-size", str(max(levels)), *runtime]
        stack.spawn("prefill", [*worker, "--mode", "prefill"])
        stack.spawn("decode", [*worker, "--mode", "decode"])
        port = free_port()
        frontend = [sys.executable, "-m", "dynamo_lite.frontend", "--http-host", "127.0.0.1"]
        stack.spawn("frontend", [*frontend, "--http-port", str(port), *runtime])

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                inst = json.load(r)["instances"]
            return bool(inst.get("prefill")) and bool(inst.get("decode"))

        wait_for(ready, 180, "workers registered")
        url = f"http://127.0.0.1:{port}"
        with BoxSampler() as box:
            asyncio.run(closed_loop(url, 1, 2, args.isl, args.osl, warm_up=True))
            measure = {"max_batch_size": max(levels), "decode_tokens": args.decode_tokens}
            measure |= {"repeats": args.repeats, "statistic": args.statistic, **grid}
            profiles["served"] = asyncio.run(measure_profile(ServedEngine(url, MODEL), **measure))
            if not args.no_busy:
                busy = (  # prefill while the decode worker decodes; decode while the prefill worker prefills
                    asyncio.run(busy_profile(url, "decode", args.isl, **(measure | {"concurrencies": (1,)}))),
                    asyncio.run(busy_profile(url, "prefill", args.isl, **(measure | {"isls": (args.isl,)}))),
                )
            handoff = asyncio.run(handoff_s(url, args.isl))
            handoff_busy = None if args.no_busy else asyncio.run(handoff_s(url, args.isl, busy="prefill"))
            measured = {}
            for c in levels:
                res = asyncio.run(closed_loop(url, c, args.requests, args.isl, args.osl))
                measured[c] = [r for r in res if r.complete]
        out["box"] = box.summary()
    finally:
        stack.stop()
    out["handoff_s"], out["handoff_prefill_busy_s"] = handoff, handoff_busy
    if busy is not None:
        profiles["served+busy"] = profiles["served"]  # predicted with the busy tables too
        out["profiles"]["decode_busy"] = json.loads(busy[0].to_json())
        out["profiles"]["prefill_busy"] = json.loads(busy[1].to_json())
        print(
            f"profile served, decode worker busy: prefill {busy[0].prefill_seconds(args.isl) * 1000:.0f} ms; "
            "prefill worker busy: decode step "
            + ", ".join(
                f"c{c}: {row[-1] * 1000:.1f} ms"
                for c, row in zip(busy[1].concurrencies, busy[1].itl_s, strict=True)
            )
        )
    for name, prof in profiles.items():
        out["profiles"][name] = json.loads(prof.to_json())
    print(
        f"engine {args.engine}, ISL {args.isl}, OSL {args.osl}, {args.threads} thread(s) per worker; "
        f"hand-off {handoff * 1000:.0f} ms"
        + ("" if handoff_busy is None else f" ({handoff_busy * 1000:.0f} ms with the prefill worker busy)")
        + f"; box CPU busy {out['box']['box_cpu_busy']:.0%}, load average "
        f"{out['box']['load_avg_mean']:.2f}, this check's processes {out['box']['stack_cpu_busy']:.0%}"
    )
    for name, prof in profiles.items():
        if name == "served+busy":
            continue
        pre = ", ".join(f"{n}: {s * 1000:.0f} ms" for n, s in zip(prof.isls, prof.prefill_s, strict=True))
        itl = ", ".join(
            f"c{c}: {row[-1] * 1000:.1f} ms" for c, row in zip(prof.concurrencies, prof.itl_s, strict=True)
        )
        print(f"profile {name}: prefill {pre}; decode step at context {prof.contexts[-1]} {itl}")
    print(
        "prediction   clients  requests  TTFT measured  predicted  error  MVA error  M/D/1 error   "
        "ITL measured  predicted  error  MVA error"
    )
    for c in levels:
        res = measured[c]
        ttft = sum(r.ttft_s for r in res) / len(res)
        itl = sum(r.itl_s for r in res) / len(res)
        for name, prof in profiles.items():
            with_busy = busy if name == "served+busy" else None
            sim = simulate_closed_loop(
                prof,
                c,
                args.isl,
                args.osl,
                handoff,
                args.requests,
                with_busy,
                handoff_busy if with_busy else None,
            )
            mva = predict_closed_loop(prof, c, args.isl, args.osl, handoff, with_busy)
            md1 = md1_ttft(prof.prefill_seconds(args.isl), c, args.osl * prof.itl(c, args.isl + args.osl / 2))
            row = {
                "prediction": name,
                "clients": c,
                "requests": len(res),
                "ttft_measured_s": ttft,
                "ttft_predicted_s": sim.ttft_s,
                "ttft_mva_s": mva.ttft_s,
                "ttft_md1_s": md1,
                "itl_measured_s": itl,
                "itl_predicted_s": sim.itl_s,
                "itl_mva_s": mva.itl_s,
                "decoding": sim.decoding,
                "prefill_busy": sim.prefill_busy,
            }
            out["rows"].append(row)

            def err(x: float, ref: float) -> str:
                return f"{(x - ref) / ref:>+5.0%}"

            print(
                f"{name:<11}  {c:>7}  {len(res):>8}  {ttft * 1000:>10.1f} ms  {sim.ttft_s * 1000:>6.1f} ms  "
                f"{err(sim.ttft_s, ttft)}  {err(mva.ttft_s, ttft):>9}  {err(md1, ttft):>11}  "
                f"{itl * 1000:>9.1f} ms  {sim.itl_s * 1000:>6.1f} ms  {err(sim.itl_s, itl)}  {err(mva.itl_s, itl):>9}"
            )
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())

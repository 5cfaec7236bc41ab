"""Does a profile predict the real thing? Measure an engine's profile in-process, then serve it (1 prefill + 1
decode worker, etcd, NATS, a frontend on loopback) and compare the profile's TTFT and ITL with what clients see
at a few concurrencies (closed loop).

Predicted, with the planner's own model (``decide.py``): ITL = the profile's decode step at (concurrency,
ISL + OSL/2); TTFT = the prefill time s plus the M/D/1 wait ρ·s / (2(1 − ρ)), where ρ = λ·s and the closed
loop's arrival rate λ = concurrency / (TTFT + OSL · ITL) — solved by iteration.
Measured: the mean over requests of TTFT and of each request's mean ITL, through HTTP.

    python -m benchmarks.planner_profile_check --engine torch --threads 1 --concurrency 1,2,4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx

from benchmarks.load_trace import TracePoint, _one
from benchmarks.local_stack import LocalStack, free_port, wait_for
from dynamo_lite.planner.profile import EngineProfile

MODEL = "profiled"


async def closed_loop(url: str, concurrency: int, requests: int, isl: int, osl: int) -> list:
    """``concurrency`` clients, each sending its next request when its last one ends."""
    point = TracePoint(0.0, 0.0, isl, osl)
    results, serial = [], iter(range(10**9))
    async with httpx.AsyncClient(timeout=300) as client:

        async def client_loop() -> None:
            while len(results) < requests:
                results.append(await _one(client, url, MODEL, point, next(serial) + 7 * concurrency * 10**6))

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return results


def predicted_ttft(s: float, concurrency: int, decode_s: float) -> float:
    """TTFT of a closed loop of ``concurrency`` clients: prefill ``s`` plus the M/D/1 wait at its utilization."""
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
    p.add_argument("--requests", type=int, default=12, help="measured requests per concurrency")
    p.add_argument("--profile", default=None, help="use this profile instead of measuring one")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    stack = LocalStack()
    try:
        path = args.profile or str(Path(stack.tmp) / "profile.json")
        if not args.profile:
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
            cmd += [
                "--isls",
                f"{args.isl // 2},{args.isl},{args.isl * 2}",
                "--concurrencies",
                ",".join(map(str, levels)),
            ]
            cmd += ["--contexts", f"{args.isl},{args.isl + args.osl}", "--decode-tokens", str(args.osl)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        profile = EngineProfile.load(path)
        runtime = stack.start_services()
        worker = [
            sys.executable,
            "-m",
            "dynamo_lite.worker",
            "--engine",
            args.engine,
            "--served-model-name",
            MODEL,
        ]
        worker += ["--threads", str(args.threads), "--max-batch-size", str(max(levels)), *runtime]
        stack.spawn("prefill", [*worker, "--mode", "prefill"])
        stack.spawn("decode", [*worker, "--mode", "decode"])
        port = free_port()
        stack.spawn(
            "frontend",
            [
                sys.executable,
                "-m",
                "dynamo_lite.frontend",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(port),
            ]
            + runtime,
        )

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                inst = json.load(r)["instances"]
            return bool(inst.get("prefill")) and bool(inst.get("decode"))

        wait_for(ready, 180, "workers registered")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(closed_loop(url, 1, 2, args.isl, args.osl))  # warm-up
        rows = []
        for c in levels:
            started = time.monotonic()
            res = [
                r for r in asyncio.run(closed_loop(url, c, args.requests, args.isl, args.osl)) if r.complete
            ]
            ttft = sum(r.ttft_s for r in res) / len(res)
            itl = sum(r.itl_s for r in res) / len(res)
            want_itl = profile.itl(c, args.isl + args.osl / 2)
            want_ttft = predicted_ttft(profile.prefill_seconds(args.isl), c, args.osl * want_itl)
            rows.append((c, len(res), ttft, want_ttft, itl, want_itl, time.monotonic() - started))
    finally:
        stack.stop()
    print(f"engine {args.engine}, ISL {args.isl}, OSL {args.osl}, {args.threads} thread(s) per worker")
    print("concurrency  requests  TTFT measured  predicted  error   ITL measured  predicted  error")
    for c, n, ttft, wt, itl, wi, _ in rows:
        print(
            f"{c:>11}  {n:>8}  {ttft * 1000:>10.1f} ms  {wt * 1000:>6.1f} ms  {(wt - ttft) / ttft:>+5.0%}"
            f"  {itl * 1000:>9.1f} ms  {wi * 1000:>6.1f} ms  {(wi - itl) / itl:>+5.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

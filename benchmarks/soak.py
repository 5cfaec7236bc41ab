"""Bounded soak: mixed completions and client cancellations for N minutes against a real distributed stack.

Starts etcd, nats-server, a frontend and 1 prefill + 1 decode worker on loopback (or targets ``--url`` with
``--pid``/``--worker-metrics`` given), then runs ``--concurrency`` clients that each loop: a streaming chat
that completes, or one cancelled at a random point (``--cancel-fraction``). Every ``--sample-s`` it records the
RSS of every server process and the workers' KV bytes held / active sequences. At the end it prints RSS growth
after warm-up, KV held, and error counts (a cancelled request is not an error; anything else non-200 is).

    python -m benchmarks.soak --minutes 10 --engine torch
    python -m benchmarks.soak --minutes 2 --engine mocker --speedup-ratio 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.local_stack import LocalStack, free_port, wait_for


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def metric_sum(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + "{"))


@dataclass
class Stack(LocalStack):
    """The soak's processes: services, 1 prefill + 1 decode worker, a frontend."""

    url: str = ""
    model: str = ""
    worker_metrics: list[int] = field(default_factory=list)


def start_stack(args: argparse.Namespace) -> Stack:
    st = Stack(model=args.model)
    rt = ["--namespace", "soak", *st.start_services()]
    engine = ["--engine", args.engine, "--served-model-name", args.model]
    if args.engine == "mocker":
        engine += ["--speedup-ratio", str(args.speedup_ratio)]
    else:
        engine += ["--threads", "1"]
    for mode in ("prefill", "decode"):
        port = free_port()
        st.worker_metrics.append(port)
        st.spawn(
            mode,
            [
                sys.executable,
                "-m",
                "dynamo_lite.worker",
                "--mode",
                mode,
                *engine,
                "--metrics-port",
                str(port),
                *rt,
                "--log-level",
                "WARNING",
            ],
        )
    http = free_port()
    st.spawn(
        "frontend",
        [
            sys.executable,
            "-m",
            "dynamo_lite.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
            *rt,
            "--log-level",
            "WARNING",
        ],
    )
    st.url = f"http://127.0.0.1:{http}"
    wait_for(
        lambda: args.model in urllib.request.urlopen(st.url + "/v1/models", timeout=1).read().decode(),
        180,
        "model served",
    )
    return st


async def client_loop(
    url: str,
    model: str,
    until: float,
    rng: random.Random,
    cancel_fraction: float,
    max_tokens: int,
    counts: Counter,
    samples: list[str],
) -> None:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.7,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(timeout=120) as client:
        while time.monotonic() < until:
            question = f"Tell me fact number {rng.randint(1, 10_000)} about {rng.choice(['cats', 'rivers', 'CPUs'])}."
            payload = {**body, "messages": [{"role": "user", "content": question}]}
            cancel_after = rng.uniform(0.0, 2.0) if rng.random() < cancel_fraction else None

            async def one(payload: dict = payload) -> None:
                async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
                    if r.status_code != 200:
                        counts[f"http_{r.status_code}"] += 1
                        samples.append((await r.aread()).decode(errors="replace")[:300])
                        return
                    async for line in r.aiter_lines():
                        if line.startswith('data: {"error"'):
                            counts["stream_error"] += 1
                            samples.append(line[:300])
                    counts["completed"] += 1

            try:
                if cancel_after is None:
                    await one()
                else:
                    await asyncio.wait_for(one(), cancel_after)
            except TimeoutError:
                counts["cancelled"] += 1
            except httpx.HTTPError as e:
                counts[f"client_{type(e).__name__}"] += 1
                samples.append(repr(e)[:300])


async def soak(args: argparse.Namespace, stack: Stack) -> dict:
    pids = {name: p.pid for name, p in stack.procs.items() if name in ("frontend", "prefill", "decode")}
    pids.update({f"pid{p}": p for p in args.pid})
    counts: Counter = Counter()
    samples: list[str] = []
    series: list[dict] = []
    rng = random.Random(args.seed)
    start = time.monotonic()
    until = start + args.minutes * 60
    clients = [
        asyncio.create_task(
            client_loop(
                stack.url,
                stack.model,
                until,
                random.Random(rng.random()),
                args.cancel_fraction,
                args.max_tokens,
                counts,
                samples,
            )
        )
        for _ in range(args.concurrency)
    ]
    while time.monotonic() < until:
        await asyncio.sleep(args.sample_s)
        row = {"t": round(time.monotonic() - start, 1), **{f"rss_{n}": rss_bytes(p) for n, p in pids.items()}}
        for i, port in enumerate(stack.worker_metrics):
            try:
                row[f"kv_held_{i}"] = metric_sum(port, "dynamo_lite_worker_kv_bytes_held")
            except OSError:
                row[f"kv_held_{i}"] = -1
        row.update(counts)
        series.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    await asyncio.gather(*clients)
    await asyncio.sleep(2.0)  # let cancellations and leases settle
    final = {}
    for i, port in enumerate(stack.worker_metrics):
        final[f"kv_held_{i}"] = metric_sum(port, "dynamo_lite_worker_kv_bytes_held")
        final[f"active_seqs_{i}"] = metric_sum(port, "dynamo_lite_worker_active_seqs")
    warm = [r for r in series if r["t"] >= args.warmup_s] or series
    growth = {}
    for name in pids:
        first, last = warm[0][f"rss_{name}"], series[-1][f"rss_{name}"]
        growth[name] = {
            "rss_after_warmup_mb": round(first / 2**20, 1),
            "rss_end_mb": round(last / 2**20, 1),
            "growth_pct": round(100 * (last - first) / first, 2) if first else None,
        }
    errors = {k: v for k, v in counts.items() if k not in ("completed", "cancelled")}
    return {
        "minutes": args.minutes,
        "engine": args.engine,
        "counts": dict(counts),
        "errors": errors,
        "error_samples": samples[:10],
        "rss": growth,
        "final": final,
        "series": series,
    }


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--engine", default="torch", choices=["torch", "mocker"])
    p.add_argument("--speedup-ratio", type=float, default=1.0)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--cancel-fraction", type=float, default=0.4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pid", type=int, action="append", default=[], help="extra PIDs to watch")
    p.add_argument("--output", default="", help="write the JSON report here")
    args = p.parse_args()
    stack = start_stack(args)
    try:
        report = asyncio.run(soak(args, stack))
    finally:
        stack.stop()
    summary = {k: v for k, v in report.items() if k != "series"}
    print(json.dumps(summary, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    bad = report["errors"] or any(v for k, v in report["final"].items())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

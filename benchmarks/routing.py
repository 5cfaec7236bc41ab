"""Routing benchmark: KV-aware vs round-robin on multi-turn chat, least-loaded vs round-robin with a slow worker.

Starts etcd, nats-server, 2 aggregated mocker workers (prefix caching simulated, KV events published over NATS)
and a frontend per router mode, all on loopback, and drives them with a multi-turn chat workload: conversations
that resend their growing history each turn. Prints TTFT (mean/p50/p99), request throughput and the prompt
tokens served from cache (usage.prompt_tokens_details.cached_tokens) per mode.

    python -m benchmarks.routing                      # both experiments
    python -m benchmarks.routing --experiment kv      # multi-turn: kv vs round-robin
    python -m benchmarks.routing --experiment slow    # one worker 3x slower, open loop: least-loaded vs round-robin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass

import httpx
import yaml

from benchmarks.local_stack import LocalStack, free_port, wait_for


@dataclass
class Cluster(LocalStack):
    """etcd + nats-server + workers + frontend, all ours, stopped by PID."""

    url: str = ""


def start_cluster(mode: str, worker_configs: list[dict], model: str) -> Cluster:
    c = Cluster()
    rt = ["--namespace", "routing", *c.start_services(), "--log-level", "WARNING"]
    for i, cfg in enumerate(worker_configs):
        path = os.path.join(c.tmp, f"worker{i}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        c.spawn(
            f"worker{i}",
            [
                sys.executable,
                "-m",
                "dynamo_lite.worker",
                "--mode",
                "agg",
                "--engine",
                "mocker",
                "--served-model-name",
                model,
                "--extra-engine-args",
                path,
                "--kv-block-size",
                "32",
                "--stream-interval-ms",
                "5",
                *rt,
            ],
        )
    http = free_port()
    c.spawn(
        "frontend",
        [
            sys.executable,
            "-m",
            "dynamo_lite.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http),
            "--router-mode",
            mode,
            "--kv-block-size",
            "32",
            *rt,
        ],
    )
    c.url = f"http://127.0.0.1:{http}"

    def ready() -> bool:
        health = json.loads(urllib.request.urlopen(c.url + "/health", timeout=1).read())
        return len(health["instances"]["agg"]) == len(worker_configs)

    wait_for(ready, 60, "workers registered")
    return c


async def chat(
    client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int
) -> dict:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft = None
    text = []
    usage = {}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(event["choices"][0]["delta"]["content"])
            if event.get("usage"):
                usage = event["usage"]
    return {"ttft": ttft or 0.0, "e2e": time.perf_counter() - t0, "text": "".join(text), "usage": usage}


def words(rng: random.Random, n: int) -> str:
    vocab = [
        "cache",
        "prefill",
        "decode",
        "token",
        "router",
        "worker",
        "latency",
        "stream",
        "batch",
        "kernel",
        "tensor",
        "memory",
        "network",
        "request",
        "block",
        "hash",
        "model",
        "layer",
        "head",
        "queue",
    ]
    return " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(n))


async def multi_turn(
    url: str, model: str, conversations: int, turns: int, think_s: float, seed: int
) -> list[dict]:
    """Every conversation sends ``turns`` requests, each with the whole history so far, a user's think time
    (exponential, mean ``think_s``) apart — the offered load is the same whatever the router does."""
    results: list[dict] = []

    async def conversation(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        history = [{"role": "system", "content": f"You are assistant {i}. " + words(rng, 150)}]
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.sleep(rng.uniform(0, think_s))
            for turn in range(turns):
                if turn:
                    await asyncio.sleep(rng.expovariate(1 / think_s))
                history.append({"role": "user", "content": words(rng, 60)})
                out = await chat(client, url, model, history, 24)
                out["turn"] = turn
                results.append(out)
                history.append({"role": "assistant", "content": out["text"]})

    await asyncio.gather(*(conversation(i) for i in range(conversations)))
    return results


async def single_turn(url: str, model: str, concurrency: int, count: int, seed: int) -> list[dict]:
    results: list[dict] = []
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": words(rng, 300)}] for _ in range(count)]
    queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)

    async def loop() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            while not queue.empty():
                results.append(await chat(client, url, model, queue.get_nowait(), 32))

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return results


async def open_loop(url: str, model: str, rate: float, count: int, seed: int) -> list[dict]:
    """Poisson arrivals at ``rate`` requests/s, whatever the servers' state (the same offered load per mode)."""
    rng = random.Random(seed)
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=1000)) as client:
        tasks = []
        for _ in range(count):
            messages = [{"role": "user", "content": words(rng, 300)}]
            tasks.append(asyncio.create_task(chat(client, url, model, messages, 32)))
            await asyncio.sleep(rng.expovariate(rate))
        results.extend(await asyncio.gather(*tasks))
    return results


def summarize(results: list[dict], seconds: float) -> dict:
    ttfts = sorted(r["ttft"] * 1000 for r in results)
    prompt = sum(r["usage"].get("prompt_tokens", 0) for r in results)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) for r in results)
    return {
        "requests": len(results),
        "req_per_s": round(len(results) / seconds, 2),
        "output_tok_per_s": round(sum(r["usage"].get("completion_tokens", 0) for r in results) / seconds, 1),
        "ttft_mean_ms": round(statistics.fmean(ttfts), 1),
        "ttft_p50_ms": round(ttfts[len(ttfts) // 2], 1),
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))], 1),
        "cached_prompt_fraction": round(cached / prompt, 3) if prompt else 0.0,
    }


# Simulated engine: prefill is the expensive part (0.4 ms per uncached prompt token), so cache hits matter; the
# cache holds 520 blocks of 32 tokens per worker: enough for half of the conversations' histories, not all.
MULTI_TURN_WORKER = {
    "prefill_per_token_s": 0.0004,
    "decode_base_s": 0.004,
    "num_cache_blocks": 520,
    "speedup_ratio": 1.0,
    "max_batch_size": 64,
}
SLOW_WORKERS = [
    {"prefill_per_token_s": 0.0001, "decode_base_s": 0.004, "speedup_ratio": 1.0},
    {"prefill_per_token_s": 0.0001, "decode_base_s": 0.004, "speedup_ratio": 1 / 3},
]


def run_experiment(name: str, modes: list[str], workers: list[dict], workload, model: str) -> dict:  # noqa: ANN001
    out = {}
    for mode in modes:
        cluster = start_cluster(mode, workers, model)
        try:
            asyncio.run(single_turn(cluster.url, model, 2, 4, seed=99))  # warm-up (tokenizer, connections)
            t0 = time.perf_counter()
            results = asyncio.run(workload(cluster.url))
            out[mode] = summarize(results, time.perf_counter() - t0)
        finally:
            cluster.stop()
        print(f"{name:10s} {mode:13s} {json.dumps(out[mode])}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", choices=["kv", "slow", "all"], default="all")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--think-s", type=float, default=4.0, help="multi-turn: mean pause between a user's turns")
    p.add_argument("--rate", type=float, default=8.0, help="slow experiment: offered requests/s (Poisson)")
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--model", default="smol-mock")
    p.add_argument("--output", default="")
    args = p.parse_args()
    report = {}
    if args.experiment in ("kv", "all"):
        report["multi_turn"] = run_experiment(
            "multi-turn",
            ["round-robin", "kv"],
            [MULTI_TURN_WORKER, MULTI_TURN_WORKER],
            lambda url: multi_turn(url, args.model, args.conversations, args.turns, args.think_s, seed=1),
            args.model,
        )
        rr, kv = report["multi_turn"]["round-robin"], report["multi_turn"]["kv"]
        print(
            f"kv vs round-robin: mean TTFT {rr['ttft_mean_ms'] / kv['ttft_mean_ms']:.2f}x lower, "
            f"throughput {kv['req_per_s'] / rr['req_per_s']:.2f}x"
        )
    if args.experiment in ("slow", "all"):
        report["slow_worker"] = run_experiment(
            "slow",
            ["round-robin", "least-loaded"],
            SLOW_WORKERS,
            lambda url: open_loop(url, args.model, args.rate, args.requests, seed=2),
            args.model,
        )
        rr, ll = report["slow_worker"]["round-robin"], report["slow_worker"]["least-loaded"]
        print(
            f"least-loaded vs round-robin (one worker 3x slower): p99 TTFT {rr['ttft_p99_ms']:.0f} -> "
            f"{ll['ttft_p99_ms']:.0f} ms, throughput {ll['req_per_s'] / rr['req_per_s']:.2f}x"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A burst of requests within one second at one busy worker, straight over the NATS request plane (issue 20):
how long the worker takes to acknowledge each request, and whether any is taken for lost.

Starts etcd, nats-server and one mocker worker (agg, zero time, default ``--max-inflight``) on loopback, keeps
``--busy`` streams of ``--output-tokens`` running on it, then sends ``--requests`` more, spread evenly over
``--window`` seconds, each with a ``--input-tokens`` prompt; every burst stream is read up to its first token
(to its end with ``--read-all``, the load of a frontend). Prints the acknowledgement latency (publish → ACK,
BUSY or a first frame seen; a worker holds its ACK up to ``Timeouts.ack_delay_s``) and how the burst's requests
ended::

    python -m benchmarks.ack_burst --requests 2048 --busy 512
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from contextlib import aclosing

from benchmarks.local_stack import LocalStack, wait_for
from dynamo_lite.protocol import GenerateRequest, InstanceBusy, Phase, SamplingOptions, StreamError, encode
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def burst(flags: list[str], args: argparse.Namespace) -> dict[str, int]:
    settings = RuntimeSettings(etcd_endpoints=flags[1], nats_url=flags[3], namespace="ackburst")
    runtime = await Runtime.connect(settings, name="ack-burst")
    view = LiveView(runtime)
    await view.start()
    plane = runtime.request_plane
    acks: list[float] = []
    plane.on_ack = lambda address, seconds: acks.append(seconds)  # type: ignore[attr-defined]
    try:
        async with asyncio.timeout(60):
            while not view.instances_of("agg"):  # noqa: ASYNC110 — discovery has no "ready" event to await
                await asyncio.sleep(0.1)
        address = view.instances_of("agg")[0].address
        rng = random.Random(0)

        def request(i: int, max_tokens: int) -> bytes:
            prompt = [rng.randrange(300, 40000) for _ in range(args.input_tokens)]
            sampling = SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
            return encode(GenerateRequest(f"r{i}", "m", prompt, sampling, Phase.AGGREGATED))

        async def hold(payload: bytes, started: asyncio.Event) -> None:
            async with aclosing(plane.stream(address, payload, first_timeout=300.0)) as stream:
                async for _ in stream:
                    started.set()

        held = []
        for i in range(args.busy):
            started = asyncio.Event()
            held.append((asyncio.create_task(hold(request(i, args.output_tokens), started)), started))
        await asyncio.wait_for(asyncio.gather(*(s.wait() for _, s in held)), 120)
        acks.clear()
        print(
            f"worker busy with {args.busy} streams; sending {args.requests} in {args.window:g} s", flush=True
        )

        outcomes: dict[str, int] = {}

        async def one(i: int, delay: float, payload: bytes) -> None:
            await asyncio.sleep(delay)
            try:
                async with aclosing(plane.stream(address, payload, first_timeout=300.0)) as stream:
                    await stream.__anext__()
                    if args.read_all:
                        async for _ in stream:
                            pass
                kind = "completed" if args.read_all else "first token"
            except InstanceBusy:
                kind = "refused at capacity (InstanceBusy)"
            except StreamError as e:
                kind = f"{e.info.code}: {e.info.message}"
            outcomes[kind] = outcomes.get(kind, 0) + 1

        payloads = [request(args.busy + i, args.output_tokens) for i in range(args.requests)]
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, args.window * i / args.requests, p) for i, p in enumerate(payloads)))
        print(f"burst answered in {time.monotonic() - t0:.1f} s", flush=True)
        for task, _ in held:
            task.cancel()
        await asyncio.gather(*(t for t, _ in held), return_exceptions=True)
        ms = [a * 1000 for a in acks]
        print(
            f"acknowledgement latency (ms), {len(ms)} requests: p50 {percentile(ms, 0.5):.0f}  "
            f"p90 {percentile(ms, 0.9):.0f}  p99 {percentile(ms, 0.99):.0f}  max {max(ms):.0f}"
        )
        for kind, n in sorted(outcomes.items()):
            print(f"  {n:5d}  {kind}")
        return outcomes
    finally:
        await view.stop()
        await runtime.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ack_burst", description=__doc__)
    p.add_argument("--requests", type=int, default=2048)
    p.add_argument("--window", type=float, default=1.0, help="seconds the burst is spread over")
    p.add_argument("--busy", type=int, default=512, help="streams the worker is busy with before the burst")
    p.add_argument("--input-tokens", type=int, default=1000)
    p.add_argument("--output-tokens", type=int, default=2000)
    p.add_argument("--speedup-ratio", type=float, default=0.0, help="the mocker's (0: zero time)")
    p.add_argument(
        "--read-all", action="store_true", help="read every burst stream to its end (a frontend's load)"
    )
    args = p.parse_args(argv)
    stack = LocalStack()
    try:
        flags = stack.start_services()
        stack.spawn(
            "worker",
            [sys.executable, "-m", "dynamo_lite.worker", "--mode", "agg", "--engine", "mocker"]
            + ["--speedup-ratio", str(args.speedup_ratio), "--namespace", "ackburst", *flags],
        )
        log = f"{stack.tmp}/worker.log"
        wait_for(lambda: "READY" in open(log).read(), 60, "worker ready")
        outcomes = asyncio.run(burst(flags, args))
    finally:
        stack.stop()
    lost = sum(n for kind, n in outcomes.items() if kind.startswith("instance_unavailable"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

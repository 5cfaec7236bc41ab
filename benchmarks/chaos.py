"""Chaos under streaming load: workers, NATS and etcd killed -9 and restarted while a frontend serves.

    python -m benchmarks.chaos                        # 10 min, c=256, single NATS server
    python -m benchmarks.chaos --nats-nodes 3         # the same on a 3-node NATS cluster (a node lost, restarted)
    python -m benchmarks.chaos --ci                   # 60 s, c=32: 2 worker kills, 1 NATS restart; exit 1 on a loss
    python -m benchmarks.chaos --engine torch --concurrency 8 --duration-s 300 --settle-s 60   # real KV handoffs
    python -m benchmarks.chaos --migration-limit 0    # failures expected; exit 1 on one that is not clean

Everything on loopback, on free ports, in a temporary folder: etcd, NATS (one server or a cluster), a frontend
(``--migration-limit``), 2 prefill + 2 decode workers: mocker (``--speedup-ratio``: small simulated delays), or
the torch engine (SmolLM2 on CPU), whose prefill workers hold real KV for the decode workers to pull.
Closed-loop streaming chats (``ignore_eos``, a fixed ``max_tokens``) at ``--concurrency``. Every
``--worker-every-s`` a random worker is killed -9 and started again; every ``--nats-every-s`` a NATS server
(with a cluster: one node) is killed -9 and started again on its port ``--nats-down-s`` later; once, at
``--etcd-at-s``, etcd likewise. Every process started is stopped by its PID at the end.

Reported (JSON on stdout, and ``--json FILE``): requests ok / failed (with why) / short (fewer tokens than asked),
migrated and re-placed (the frontend's log lines), TTFT and ITL p99 per phase (the 10 s after each kind of
event, and steady state), KV bytes prefill workers still hold at the end, frontend RSS after warm-up and at the
end. A request counts ok only if its stream ended with ``[DONE]``, no error event, and exactly ``max_tokens``
tokens. With ``--migration-limit 0`` requests do fail; a failure counts clean if it was an HTTP status or an
SSE error event followed by ``[DONE]`` (``unclean`` counts the others: hangs, cut streams, short streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
MODEL = "chaos-mock"
PHASE_S = 10.0  # how long after an event its requests count in that event's phase
RSS_EVERY_S = 30.0  # frontend RSS sampling period


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A child process, started with a log file, stopped by its PID."""

    name: str
    cmd: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    port: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
            self.popen = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)
            self.popen.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


class Cluster:
    """etcd, NATS (``nodes`` servers routed into one cluster), workers and a frontend."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args = tmp, args
        self.procs: list[Proc] = []

    def start(self) -> None:
        args = self.args
        self.etcd = self._etcd()
        self.nats = self._nats(args.nats_nodes)
        self.nats_url = ",".join(f"nats://127.0.0.1:{n.port}" for n in self.nats)
        self.namespace = f"chaos{os.getpid()}"
        self.workers = [
            self._worker(mode, i) for i, mode in enumerate(["prefill", "prefill", "decode", "decode"])
        ]
        self.frontend = self._frontend()

    def _own(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def _etcd(self) -> Proc:
        port, peer = free_port(), free_port()
        data = self.tmp / "etcd-data"
        cmd = [shutil.which("etcd") or "etcd", "--name", "chaos", "--data-dir", str(data)]
        cmd += [
            "--listen-client-urls",
            f"http://127.0.0.1:{port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{port}",
        ]
        cmd += [
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
        ]
        cmd += ["--initial-cluster", f"chaos=http://127.0.0.1:{peer}"]
        proc = self._own(Proc("etcd", cmd, self.tmp / "etcd.log", port=port)).start()
        self.wait_etcd(proc)
        return proc

    def wait_etcd(self, proc: Proc) -> None:
        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/health", timeout=0.5) as r:
                return b"true" in r.read()

        wait_for(healthy, 20, "etcd healthy")

    def _nats(self, nodes: int) -> list[Proc]:
        routes = [free_port() for _ in range(nodes)]
        procs = []
        for i, route in enumerate(routes):
            port = free_port()
            cmd = [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(port)]
            if nodes > 1:
                others = ",".join(f"nats://127.0.0.1:{r}" for r in routes if r != route)
                cmd += [
                    "--cluster_name",
                    "chaos",
                    "--cluster",
                    f"nats://127.0.0.1:{route}",
                    "--routes",
                    others,
                ]
            procs.append(self._own(Proc(f"nats{i}", cmd, self.tmp / f"nats{i}.log", port=port)).start())
        for proc in procs:
            wait_for(lambda proc=proc: listening(proc.port), 10, f"{proc.name} listening")
        return procs

    def runtime_args(self) -> list[str]:
        return [
            "--namespace",
            self.namespace,
            "--etcd-endpoints",
            f"127.0.0.1:{self.etcd.port}",
            "--nats-url",
            self.nats_url,
        ]

    def _worker(self, mode: str, i: int) -> Proc:
        engine = self.args.engine
        cmd = [sys.executable, "-m", "dynamo_lite.worker", "--mode", mode, "--engine", engine]
        cmd += ["--metrics-port", "0", "--served-model-name", MODEL, "--lease-ttl", "2"]
        if engine == "mocker":
            cmd += ["--speedup-ratio", str(self.args.speedup_ratio)]
        proc = self._own(Proc(f"{mode}{i}", [*cmd, *self.runtime_args()], self.tmp / f"{mode}{i}.log"))
        return self.start_worker(proc)

    def start_worker(self, proc: Proc) -> Proc:
        seen = proc.text().count("READY worker")
        proc.start()
        wait_for(lambda: proc.text().count("READY worker") > seen, 180, f"{proc.name} ready")
        line = [ln for ln in proc.text().splitlines() if ln.startswith("READY worker")][-1]
        proc.port = int(dict(p.split("=", 1) for p in line.split()[3:])["metrics_port"])
        return proc

    def _frontend(self) -> Proc:
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "dynamo_lite.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
        ]
        cmd += ["--migration-limit", str(self.args.migration_limit), *self.runtime_args()]
        proc = self._own(Proc("frontend", cmd, self.tmp / "frontend.log", port=port)).start()

        def ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                health = json.load(r)
            return (
                len(health["instances"].get("decode", [])) == 2
                and len(health["instances"].get("prefill", [])) == 2
            )

        wait_for(ready, 60, "frontend sees every worker")
        return proc

    def restart(self, proc: Proc, down_s: float) -> None:
        """kill -9 ``proc``, start it again ``down_s`` later on the same ports (a worker: a new instance)."""
        proc.kill()
        time.sleep(down_s)
        if proc in self.workers:
            self.start_worker(proc)
        else:
            proc.start()
            if proc is self.etcd:
                self.wait_etcd(proc)
            else:
                wait_for(lambda: listening(proc.port), 10, f"{proc.name} listening")

    def kv_bytes_held(self) -> float:
        total = 0.0
        for w in self.workers:
            with urllib.request.urlopen(f"http://127.0.0.1:{w.port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("dynamo_lite_worker_kv_bytes_held{"):
                        total += float(line.rsplit(" ", 1)[1])
        return total

    def frontend_rss_mb(self) -> float:
        assert self.frontend.popen is not None
        for line in Path(f"/proc/{self.frontend.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


@dataclass
class Outcome:
    started: float
    ok: bool
    why: str = ""
    ttft_s: float = 0.0
    itl_s: float = 0.0
    took_s: float = 0.0


# Failures a client can act on: an HTTP status before the stream, or an SSE error event and ``[DONE]``. Anything
# else (a hang, a stream cut without an error event, fewer tokens than asked with no error) is unclean.
CLEAN = ("http_", "stream_error")


async def chat(client: httpx.AsyncClient, url: str, max_tokens: int) -> Outcome:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "chaos"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    t0 = time.monotonic()
    outcome = await _chat(client, url, body, max_tokens, t0)
    outcome.took_s = time.monotonic() - t0
    return outcome


async def _chat(client: httpx.AsyncClient, url: str, body: dict, max_tokens: int, t0: float) -> Outcome:
    first = tokens = 0.0
    done, error = False, ""
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Outcome(t0, False, f"http_{r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = orjson.loads(line[6:])
                if "error" in event:
                    error = str(event["error"].get("code"))
                elif event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event.get("choices") and not first:
                    first = time.monotonic()
    except (httpx.HTTPError, OSError) as e:
        return Outcome(t0, False, type(e).__name__)
    end = time.monotonic()
    if error:  # clean only if the stream still ended with [DONE] after the error event
        return Outcome(
            t0, False, f"stream_error: {error}" if done else f"error event without [DONE]: {error}"
        )
    if not done:
        return Outcome(t0, False, "no [DONE]")
    if tokens != max_tokens:
        return Outcome(t0, False, f"short: {tokens} of {max_tokens} tokens")
    ttft = first - t0 if first else end - t0
    return Outcome(t0, True, ttft_s=ttft, itl_s=(end - t0 - ttft) / max(1, max_tokens - 1))


async def load(url: str, args: argparse.Namespace, until: float, outcomes: list[Outcome]) -> None:
    async def client_loop() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout_s)) as client:
            while time.monotonic() < until:
                try:
                    outcome = await asyncio.wait_for(
                        chat(client, url, args.output_tokens), args.request_timeout_s
                    )
                except TimeoutError:  # a hang is a failure too
                    started = time.monotonic() - args.request_timeout_s
                    outcome = Outcome(started, False, "timeout", took_s=args.request_timeout_s)
                outcomes.append(outcome)

    await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))


async def chaos(cluster: Cluster, args: argparse.Namespace, start: float, until: float, events: list) -> None:
    """The schedule: worker kills, NATS restarts, one etcd restart, each logged in ``events``."""
    rng = random.Random(args.seed)
    plan: list[tuple[float, str]] = []
    plan += [(t, "worker") for t in _times(args.worker_every_s, args.duration_s)]
    plan += [
        (t, "nats") for t in _times(args.nats_every_s, args.duration_s, offset=args.nats_every_s / 2 + 5)
    ]
    if 0 <= args.etcd_at_s < args.duration_s:
        plan.append((args.etcd_at_s, "etcd"))
    for at, kind in sorted(plan):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        if time.monotonic() >= until:
            break
        if kind == "worker":
            victim = rng.choice(cluster.workers)
            down_s = 0.0
        elif kind == "nats":
            victim, down_s = rng.choice(cluster.nats), args.nats_down_s
        else:
            victim, down_s = cluster.etcd, 1.0
        t = time.monotonic() - start
        await asyncio.to_thread(cluster.restart, victim, down_s)
        events.append(
            {
                "at_s": round(t, 1),
                "kind": kind,
                "process": victim.name,
                "back_after_s": round(time.monotonic() - start - t, 1),
            }
        )


def _times(every_s: float, duration_s: float, offset: float | None = None) -> list[float]:
    if every_s <= 0:
        return []
    first = every_s if offset is None else offset
    return [
        first + i * every_s
        for i in range(int((duration_s - first) // every_s) + 1)
        if first + i * every_s < duration_s - 5
    ]


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(0.99 * len(values)))] * 1000, 1)


def report(
    cluster: Cluster, args: argparse.Namespace, start: float, outcomes: list[Outcome], events: list, rss: dict
) -> dict:
    def phase(o: Outcome) -> str:
        at = o.started - start
        hits = [e["kind"] for e in events if e["at_s"] <= at <= e["at_s"] + e["back_after_s"] + PHASE_S]
        return hits[-1] if hits else "steady"

    phases: dict[str, list[Outcome]] = {}
    for o in outcomes:
        phases.setdefault(phase(o), []).append(o)
    failed: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            failed[o.why.split(":")[0]] = failed.get(o.why.split(":")[0], 0) + 1
    unclean = [o for o in outcomes if not o.ok and not o.why.startswith(CLEAN)]
    log = cluster.frontend.text()
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "requests": {
            "ok": sum(o.ok for o in outcomes),
            "failed": sum(not o.ok for o in outcomes),
            "failed_by": failed,
            "unclean": len(unclean),  # failures that were not an HTTP status or an SSE error event
            "longest_s": round(max((o.took_s for o in outcomes), default=0.0), 1),
        },
        "migrated": log.count("migrating with"),
        "replaced_after_request_plane_failure": log.count("placing it again"),
        "events": events,
        "phases": {
            name: {
                "requests": len(group),
                "failed": sum(not o.ok for o in group),
                "ttft_p99_ms": p99([o.ttft_s for o in group if o.ok]),
                "itl_p99_ms": p99([o.itl_s for o in group if o.ok]),
            }
            for name, group in sorted(phases.items())
        },
        "kv_bytes_held_at_end": cluster.kv_bytes_held(),
        "frontend_rss_mb": rss,
        "failures_sample": [o.why for o in unclean][:10] or [o.why for o in outcomes if not o.ok][:10],
    }


async def run(cluster: Cluster, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{cluster.frontend.port}/v1/chat/completions"
    outcomes: list[Outcome] = []
    events: list[dict] = []
    start = time.monotonic()
    until = start + args.duration_s
    loader = asyncio.create_task(load(url, args, until, outcomes))
    chaos_task = asyncio.create_task(chaos(cluster, args, start, until, events))
    samples: list[tuple[float, float]] = []  # (s since start, MB): does it plateau, or keep growing?

    async def sample_rss() -> None:
        while True:
            samples.append((round(time.monotonic() - start), round(cluster.frontend_rss_mb(), 1)))
            await asyncio.sleep(RSS_EVERY_S)

    sampler = asyncio.create_task(sample_rss())
    await asyncio.sleep(min(args.warmup_s, args.duration_s))
    rss: dict[str, Any] = {"after_warmup": round(cluster.frontend_rss_mb(), 1)}
    await asyncio.gather(loader, chaos_task)
    await asyncio.sleep(args.settle_s)  # KV holds of abandoned transfers expire
    sampler.cancel()
    rss["end"] = round(cluster.frontend_rss_mb(), 1)
    rss["growth_pct"] = round(100 * (rss["end"] / rss["after_warmup"] - 1), 1)
    rss["samples"] = samples
    return report(cluster, args, start, outcomes, events, rss)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ci", action="store_true", help="60 s, c=32, 2 worker kills, 1 NATS restart; exit 1 on a loss"
    )
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--engine", choices=("mocker", "torch"), default="mocker")
    p.add_argument("--speedup-ratio", type=float, default=4.0, help="mocker: simulated time divided by this")
    p.add_argument("--migration-limit", type=int, default=3)
    p.add_argument("--nats-nodes", type=int, default=1, choices=(1, 3))
    p.add_argument("--worker-every-s", type=float, default=30.0)
    p.add_argument("--nats-every-s", type=float, default=120.0)
    p.add_argument("--nats-down-s", type=float, default=2.0)
    p.add_argument("--etcd-at-s", type=float, default=300.0, help="negative: never")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=26)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    if args.ci:  # two worker kills (20 s, 40 s) and one NATS restart (30 s) inside 60 s
        args.duration_s, args.concurrency, args.worker_every_s = 60.0, 32, 20.0
        args.nats_every_s, args.etcd_at_s, args.output_tokens = 50.0, -1.0, 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dl-chaos-"))
    cluster: Cluster | None = None

    def interrupted(signum: int, frame: Any) -> None:
        # Stop every child by its PID and leave at once: unwinding 256 streaming clients through asyncio's
        # cancellation can take minutes, and a benchmark stopped by hand must not leave servers behind.
        if cluster is not None:
            cluster.stop()
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupted)
    try:
        cluster = Cluster(tmp, args)
        cluster.start()
        result = asyncio.run(run(cluster, args))
    finally:
        if cluster is not None:
            cluster.stop()
    result["logs"] = str(tmp)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    # Migration off: failures are expected, but each must be clean (an HTTP status or an SSE error event).
    lost = result["requests"]["failed"] if args.migration_limit > 0 else result["requests"]["unclean"]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())

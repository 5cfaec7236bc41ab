"""Planner vs fixed pools on one load trace: goodput per worker-second.

Per configuration: etcd, nats-server and a frontend on loopback; mocker workers (real simulated time,
speedup 1) started and stopped by the planner's local connector, which also counts worker-seconds (each
process from spawn to exit: start-up and drain included). ``planner`` starts at its minimums and runs the
planner loop in this process; ``fixed-XpYd`` runs X prefill and Y decode workers throughout. Each replays the
same trace (``benchmarks/load_trace.py``, same seed). Goodput: requests that completed with TTFT and their mean
ITL within targets.

    python -m benchmarks.planner_compare --duration-s 150 --configs fixed-1p1d,planner --output out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

from benchmarks.load_trace import day_trace, replay
from benchmarks.local_stack import LocalStack, free_port, wait_for
from dynamo_lite.planner.connectors.local import LocalConnector
from dynamo_lite.planner.decide import DECODE, PREFILL, Planner, PlannerSettings
from dynamo_lite.planner.loop import PlannerLoop
from dynamo_lite.planner.predict import DEFAULT_SIGNIFICANCE, DEFAULT_WINDOW, LoadPredictor, Method
from dynamo_lite.planner.profile import mocker_profile

MODEL = "smol-mock"


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole box."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class BoxSampler:
    """The whole box's CPU busy fraction and load average, sampled every ``every_s`` on a thread: mean over the
    window and the busiest ``peak_window_s`` (other jobs on the box included)."""

    def __init__(self, every_s: float = 5.0, peak_window_s: float = 30.0) -> None:
        self.every_s, self.peak_window_s = every_s, peak_window_s
        # (t, box busy jiffies, box total jiffies, load1, this benchmark's processes' CPU seconds)
        self.samples: list[tuple[float, float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        busy, total = cpu_times()
        self.samples.append((time.monotonic(), busy, total, os.getloadavg()[0], own_cpu_s()))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __enter__(self) -> BoxSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def summary(self) -> dict:
        s = self.samples
        busy = (s[-1][1] - s[0][1]) / max(s[-1][2] - s[0][2], 1)
        k = max(1, round(self.peak_window_s / self.every_s))
        peak = max(
            ((s[i + k][1] - s[i][1]) / max(s[i + k][2] - s[i][2], 1) for i in range(len(s) - k)),
            default=busy,
        )
        loads = [x[3] for x in s[1:]] or [s[0][3]]
        cores = os.cpu_count() or 1
        own = (s[-1][4] - s[0][4]) / max(s[-1][0] - s[0][0], 1e-9) / cores
        own_peak = max(
            ((s[i + k][4] - s[i][4]) / max(s[i + k][0] - s[i][0], 1e-9) / cores for i in range(len(s) - k)),
            default=own,
        )
        return {
            "box_cpu_busy": busy,
            "box_cpu_busy_peak": peak,
            "stack_cpu_busy": own,  # this benchmark's processes over the trace, a fraction of all cores
            "stack_cpu_busy_peak": own_peak,
            "load_avg_mean": sum(loads) / len(loads),
            "load_avg_max": max(loads),
        }


def own_cpu_s() -> float:
    """CPU seconds of this process and its children (frontend, etcd, NATS, workers): those still running read
    from /proc, those already waited for from ``os.times()``."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # fields after the name: state, ppid, ..., utime (12), stime (13)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = re.search(r"flags\s*:\s*(.*)", info)
    return {
        "cpu": model.group(1) if model else "?",
        "cores": os.cpu_count(),
        "flags": flags.group(1) if flags else "",
    }


def run_config(name: str, args: argparse.Namespace, seed: int, tag: str = "") -> dict:
    started_wall = time.time()
    cpu_before = own_cpu_s()
    stack = LocalStack()
    runtime = stack.start_services()
    common = ["--engine", "mocker", "--served-model-name", MODEL, "--lease-ttl", "2", "--drain-timeout", "30"]
    common += ["--max-batch-size", str(args.max_batch_size), *runtime]
    workdir = Path(args.log_dir) / f"{tag}{name}"  # kept: worker logs and the planner's decisions
    conn = LocalConnector({PREFILL: common, DECODE: common}, workdir / "workers", kill_after_s=40)
    settings = PlannerSettings(
        ttft_s=args.ttft_ms / 1000,
        itl_s=args.itl_ms / 1000,
        max_prefill=3,
        max_decode=3,
        max_total=args.max_workers,
        interval_s=args.interval_s,
        cooldown_s=args.cooldown_s,
        down_stable_intervals=args.down_stable_intervals,
        up_stable_intervals=args.up_stable_intervals,
    )
    if name == "planner":
        start = (settings.min_prefill, settings.min_decode)
    else:
        m = re.fullmatch(r"fixed-(\d+)p(\d+)d", name)
        assert m, name
        start = (int(m.group(1)), int(m.group(2)))
    port = free_port()
    loop_thread, stop = None, threading.Event()
    decisions = workdir / "decisions.jsonl"
    try:
        conn.scale(PREFILL, start[0])
        conn.scale(DECODE, start[1])
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

        def registered() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                inst = json.load(r)["instances"]
            return len(inst.get(PREFILL, [])) == start[0] and len(inst.get(DECODE, [])) == start[1]

        wait_for(registered, 90, "workers registered")
        if name == "planner":
            loop = PlannerLoop(
                Planner(settings, mocker_profile(max_batch_size=args.max_batch_size)),
                LoadPredictor(args.window, method=Method(args.predictor), significance=args.significance),
                conn,
                f"http://127.0.0.1:{port}/metrics",
                decisions_log=decisions,
            )
            loop_thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
            loop_thread.start()
        trace = day_trace(
            args.duration_s, args.peak_rate, args.night_rate, (args.isl_short, args.isl_long), args.osl
        )
        with BoxSampler() as box:
            result = asyncio.run(
                replay(trace, f"http://127.0.0.1:{port}", MODEL, settings.ttft_s, settings.itl_s, seed=seed)
            )
    finally:
        stop.set()
        if loop_thread is not None:
            loop_thread.join(30)
        conn.close(timeout_s=40)
        stack.stop()
    worker_s = conn.worker_seconds()
    wall_s = time.time() - started_wall
    stack_cpu_s = own_cpu_s() - cpu_before
    s = result.summary()
    timeline = []
    if decisions.exists():
        for line in decisions.read_text().splitlines():
            d = json.loads(line)
            timeline.append((round(d["t"]), d[PREFILL]["target"], d[DECODE]["target"]))
    return {
        "config": name,
        **s,
        "worker_seconds": round(worker_s, 1),
        "goodput_per_worker_s": s["good"] / worker_s if worker_s else 0.0,
        **box.summary(),
        "stack_cpu_s": round(stack_cpu_s, 1),  # this benchmark's own processes, start to stop
        "stack_cpu_share": stack_cpu_s / wall_s / (os.cpu_count() or 1),
        "wall_s": round(wall_s, 1),
        "seed": seed,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "trace_s": round(result.duration_s, 1),
        "workers_started": len(conn.workers),
        "timeline": timeline,
        "failures": [asdict(r) for r in result.results if not r.complete],
        "logs": str(workdir),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.planner_compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--configs", default="fixed-1p1d,planner")
    p.add_argument("--duration-s", type=float, default=150.0)
    p.add_argument("--peak-rate", type=float, default=4.0)
    p.add_argument("--night-rate", type=float, default=0.3)
    p.add_argument("--isl-short", type=int, default=1000)
    p.add_argument("--isl-long", type=int, default=3000)
    p.add_argument("--osl", type=int, default=200)
    p.add_argument("--ttft-ms", type=float, default=1500)
    p.add_argument("--itl-ms", type=float, default=60)
    p.add_argument("--max-workers", type=int, default=4)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--interval-s", type=float, default=5.0)
    p.add_argument("--cooldown-s", type=float, default=30.0)
    p.add_argument("--down-stable-intervals", type=int, default=3)
    p.add_argument("--up-stable-intervals", type=int, default=PlannerSettings().up_stable_intervals)
    p.add_argument("--predictor", default="trend")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="intervals the predictor reads")
    p.add_argument(
        "--significance",
        type=float,
        default=DEFAULT_SIGNIFICANCE,
        help="trend: standard errors its slope is shrunk by",
    )
    p.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--resume", action="store_true", help="keep the runs already in --output, run the rest")
    p.add_argument("--output", default=None)
    p.add_argument(
        "--log-dir", default=None, help="worker logs and decisions per config (default: a temp dir)"
    )
    args = p.parse_args(argv)
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="dl-planner-compare-")
    out = {"machine": machine(), "args": vars(args), "runs": []}
    if args.resume and args.output and Path(args.output).exists():
        out["runs"] = json.loads(Path(args.output).read_text())["runs"]  # finished runs are kept
    done = {(r.get("round", 0), r["config"]) for r in out["runs"]}
    print(f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores", flush=True)
    print(f"cpu flags: {out['machine']['flags']}", flush=True)
    configs = args.configs.split(",")
    for rnd in range(args.rounds):
        # a round: every configuration on the same trace and seed; the order alternates between rounds
        order = configs if rnd % 2 == 0 else configs[::-1]
        for name in order:
            if (rnd, name) in done:
                continue
            started = time.monotonic()
            run = run_config(name, args, seed=args.seed + rnd, tag=f"r{rnd}-")
            run["round"] = rnd
            out["runs"].append(run)
            if args.output:
                Path(args.output).write_text(json.dumps(out, indent=1))
            show = {k: v for k, v in run.items() if k not in ("timeline", "failures")}
            print(json.dumps(show), f"({time.monotonic() - started:.0f}s)", flush=True)
            if run["timeline"]:
                print("timeline (t, prefill, decode):", run["timeline"], flush=True)
            for failure in run["failures"]:
                print("failed:", failure, flush=True)
    print(f"{'round':>5} {'config':<12} {'requests':>8} {'failed':>6} {'good':>5} {'TTFT p90':>9} {'ITL p90':>8} "
          f"{'worker-s':>9} {'good/worker-s':>13} {'CPU':>5} {'peak':>5} {'load':>5}")  # fmt: skip
    for r in out["runs"]:
        ttft = f"{r['ttft_p90_s'] * 1000:.0f} ms" if r["ttft_p90_s"] is not None else "-"
        itl = f"{r['itl_p90_s'] * 1000:.0f} ms" if r["itl_p90_s"] is not None else "-"
        print(
            f"{r.get('round', 0):>5} {r['config']:<12} {r['requests']:>8} {r['failed']:>6} {r['good']:>5} "
            f"{ttft:>9} {itl:>8} "
            f"{r['worker_seconds']:>9.0f} {r['goodput_per_worker_s']:>13.3f} {r['box_cpu_busy']:>5.0%} "
            f"{r.get('box_cpu_busy_peak', 0):>5.0%} {r.get('load_avg_mean', 0):>5.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

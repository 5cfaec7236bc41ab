"""KV handoff between two real processes: time and GB/s over shared memory and TCP, next to memcpy.

The exporter (prefill side) runs in a child process (``python -m dynamo_lite.kv.selftest export``) and fills
each hold with SmolLM2-135M-shaped fp32 KV (30 layers x 2 x 3 heads x 64 dim, 2048 tokens = 94 MB by default).
This process is the importer (decode side). One handoff, as the decode worker sees it, is:

    pull_kv(descriptor)  ->  copy into a preallocated KV cache  ->  close()  (the exporter frees its copy)

Run: ``python benchmarks/kv_handoff.py [--tokens 2048] [--iters 10] [--uvloop] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynamo_lite.kv import checksum as ck  # noqa: E402
from dynamo_lite.kv.config import KvTransferConfig  # noqa: E402
from dynamo_lite.kv.importer import pull_kv  # noqa: E402
from dynamo_lite.kv.layout import KvLayout  # noqa: E402
from dynamo_lite.kv.selftest import pattern  # noqa: E402
from dynamo_lite.protocol import KvDescriptor  # noqa: E402

SEED = 11
WIDTHS = (22, 9, 9, 9, 10, 16, 7)


class ExporterProcess:
    def __init__(self, layout: KvLayout, *extra: str) -> None:
        shape = ["--layers", str(layout.num_layers), "--heads", str(layout.num_kv_heads), "--dim"]
        shape += [str(layout.head_dim), "--dtype", layout.dtype, "--tokens", str(layout.num_tokens)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_lite.kv.selftest", "export", "--count", "0", "--seed", str(SEED)]
            + shape
            + list(extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            },
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()

    def command(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.lines.get(timeout=30)

    def publish(self) -> KvDescriptor:
        return msgspec.json.decode(self.command("publish"), type=KvDescriptor)

    def close(self) -> dict:
        deadline = time.monotonic() + 5.0  # the last "done" may still be on its way to the exporter
        while (stats := json.loads(self.command("stats")))["held_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        self.proc.stdin.close()
        self.proc.wait(30)
        return stats


async def handoffs(layout: KvLayout, iters: int, use_shm: bool, socket_buffer: int) -> dict:
    extra = ["--socket-buffer", str(socket_buffer)] + ([] if use_shm else ["--no-shm"])
    child = ExporterProcess(layout, *extra)
    config = KvTransferConfig(use_shm=use_shm, socket_buffer_bytes=socket_buffer)
    cache = np.ones(layout.nbytes, np.uint8)  # the decode engine's KV cache: allocated and touched once
    pulls, copies, closes, totals = [], [], [], []
    try:
        for i in range(iters + 1):
            desc = child.publish()
            t0 = time.perf_counter()
            pulled = await pull_kv(desc, config)
            t1 = time.perf_counter()
            pulled.copy_into(cache)
            t2 = time.perf_counter()
            pulled.close()
            t3 = time.perf_counter()
            assert pulled.transport == ("shm" if use_shm else "tcp")
            if i == 0:  # warm-up, and the one round whose bytes we check
                assert np.array_equal(cache, pattern(layout.nbytes, SEED)), "bytes differ"
                continue
            pulls.append(t1 - t0)
            copies.append(t2 - t1)
            closes.append(t3 - t2)
            totals.append(t3 - t0)
    finally:
        stats = child.close()
    assert stats["held_bytes"] == 0, stats
    return {"pull": pulls, "copy": copies, "close": closes, "total": totals}


def memcpy_seconds(nbytes: int, iters: int) -> list[float]:
    src = pattern(nbytes, SEED).copy()
    dst = np.ones(nbytes, np.uint8)
    out = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        out.append(time.perf_counter() - t0)
    return out[1:]


def checksum_seconds(nbytes: int, iters: int) -> dict[str, float]:
    data = pattern(nbytes, SEED)
    out = {}
    for algo in ck.ALGORITHMS:
        times = []
        for _ in range(min(iters, 5)):
            t0 = time.perf_counter()
            ck.checksum(data, algo)
            times.append(time.perf_counter() - t0)
        out[algo] = statistics.median(times)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--socket-buffer", type=int, default=KvTransferConfig().socket_buffer_bytes)
    p.add_argument("--uvloop", action="store_true", help="run the importer on uvloop")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    layout = KvLayout(30, 3, 64, args.dtype, args.tokens)
    n = layout.nbytes
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run

    results = {
        "shm": run(handoffs(layout, args.iters, True, args.socket_buffer)),
        "tcp": run(handoffs(layout, args.iters, False, args.socket_buffer)),
    }
    memcpy = memcpy_seconds(n, args.iters)
    sums = checksum_seconds(n, args.iters)
    med = statistics.median
    report = {
        "layout": list(layout.shape),
        "dtype": layout.dtype,
        "nbytes": n,
        "iters": args.iters,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loop": "uvloop" if args.uvloop else "asyncio",
        "checksum": ck.SUPPORTED[0],
        "shm_verified": ck.FAST,  # KvTransferConfig.verify_shm=None: checksum shm only with xxhash
        "memcpy_ms": med(memcpy) * 1e3,
        "memcpy_gb_s": n / med(memcpy) / 1e9,
        "checksum_ms": {k: v * 1e3 for k, v in sums.items()},
    }
    for name, r in results.items():
        report[name] = {
            "pull_ms": med(r["pull"]) * 1e3,
            "copy_ms": med(r["copy"]) * 1e3,
            "close_ms": med(r["close"]) * 1e3,
            "handoff_ms": med(r["total"]) * 1e3,
            "handoff_min_ms": min(r["total"]) * 1e3,
            "handoff_max_ms": max(r["total"]) * 1e3,
            "gb_s": n / med(r["total"]) / 1e9,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"KV handoff, {n / 1e6:.1f} MB ({layout.dtype} {'x'.join(map(str, layout.shape))}), "
        f"{args.iters} runs, medians; {report['cpus']} CPUs, Python {report['python']}, {report['loop']}"
    )
    head = ("path", "pull ms", "copy ms", "close ms", "total ms", "min..max ms", "GB/s")
    print(
        "".join(f"{h:{'<' if i == 0 else '>'}{w}}" for i, (h, w) in enumerate(zip(head, WIDTHS, strict=True)))
    )
    for name in ("shm", "tcp"):
        r = report[name]
        span = f"{r['handoff_min_ms']:.1f}..{r['handoff_max_ms']:.1f}"
        print(
            f"{name + ' (2 processes)':<22}{r['pull_ms']:>9.1f}{r['copy_ms']:>9.1f}{r['close_ms']:>9.1f}"
            f"{r['handoff_ms']:>10.1f}"
            f"{span:>16}{r['gb_s']:>7.2f}"
        )
    memcpy = f"{report['memcpy_ms']:>10.1f}{'':>16}{report['memcpy_gb_s']:>7.2f}"
    print(f"{'memcpy (numpy copyto)':<22}{'':>27}{memcpy}")
    print(
        "checksum over the same bytes: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in report["checksum_ms"].items())
    )
    checked = f"{report['checksum']} on shm and TCP" if report["shm_verified"] else "crc32 on TCP only"
    shm_x, tcp_x = (report[k]["handoff_ms"] / report["memcpy_ms"] for k in ("shm", "tcp"))
    print(f"bytes verified: {checked}; handoff / memcpy: shm {shm_x:.1f}x, tcp {tcp_x:.1f}x")


if __name__ == "__main__":
    main()

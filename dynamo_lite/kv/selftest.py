"""Check a KV transfer path between two processes or hosts with synthetic KV of a real model's shape.

On the prefill host, ``python -m dynamo_lite.kv.selftest export --bind-host 10.0.0.5 --tokens 2048`` prints
one descriptor per line (JSON), then takes commands on stdin: ``publish`` (another hold), ``stats``, ``quit``
or EOF. On the decode host, feed those lines to ``python -m dynamo_lite.kv.selftest pull``: it pulls each,
checks every byte and prints the transport, time and bandwidth. Tests and benchmarks drive the same commands.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys

import msgspec
import numpy as np

from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.exporter import KvExporter
from dynamo_lite.kv.importer import pull_kv
from dynamo_lite.kv.layout import KvLayout
from dynamo_lite.protocol import KvDescriptor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Deterministic bytes where every 8-byte word differs, so a misplaced chunk cannot go unnoticed."""
    words = (np.arange((nbytes + 7) // 8, dtype=np.uint64) + np.uint64(seed)) * _GOLDEN
    return words.view(np.uint8)[:nbytes]


def _config(args: argparse.Namespace) -> KvTransferConfig:
    return KvTransferConfig(
        bind_host=args.bind_host, port=args.port, lease_s=args.lease, use_shm=not args.no_shm
    )


def _emit(obj: object) -> None:
    sys.stdout.write(msgspec.json.encode(obj).decode() + "\n")
    sys.stdout.flush()


async def export(args: argparse.Namespace) -> None:
    exporter = KvExporter(_config(args))
    await exporter.start()
    layout = KvLayout(args.layers, args.heads, args.dim, args.dtype, args.tokens)
    template = pattern(layout.nbytes, args.seed)

    def publish() -> None:
        hold = exporter.allocate(layout, "selftest")
        np.frombuffer(hold.buffer, dtype=np.uint8)[:] = template
        _emit(exporter.publish(hold))

    try:
        for _ in range(args.count):
            publish()
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            command = line.strip()
            if not line or command == "quit":
                break
            if command == "publish":
                publish()
            elif command == "stats":
                stats = dataclasses.asdict(exporter.stats)
                _emit({"held_bytes": exporter.held_bytes, "held_count": exporter.held_count, **stats})
    finally:
        await exporter.stop()


async def pull(args: argparse.Namespace) -> None:
    config = _config(args)
    for line in sys.stdin:
        if not line.strip():
            continue
        desc = msgspec.json.decode(line, type=KvDescriptor)
        async with await pull_kv(desc, config) as pulled:
            ok = bool(np.array_equal(np.frombuffer(pulled.buffer, np.uint8), pattern(desc.nbytes, args.seed)))
            gbps = pulled.nbytes / pulled.seconds / 1e9
            _emit({"transport": pulled.transport, "seconds": pulled.seconds, "gb_per_s": gbps, "ok": ok})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m dynamo_lite.kv.selftest", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("command", choices=["export", "pull"])
    p.add_argument("--bind-host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--lease", type=float, default=30.0)
    p.add_argument("--no-shm", action="store_true", help="TCP only")
    p.add_argument(
        "--socket-buffer", type=int, default=KvTransferConfig().socket_buffer_bytes, help="0: autotune"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--count", type=int, default=1, help="export: holds to publish at start")
    # SmolLM2-135M's KV shape by default.
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args(argv)
    asyncio.run(export(args) if args.command == "export" else pull(args))


if __name__ == "__main__":
    main()

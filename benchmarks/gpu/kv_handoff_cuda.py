"""KV handoff between processes by CUDA IPC, next to the copy bandwidth measured in the same run.

Llama-3.2-1B-shaped bf16 KV (16 layers x 2 x 8 kv heads x 64 dim = 32 KiB a token): 2k and 8k-token prompts
(64 and 256 MiB). A producer process on GPU 0 holds KV in its exporter's CUDA pool; consumer processes on GPU 0
(same GPU) and GPU 1 (peer) pull each hold and copy it into a slot of an engine-shaped KV cache, as the decode
engine does. One handoff = ``pull_kv`` (claim over TCP) + ``write_into`` the slot + wait for the copy +
``close`` (DONE). Copy-only time is also reported, and so are, in this process, plain copies of the same bytes:
contiguous device-to-device and peer (``torch.copy_``), and the same pitched copies into a slot that the IPC
path issues (``cudaMemcpy2DAsync``) and the row kernel (``cuda_copy``). Times are medians of --iters, host-timed
around the work and a sync, or ("gpu:", "copy on GPU") between CUDA events around the copy once issued.

For comparison, the naive path: torch's own CUDA tensor sharing (``_share_cuda_``/``_new_shared_cuda``, what
torch.multiprocessing does), a fresh mapping per transfer, copied with ``copy_`` and ``torch.cuda.synchronize``.

    python -m benchmarks.gpu.kv_handoff_cuda [--iters 24] [--json out.json]      # needs 2 GPUs for peer rows
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import statistics
import sys
import time
from typing import Any

import msgspec
import torch

from benchmarks.gpu.child import Child
from benchmarks.gpu.common import emit, log
from dynamo_lite.kv import cuda_copy, cuda_ipc
from dynamo_lite.kv.config import KvTransferConfig
from dynamo_lite.kv.cuda_ipc import CudaKvPool, contiguous_strides, get_runtime, on_device, plan_copies
from dynamo_lite.kv.exporter import KvExporter
from dynamo_lite.kv.importer import pull_kv
from dynamo_lite.kv.layout import KvLayout
from dynamo_lite.protocol import KvDescriptor

TOKENS = (2048, 8192)
MAX_SEQ = 8192 + 256
SLOTS = 3
BATCH = 8  # holds published at a time (8 x 256 MiB fit the pool)
COLD_SOURCES = 4  # in-process "gpu:" copies cycle through this many sources: 4 x 64 MiB > the 50 MiB L2


def layout(tokens: int) -> KvLayout:
    return KvLayout(num_layers=16, num_kv_heads=8, head_dim=64, dtype="bfloat16", num_tokens=tokens)


def pattern(shape: tuple[int, ...], seed: int, device: str) -> torch.Tensor:
    """Deterministic int16 words (compared as bits: some are NaN patterns as bf16)."""
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return ((idx * 40503 + seed * 7919) & 0xFFFF).to(torch.int32).to(torch.int16).view(shape)


def cache_for(dev: int) -> torch.Tensor:
    lay = layout(8)
    return torch.zeros(
        lay.num_layers,
        2,
        SLOTS,
        lay.num_kv_heads,
        MAX_SEQ,
        lay.head_dim,
        dtype=torch.bfloat16,
        device=f"cuda:{dev}",
    )


class NaiveShare(msgspec.Struct):
    device: int
    handle: bytes
    size: int
    offset: int
    ref_handle: bytes
    ref_offset: int
    event: bytes | None
    event_sync: bool
    tokens: int
    seed: int


# ---- producer ----


async def producer(device: int) -> None:
    torch.cuda.set_device(device)
    exporter = KvExporter(KvTransferConfig(lease_s=120.0, pull_timeout_s=60.0, max_held_bytes=16 << 30))
    await exporter.start()
    exporter.use_cuda_pool(CudaKvPool(device, (BATCH + 1) * layout(max(TOKENS)).nbytes))
    keep: list[torch.Tensor] = []
    emit({"ready": True})
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd = msgspec.json.decode(line)
        if cmd["op"] == "quit":
            break
        lay = layout(cmd.get("tokens", 8))
        if cmd["op"] == "publish":
            descs = []
            for i in range(cmd["count"]):
                hold = exporter.allocate(lay, f"r{i}")
                hold.tensor().view(torch.int16).copy_(pattern(lay.shape, cmd["seed"] + i, f"cuda:{device}"))
                descs.append(exporter.publish(hold))
            emit({"descs": descs})
        elif cmd["op"] == "naive":
            shares = []
            for i in range(cmd["count"]):
                t = pattern(lay.shape, cmd["seed"] + i, f"cuda:{device}").view(torch.bfloat16)
                keep.append(t)  # the producer must outlive the consumer's use
                f = t.untyped_storage()._share_cuda_()
                shares.append(
                    NaiveShare(
                        f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], lay.num_tokens, cmd["seed"] + i
                    )
                )
            emit({"shares": shares})
        elif cmd["op"] == "stats":
            emit(dataclasses.asdict(exporter.stats))
    await exporter.stop()


# ---- consumer ----


async def consumer(device: int) -> None:
    torch.cuda.set_device(device)  # every thread here works on this GPU (no context on the other)
    dev = torch.device(f"cuda:{device}")
    cache = cache_for(device)
    cfg = KvTransferConfig(pull_timeout_s=60.0)
    emit({"ready": True})
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        cmd = msgspec.json.decode(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "pull":
            descs = msgspec.json.decode(msgspec.json.encode(cmd["descs"]), type=list[KvDescriptor])
            out = []
            ok = True
            for i, desc in enumerate(descs):
                if cmd.get("stage"):
                    desc = msgspec.structs.replace(desc, gpu_uuid="not-visible-here")
                dest = cache[:, :, 1, :, : desc.num_tokens]
                cuda_ipc.COPY_METHOD = cmd.get("method", "auto")
                stream = torch.cuda.current_stream(device)
                # Every other pull times the copy on the GPU (the stream is kept busy while the host issues
                # it); the others time the handoff end to end, as the engine lives it.
                gpu_timed = i % 2 == 1
                t0 = time.perf_counter()
                pulled = await pull_kv(desc, cfg, device=dev)
                t1 = time.perf_counter()
                if gpu_timed:
                    _busy(device)
                pulled.write_into(dest, timing=gpu_timed)
                t_issued = time.perf_counter()
                stream.synchronize()
                t2 = time.perf_counter()
                copy_gpu = pulled.copy_seconds() if gpu_timed else None
                pulled.close()
                t3 = time.perf_counter()
                row = {"transport": pulled.transport, "issue": t_issued - t1}
                if gpu_timed:
                    row["copy_gpu"] = copy_gpu  # between events around the copy itself
                else:
                    row |= {"claim": t1 - t0, "copy": t2 - t1, "total": t3 - t0}
                out.append(row)
                if i == len(descs) - 1 or i == 0:
                    want = pattern(tuple(dest.shape), cmd["seed"] + i, f"cuda:{device}")
                    ok = ok and bool((dest.view(torch.int16) == want).all())
            emit({"results": out, "ok": ok})
        elif cmd["op"] == "naive":
            shares = msgspec.json.decode(msgspec.json.encode(cmd["shares"]), type=list[NaiveShare])
            out = []
            ok = True
            for s in shares:
                lay = layout(s.tokens)
                dest = cache[:, :, 1, :, : s.tokens]
                t0 = time.perf_counter()
                storage = torch.UntypedStorage._new_shared_cuda(
                    s.device, s.handle, s.size, s.offset, s.ref_handle, s.ref_offset, s.event, s.event_sync
                )
                typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.bfloat16, _internal=True)
                src = torch._utils._rebuild_tensor(typed, 0, lay.shape, contiguous_strides(lay.shape))
                t1 = time.perf_counter()
                dest.copy_(src)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                ok = ok and bool(
                    (dest.view(torch.int16) == pattern(lay.shape, s.seed, f"cuda:{device}")).all()
                )
                del src, storage
                out.append({"open": t1 - t0, "copy": t2 - t1, "total": t2 - t0})
            emit({"results": out, "ok": ok})


# ---- in-process ceilings ----


def _median_time(fn: Any, devices: list[int], iters: int) -> float:
    times = []
    for i in range(iters + 3):
        for d in devices:
            torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        fn()
        for d in devices:
            torch.cuda.synchronize(d)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gpu_time(fn: Any, device: int, iters: int) -> float:
    """Median seconds between CUDA events around ``fn`` on ``device``'s current stream (what the copy
    itself takes on the GPU, without the host's launch and sync)."""
    stream = torch.cuda.current_stream(device)
    times = []
    for i in range(iters + 3):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _busy(device)
        e0.record(stream)
        fn()
        e1.record(stream)
        e1.synchronize()
        if i >= 3:
            times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times)


def _busy(device: int) -> None:
    """Keep ``device``'s stream busy for ~0.5 ms, so that the host has issued the timed work before the GPU
    reaches the start event: the events then time the copy, not the host's launch latency."""
    with torch.cuda.device(device):
        torch.cuda._sleep(1_000_000)


def _contiguous(rt: Any, src: torch.Tensor, dst: torch.Tensor, d: int) -> None:
    """One plain copy engine copy of ``src`` into ``dst`` (contiguous), on ``d``'s stream."""
    n = src.numel() * src.element_size()
    with on_device(rt, d):
        rt.memcpy_2d_async(dst.data_ptr(), n, src.data_ptr(), n, n, 1, rt.stream(d))


def _rows(lay: KvLayout, srcs: list[torch.Tensor], dst: torch.Tensor, d: int) -> Any:
    """The one-launch row copy (``cuda_copy``) the IPC path uses on one GPU, in-process: planned once; each
    call reads the next of ``srcs`` (cold in L2, as a prefill's fresh KV is)."""
    plan = tuple(plan_copies(lay.shape, tuple(dst.stride()), contiguous_strides(lay.shape), 2))
    table = cuda_copy.row_table(plan, d)
    assert table is not None
    ptrs = itertools.cycle([s.data_ptr() for s in srcs])

    def launch() -> None:
        with torch.cuda.device(d):
            assert cuda_copy.copy_rows(table, dst.data_ptr(), next(ptrs), d)

    return launch


def _pitched_planned(rt: Any, lay: KvLayout, srcs: list[torch.Tensor], dst: torch.Tensor, d: int) -> Any:
    """``_pitched`` with the plan made beforehand (only the 2D memcpy calls are timed), cycling ``srcs``."""
    plan = plan_copies(lay.shape, tuple(dst.stride()), contiguous_strides(lay.shape), 2)
    ptrs = itertools.cycle([s.data_ptr() for s in srcs])
    t = dst.data_ptr()

    def launch() -> None:
        s = next(ptrs)
        with on_device(rt, d):
            stream = rt.stream(d)
            for c in plan:
                rt.memcpy_2d_async(
                    t + c.dst_offset, c.dst_pitch, s + c.src_offset, c.src_pitch, c.width, c.height, stream
                )

    return launch


def _contiguous_cycled(rt: Any, srcs: list[torch.Tensor], dst: torch.Tensor, d: int) -> Any:
    it = itertools.cycle(srcs)
    return lambda: _contiguous(rt, next(it), dst, d)


def _pitched(rt: Any, lay: KvLayout, src: torch.Tensor, dst: torch.Tensor, d: int) -> None:
    """The copies the IPC path issues (``plan_copies`` + ``cudaMemcpy2DAsync`` on ``d``'s stream), in-process."""
    plan = plan_copies(lay.shape, tuple(dst.stride()), contiguous_strides(lay.shape), 2)
    with on_device(rt, d):
        stream = rt.stream(d)
        for c in plan:
            rt.memcpy_2d_async(
                dst.data_ptr() + c.dst_offset,
                c.dst_pitch,
                src.data_ptr() + c.src_offset,
                c.src_pitch,
                c.width,
                c.height,
                stream,
            )


def _ceilings_for(tokens: int, caches: dict[int, torch.Tensor], iters: int) -> dict[str, float]:
    rt = get_runtime()
    lay = layout(tokens)
    srcs = [torch.randn(lay.shape, device="cuda:0").to(torch.bfloat16) for _ in range(COLD_SOURCES)]
    src = srcs[0]
    flat = src.view(-1)
    dst0 = torch.empty_like(flat)
    slot0 = caches[0][:, :, 1, :, :tokens]
    out = {
        "d2d contiguous copy_": _median_time(lambda: dst0.copy_(flat), [0], iters),
        "d2d into slot, copy_": _median_time(lambda: slot0.copy_(src), [0], iters),
        "d2d into slot, 2D memcpy": _median_time(lambda: _pitched(rt, lay, src, slot0, 0), [0], iters),
        "gpu: d2d contiguous copy_": _gpu_time(lambda: dst0.copy_(flat), 0, iters),
        "gpu: d2d contiguous memcpy": _gpu_time(_contiguous_cycled(rt, srcs, dst0, 0), 0, iters),
        "gpu: d2d into slot, rows kernel": _gpu_time(_rows(lay, srcs, slot0, 0), 0, iters),
        "gpu: d2d into slot, 2D memcpy": _gpu_time(_pitched_planned(rt, lay, srcs, slot0, 0), 0, iters),
    }
    slot0.zero_()
    _rows(lay, [src], slot0, 0)()
    torch.cuda.synchronize(0)
    assert torch.equal(slot0, src)  # the row kernel put every byte in place
    if 1 in caches:
        dst1 = torch.empty_like(flat, device="cuda:1")
        slot1 = caches[1][:, :, 1, :, :tokens]
        out["peer contiguous copy_"] = _median_time(lambda: dst1.copy_(flat), [0, 1], iters)
        out["peer into slot, copy_"] = _median_time(lambda: slot1.copy_(src), [0, 1], iters)
        out["peer into slot, 2D memcpy"] = _median_time(
            lambda: _pitched(rt, lay, src, slot1, 1), [0, 1], iters
        )
        out["gpu: peer contiguous memcpy"] = _gpu_time(_contiguous_cycled(rt, srcs, dst1, 1), 1, iters)
        out["gpu: peer into slot, 2D memcpy"] = _gpu_time(_pitched_planned(rt, lay, srcs, slot1, 1), 1, iters)
        out["gpu: peer into slot, rows kernel"] = _gpu_time(_rows(lay, srcs, slot1, 1), 1, iters)
        slot1.zero_()
        _pitched(rt, lay, src, slot1, 1)
        torch.cuda.synchronize(1)
        assert torch.equal(slot1.cpu(), src.cpu())  # the pitched peer copy put every byte in place
    return out


def ceilings(iters: int, gpus: int) -> dict[str, dict[int, float]]:
    """Seconds per copy of each layout's bytes, by path."""
    caches = {d: cache_for(d) for d in range(min(gpus, 2))}
    if gpus > 1:  # enable peer access both ways (torch does it on a first cross-device copy)
        torch.ones(1, device="cuda:1").copy_(torch.ones(1, device="cuda:0"))
        torch.ones(1, device="cuda:0").copy_(torch.ones(1, device="cuda:1"))
    out: dict[str, dict[int, float]] = {}
    for tokens in TOKENS:
        for name, seconds in _ceilings_for(tokens, caches, iters).items():
            out.setdefault(name, {})[tokens] = seconds
    del caches
    torch.cuda.empty_cache()
    return out


# ---- orchestration ----


def run(args: argparse.Namespace) -> dict:
    gpus = torch.cuda.device_count()
    result: dict[str, Any] = {"gpus": gpus, "device": torch.cuda.get_device_name(0)}
    log(f"{gpus} GPUs: {result['device']}")
    ceil = ceilings(args.iters, gpus)
    result["ceilings_s"] = ceil
    _print_ceilings(ceil)
    me = "benchmarks.gpu.kv_handoff_cuda"
    prod = Child(me, "--role", "producer", "--device", "0", name="producer")
    consumers = {0: Child(me, "--role", "consumer", "--device", "0", name="consumer-gpu0")}
    if gpus > 1:
        consumers[1] = Child(me, "--role", "consumer", "--device", "1", name="consumer-gpu1")
    try:
        for c in (prod, *consumers.values()):
            c.recv(120)
        handoffs: dict[str, Any] = {}
        result["handoffs"] = handoffs
        seed = 1
        for dev, cons in consumers.items():
            for tokens in TOKENS:
                for method in ("auto", "kernel", "memcpy"):
                    rows = []
                    oks = []
                    for _ in range(max(1, args.iters // BATCH)):
                        prod.send({"op": "publish", "tokens": tokens, "count": BATCH, "seed": seed})
                        descs = prod.recv(60)["descs"]
                        cons.send({"op": "pull", "descs": descs, "seed": seed, "method": method})
                        ans = cons.recv(60)
                        rows += ans["results"]
                        oks.append(ans["ok"])
                        seed += BATCH
                    key = f"gpu0->gpu{dev} ipc {method} {tokens}"
                    handoffs[key] = {"rows": rows, "ok": all(oks)}
                    _print_handoff(key, layout(tokens).nbytes, rows, all(oks), ceil, dev)
                prod.send({"op": "naive", "tokens": tokens, "count": 4, "seed": seed})
                shares = prod.recv(60)["shares"]
                cons.send({"op": "naive", "shares": shares})
                ans = cons.recv(60)
                seed += 4
                key = f"gpu0->gpu{dev} torch-naive {tokens}"
                handoffs[key] = {"rows": ans["results"], "ok": ans["ok"]}
                _print_naive(key, layout(tokens).nbytes, ans["results"], ans["ok"])
        last = max(consumers)
        prod.send({"op": "publish", "tokens": max(TOKENS), "count": 3, "seed": seed})
        descs = prod.recv(60)["descs"]
        consumers[last].send({"op": "pull", "descs": descs, "seed": seed, "stage": True})
        ans = consumers[last].recv(120)
        key = f"gpu0->gpu{last} staged (no IPC) {max(TOKENS)}"
        handoffs[key] = {"rows": ans["results"], "ok": ans["ok"]}
        _print_handoff(key, layout(max(TOKENS)).nbytes, ans["results"], ans["ok"], ceil, last)
    finally:
        for c in (prod, *consumers.values()):
            c.close()
    return result


def _gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _print_ceilings(ceil: dict[str, dict[int, float]]) -> None:
    print("\nin-process copies (median; host-timed incl. sync, or 'gpu:' between CUDA events)", flush=True)
    for name, by_tokens in ceil.items():
        cells = "  ".join(
            f"{t // 1024}k: {_gbs(layout(t).nbytes, s):7.1f} GB/s ({s * 1e3:.3f} ms)"
            for t, s in by_tokens.items()
        )
        print(f"  {name:<28} {cells}", flush=True)


def _print_handoff(key: str, nbytes: int, rows: list[dict], ok: bool, ceil: dict, dev: int) -> None:
    walls = [r for r in rows if "total" in r]
    steady = (
        walls[1:] if len(walls) > 1 else walls
    )  # the very first pull also maps the pool (once per process)
    gpu = [r["copy_gpu"] for r in rows if r.get("copy_gpu")]
    total = statistics.median(r["total"] for r in steady)
    claim = statistics.median(r["claim"] for r in steady)
    issue = statistics.median(r["issue"] for r in rows)
    tokens = nbytes // layout(1).nbytes
    ref_name = "gpu: d2d contiguous memcpy" if dev == 0 else "gpu: peer contiguous memcpy"
    ref = ceil.get(ref_name, {}).get(tokens)
    copy_text = "copy on GPU n/a"
    if gpu:
        copy_gpu = statistics.median(gpu)
        ratio = f" = {ref / copy_gpu:.0%} of {ref_name}" if ref else ""
        copy_text = f"copy on GPU {_gbs(nbytes, copy_gpu):7.1f} GB/s{ratio}"
    print(
        f"  {key:<34} {copy_text}; host issues it in {issue * 1e3:.3f} ms; whole handoff (claim {claim * 1e3:.3f}"
        f" + copy + done) {total * 1e3:.3f} ms = {_gbs(nbytes, total):.1f} GB/s (first {walls[0]['total'] * 1e3:.2f}"
        f" ms); {rows[0]['transport']}, bytes {'ok' if ok else 'WRONG'}",
        flush=True,
    )


def _print_naive(key: str, nbytes: int, rows: list[dict], ok: bool) -> None:
    opened = statistics.median(r["open"] for r in rows)
    copy = statistics.median(r["copy"] for r in rows)
    total = statistics.median(r["total"] for r in rows)
    print(
        f"  {key:<32} open {opened * 1e3:.2f} ms + copy {copy * 1e3:.3f} ms ({_gbs(nbytes, copy):.1f} GB/s) "
        f"= {_gbs(nbytes, total):.1f} GB/s overall; bytes {'ok' if ok else 'WRONG'}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=["main", "producer", "consumer"], default="main")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.role == "producer":
        asyncio.run(producer(args.device))
        return 0
    if args.role == "consumer":
        asyncio.run(consumer(args.device))
        return 0
    result: dict[str, Any] = {}
    try:
        result = run(args)
    except Exception as e:  # what was measured is printed already; say what broke
        import traceback

        traceback.print_exc()
        result["error"] = repr(e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

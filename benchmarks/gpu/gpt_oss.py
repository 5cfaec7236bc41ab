"""gpt-oss on one GPU: the decode step of the gpt-oss-20b or -120b shape against its HBM floor, where its time goes,
and the tiny model token for token against transformers in fp32.

    python -m benchmarks.gpu.gpt_oss step [--shape 20b|120b] [--quantization mxfp4|none] [--json out.json]
    python -m benchmarks.gpu.gpt_oss tokens [--json out.json]   # tiny gpt-oss, fp32, engine vs transformers

``step``: the engine's own model and cache (``GptOssModel``, ``KvCache``, the CUDA graphs it serves with) at the
gpt-oss-20b shape (24 layers, 32 experts top-4, hidden 2880, 64/8 heads, window 128) or the 120b's (36 layers, 128
experts) with ``load_format: dummy``-style random weights: bf16, the experts MXFP4 (the default) or bf16. Every
decode row sits at position ``--context`` (1000) of its own slot. Timed with CUDA events over graph replays
(median). The floor is the bytes the step must read (every weight of the attention and the output head, the experts
the step's rows were routed to in their stored format, the KV of each row: full layers up to its position, sliding
layers their 128-position window) over the copy bandwidth measured in the same run
(bytes read + written by a 4 GiB device-to-device copy: ~4240 GB/s on an H200). Then the
same layers' parts timed alone (graphs again) and a torch.profiler kernel table of eager steps.

``tokens``: the tiny gpt-oss folder (``prepare --tiny-gpt-oss``), 8 prompts (5 longer than its window), 20 greedy
tokens each: transformers' ``generate`` vs the engine aggregated (one at a time, then all 8 batched) and vs a
prefill engine handing its KV to a decode engine by CUDA IPC, all in fp32 on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import log

SHAPES = {
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {},
}  # 120b: the config's defaults


# ---- the decode step at the real shape ----


def timed(fn: Any, device: torch.device) -> float:
    """Seconds of one ``fn()``: CUDA events around it on a GPU (``--tiny --device cpu``: a host clock)."""
    if device.type != "cuda":
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth(device: torch.device, gib: float = 4) -> float:
    """Bytes read + written per second by a device-to-device copy of ``gib`` GiB (median of 10)."""
    n = int(gib * (1 << 30))
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    seconds = statistics.median([timed(lambda: dst.copy_(src), device) for _ in range(10)])
    src = dst = None  # free them before the model is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n / seconds


def time_graph(fn: Any, iters: int = 30, device: torch.device | None = None) -> float:
    """Median seconds of one replay of ``fn`` captured in a CUDA graph (on a CPU: of ``fn`` itself)."""
    if device is not None and device.type != "cuda":
        return _time_eager(fn, iters=3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times)


def nbytes(*tensors: Any) -> int:
    """Bytes of tensors and of MXFP4 experts (blocks + scales)."""
    from dynamo_lite.engines.reference.moe_mxfp4 import Mxfp4Experts

    return sum(t.nbytes if isinstance(t, Mxfp4Experts) else t.numel() * t.element_size() for t in tensors)


def expert_nbytes(w: Any) -> int:
    """Bytes of one expert's projection: a slice of a dense tensor, or its MXFP4 blocks + scales."""
    from dynamo_lite.engines.reference.moe_mxfp4 import Mxfp4Experts

    return w.expert_nbytes() if isinstance(w, Mxfp4Experts) else nbytes(w[0])


def step(args: argparse.Namespace) -> dict:
    from dynamo_lite.engines.reference import decode_attention, moe
    from dynamo_lite.engines.reference.cuda_graphs import DecodeGraphs
    from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, random_gpt_oss_weights
    from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
    from dynamo_lite.engines.reference.kv_cache import KvCache
    from dynamo_lite.gpt_oss.tiny import TINY_SHAPE, gpt_oss_config

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
    }
    bw = copy_bandwidth(dev, 4 if cuda else 0.25)
    result["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    cfg = GptOssConfig.from_dict(gpt_oss_config(**(TINY_SHAPE if args.tiny else SHAPES[args.shape])))
    started = time.perf_counter()
    mxfp4 = args.quantization == "mxfp4"
    result["shape"], result["quantization"] = "tiny" if args.tiny else args.shape, args.quantization
    weights = random_gpt_oss_weights(cfg, torch.bfloat16, dev, mxfp4=mxfp4)
    if cuda:
        torch.cuda.synchronize()
    result["weights_GB"] = (
        sum(nbytes(*(getattr(lw, f) for f in lw.__slots__)) for lw in weights.layers) / 1e9
        + nbytes(weights.embed, weights.norm, weights.lm_head) / 1e9
    )
    log(f"random {result['shape']}-shape weights ({args.quantization} experts): {result['weights_GB']:.1f} GB in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    triton = None
    if cuda:
        error = decode_attention.self_check(
            torch.bfloat16, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, dev, True
        )
        result["triton_decode_error"] = error
        triton = decode_attention.decode_attention_triton
    model = GptOssModel(cfg, weights, args.max_seq, triton)
    result["moe_impl"] = model.moe_impl
    max_batch = max(args.batches)
    cache = KvCache(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_batch + 1, args.max_seq, torch.bfloat16, dev,
        cfg.layer_windows,
    )  # fmt: skip
    for group in cache.groups:
        for i in range(group.shape[0]):
            group[i].normal_()  # the KV is read, not trusted: random values cost what real ones cost
    if cuda:
        graphs = DecodeGraphs(model, cache, max_batch, max_batch)
        graphs.capture()
        result["graph_capture_s"] = graphs.capture_seconds
        run_step = graphs.run
    else:

        def run_step(decode: list[tuple[int, int, int]]) -> torch.Tensor:
            ids = torch.tensor([t for _, _, t in decode])
            pos = torch.tensor([p for _, p, _ in decode])
            return model.decode_forward(ids, pos, torch.tensor([s for s, _, _ in decode]), cache)

    ctx = args.context
    per_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * 2
    attn_bytes = sum(
        nbytes(
            lw.input_norm,
            lw.qkv,
            lw.qkv_bias,
            lw.o,
            lw.o_bias,
            lw.sinks,
            lw.post_norm,
            lw.router,
            lw.router_bias,
        )
        for lw in weights.layers
    )
    lw0 = weights.layers[0]
    expert_bytes = expert_nbytes(lw0.gate_up) + nbytes(lw0.gate_up_bias[0])
    expert_bytes += expert_nbytes(lw0.down) + nbytes(lw0.down_bias[0])
    head_bytes = nbytes(weights.lm_head, weights.norm)
    rows = []
    for batch in args.batches:
        decode = [(slot, ctx, 1000 + slot) for slot in range(batch)]
        # The experts these rows are routed to (an eager step with the router observed).
        used: list[int] = []
        real_route = moe.route

        def observed_route(
            h: torch.Tensor,
            w: torch.Tensor,
            b: torch.Tensor,
            k: int,
            real: Any = real_route,
            seen: list = used,
        ) -> Any:
            out = real(h, w, b, k)
            seen.append(int(out[1].unique().numel()))
            return out

        moe.route = observed_route
        try:
            ids = torch.tensor([t for _, _, t in decode], device=dev)
            pos = torch.full((batch,), ctx, device=dev)
            model.decode_forward(ids, pos, torch.arange(batch, device=dev), cache)
        finally:
            moe.route = real_route
        times = [timed(lambda d=decode: run_step(d), dev) for _ in range(args.iters)]
        kv = (
            batch
            * per_layer_token
            * (
                len(cache.full_layers) * (ctx + 1)
                + len(cache.windowed_layers) * min(ctx + 1, cfg.sliding_window)
            )
        )
        weights_read = attn_bytes + head_bytes + sum(used) * expert_bytes + batch * nbytes(weights.embed[0])
        floor = (weights_read + kv) / bw
        med = statistics.median(times)
        row = {
            "batch": batch,
            "context": ctx,
            "step_ms": med * 1e3,
            "step_ms_p10_p90": [sorted(times)[len(times) // 10] * 1e3, sorted(times)[len(times) * 9 // 10] * 1e3],
            "floor_ms": floor * 1e3,
            "over_floor": med / floor,
            "bytes_GB": {"attention_weights": attn_bytes / 1e9, "experts": sum(used) * expert_bytes / 1e9,
                         "head": head_bytes / 1e9, "kv": kv / 1e9},
            "experts_used_per_layer": statistics.mean(used),
        }  # fmt: skip
        row["parts"] = parts(
            model, cache, batch, ctx, bw, attn_bytes, head_bytes, expert_bytes, used, per_layer_token
        )
        rows.append(row)
        log(f"batch {batch}: step {med * 1e3:.2f} ms, floor {floor * 1e3:.2f} ms ({med / floor:.2f}x)")
    result["steps"] = rows
    result["profile"] = profile(model, cache, max(args.batches), ctx, args.profile_out)
    return result


def parts(
    model: Any,
    cache: Any,
    batch: int,
    ctx: int,
    bw: float,
    attn_bytes: int,
    head_bytes: int,
    expert_bytes: int,
    used: list[int],
    per_layer_token: int,
) -> dict:
    """The step's pieces for all layers, each captured and timed alone, next to its own floor."""
    import torch.nn.functional as F

    from dynamo_lite.engines.reference import moe

    cfg, w = model.config, model.weights
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(batch, cfg.hidden_size, generator=gen, device=dev).to(torch.bfloat16)
    q = torch.randn(batch, cfg.num_heads, cfg.head_dim, generator=gen, device=dev).to(torch.bfloat16)
    slots = torch.arange(batch, device=dev)
    lens = torch.full((batch,), ctx + 1, device=dev)
    lens_w = lens.clamp(max=cfg.sliding_window)

    def attention() -> None:
        for i, lw in enumerate(w.layers):
            k, v = cache.layers[i]
            model._decode(
                q, i, cache, slots, lens_w if model.windows[i] else lens
            ) if model.decode_attention is None else model.decode_attention(
                q, k, v, slots, lens_w if model.windows[i] else lens, model.scale, sinks=lw.sinks
            )

    def dense() -> None:
        for i in range(len(w.layers)):
            x = model._qkv[i](h)
            model._o[i](x[:, : cfg.num_heads * cfg.head_dim])

    def experts_with(impl: Any) -> Any:
        def run() -> None:
            for lw in w.layers:
                weights, ids = moe.route(h, lw.router, lw.router_bias, cfg.experts_per_token)
                impl(h, weights, ids, lw.gate_up, lw.gate_up_bias, lw.down, lw.down_bias,
                     cfg.swiglu_limit, cfg.swiglu_alpha)  # fmt: skip

        return run

    def head() -> None:
        F.linear(F.rms_norm(h, (cfg.hidden_size,), w.norm, cfg.rms_norm_eps), w.lm_head).float()

    kv = (
        batch
        * per_layer_token
        * (len(cache.full_layers) * (ctx + 1) + len(cache.windowed_layers) * min(ctx + 1, cfg.sliding_window))
    )
    grouped = functools.partial(moe.experts, grouped_mm=moe._grouped_mm_torch)
    loop = functools.partial(moe.experts, grouped_mm=moe._grouped_mm_loop)
    used_bytes = sum(used) * expert_bytes
    all_bytes = len(w.layers) * cfg.num_experts * expert_bytes
    pieces = [
        ("attention (Triton decode, sinks)", attention, kv, True),
        ("qkv + o linears", dense, attn_bytes, True),
        (
            f"router + experts (the engine's: {model.moe_impl})",
            experts_with(model._experts),
            used_bytes,
            True,
        ),
        ("final norm + lm_head", head, head_bytes, True),
    ]
    dense_experts = isinstance(w.layers[0].gate_up, torch.Tensor)
    if dense_experts:  # the other forms of the bf16 experts
        pieces += [
            ("  experts: grouped_mm only", experts_with(grouped), used_bytes, True),
            ("  experts: dense over all experts", experts_with(moe.experts_dense), all_bytes, True),
            ("  experts: per-expert loop (eager)", experts_with(loop), used_bytes, False),
        ]
    if batch <= 64 and model.decode_attention is not None:  # other forms of the decode attention kernel
        for keys, warps, dot in ((32, 4, True), (64, 8, True), (32, 4, False), (16, 4, False)):

            def variant(keys: int = keys, warps: int = warps, dot: bool = dot) -> None:
                for i, lw in enumerate(w.layers):
                    k, v = cache.layers[i]
                    lens_i = lens_w if model.windows[i] else lens
                    model.decode_attention(
                        q,
                        k,
                        v,
                        slots,
                        lens_i,
                        model.scale,
                        lw.sinks,
                        keys_per_block=keys,
                        num_warps=warps,
                        dot=dot,
                    )

            form = "tl.dot" if dot else "broadcast products"
            pieces.append((f"  attention: {form}, {keys} keys a block, {warps} warps", variant, kv, True))
    # grouped_mm with the experts' weights K-major (the same values, transposed storage): one layer 24 times.
    lw0 = w.layers[0]
    k_major = (
        (
            lw0.gate_up.transpose(1, 2).contiguous().transpose(1, 2),
            lw0.down.transpose(1, 2).contiguous().transpose(1, 2),
        )
        if dense_experts
        else None
    )
    layouts = (
        (("row-major (as stored)", (lw0.gate_up, lw0.down)), ("K-major", k_major)) if dense_experts else ()
    )
    for label, (gu, dn) in layouts:

        def one_layer(gu: torch.Tensor = gu, dn: torch.Tensor = dn) -> None:
            for _ in range(len(w.layers)):
                weights, ids = moe.route(h, lw0.router, lw0.router_bias, cfg.experts_per_token)
                grouped(
                    h,
                    weights,
                    ids,
                    gu,
                    lw0.gate_up_bias,
                    dn,
                    lw0.down_bias,
                    cfg.swiglu_limit,
                    cfg.swiglu_alpha,
                )

        pieces.append((f"  experts: grouped_mm, layer 0 x24, {label}", one_layer, used_bytes, True))
    out = {}
    for name, fn, floor_bytes, graph in pieces:
        try:
            seconds = time_graph(fn, device=dev) if graph else _time_eager(fn)
        except Exception as e:  # one piece failing must not lose the rest
            out[name] = {"error": repr(e)}
            continue
        out[name] = {"ms": seconds * 1e3, "floor_ms": floor_bytes / bw * 1e3, "GB": floor_bytes / 1e9}
    return out


def _time_eager(fn: Any, iters: int = 10) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(model: Any, cache: Any, batch: int, ctx: int, out_path: str) -> list[dict]:
    """Kernels of 3 eager decode steps at ``batch``, by total GPU time (top 20)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dev = model.device
    ids = torch.full((batch,), 1000, device=dev)
    pos = torch.full((batch,), ctx, device=dev)
    slots = torch.arange(batch, device=dev)
    cuda = dev.type == "cuda"
    model.decode_forward(ids, pos, slots, cache)
    if cuda:
        torch.cuda.synchronize()
    try:
        activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if cuda else [ProfilerActivity.CPU]
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                model.decode_forward(ids, pos, slots, cache)
            if cuda:
                torch.cuda.synchronize()
    except Exception as e:
        return [{"error": repr(e)}]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    table = [
        {
            "kernel": e.key[:90],
            "ms_per_step": getattr(e, attr) / 3 / 1e3,
            "share": getattr(e, attr) / total,
            "calls_per_step": e.count / 3,
        }
        for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:20]
    ]
    if out_path:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        Path(out_path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    return table


# ---- tokens of the tiny model against transformers, fp32 on the GPU ----


async def engine_token_runs(settings: Any, request: Any, prompts: list[list[int]]) -> dict:
    """The engine's greedy tokens for ``prompts`` (``settings(mode)`` builds each engine's settings,
    ``request(i, ids, **kw)`` each request): aggregated one at a time, all batched, and a prefill engine handing
    its KV to a decode engine; with the engine's paths and the handoff's counters."""
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.protocol import GenerateRequest, Phase

    async def collect(engine: Any, req: GenerateRequest) -> list:
        return [c async for c in engine.generate(req)]

    out: dict[str, Any] = {}
    agg = build_engine(settings("agg"))
    await agg.start()
    out["engine"] = {
        "cuda_graphs": agg._graphs is not None,
        "triton_decode": agg._model.decode_attention is not None,
        "moe_impl": agg._model.moe_impl,
    }
    try:
        seq = [
            [t for c in await collect(agg, request(i, p)) for t in c.token_ids] for i, p in enumerate(prompts)
        ]
        both = await asyncio.gather(*(collect(agg, request(i, p)) for i, p in enumerate(prompts)))
        batched = [[t for c in chunks for t in c.token_ids] for chunks in both]
    finally:
        await agg.stop()
    prefill, decode = build_engine(settings("prefill")), build_engine(settings("decode"))
    await prefill.start()
    await decode.start()
    disagg = []
    try:
        for i, p in enumerate(prompts):
            first = (await collect(prefill, request(i, p, phase=Phase.PREFILL)))[0]
            rest = await collect(
                decode, request(i, p, phase=Phase.DECODE, kv=first.kv, generated_ids=first.token_ids)
            )
            disagg.append([*first.token_ids, *(t for c in rest for t in c.token_ids)])
        stats = decode.stats()
        out["kv_transfers"], out["kv_bytes"], out["kv_recomputes"] = (
            stats.kv_transfers,
            stats.kv_transfer_bytes,
            stats.kv_recomputes,
        )
        out["cuda_pool"] = prefill._pool is not None
    finally:
        await prefill.stop()
        await decode.stop()
    out["runs"] = {"aggregated": seq, "batched": batched, "disaggregated": disagg}
    return out


def tokens(args: argparse.Namespace) -> dict:
    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.gpt_oss.tiny import write_model_folder
    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "engines" / "reference"))
    from gpt_oss_testing import NEW_TOKENS, PROMPT_LENGTHS, prompts  # the CPU tests' prompts

    dev = args.device
    result: dict[str, Any] = {"device": dev, "prompt_lengths": PROMPT_LENGTHS}
    folder = Path(tempfile.mkdtemp(prefix="tiny-gpt-oss-"))
    write_model_folder(folder)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(dev).eval()

    def hf_generate(model: Any) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for ids in prompts():
                gen = model.generate(torch.tensor([ids], device=dev), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)  # fmt: skip
                out.append(gen[0, len(ids) :].tolist())
        return out

    try:
        expected = hf_generate(hf)
        result["hf_experts"] = hf.config._experts_implementation
    except Exception as e:  # grouped_mm without an fp32 kernel here: transformers' per-expert loop instead
        log(f"transformers' grouped experts failed in fp32 ({e!r}); using its eager experts")
        hf.config._experts_implementation = "eager"
        for layer in hf.model.layers:
            layer.mlp.experts.config._experts_implementation = "eager"
        expected = hf_generate(hf)
        result["hf_experts"] = "eager"
    del hf
    torch.cuda.empty_cache()

    def settings(mode: str) -> EngineSettings:
        return EngineSettings(role=mode, model_path=str(folder), dtype="float32", device=dev, max_batch_size=8,
                              max_num_tokens=48, max_seq_len=128)  # fmt: skip

    def request(i: int, ids: list[int], **kw: Any) -> GenerateRequest:
        opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        return GenerateRequest(request_id=f"r{i}", model="tiny", token_ids=ids, sampling=opts, **kw)

    got = asyncio.run(engine_token_runs(settings, request, prompts()))
    result |= {k: v for k, v in got.items() if k != "runs"}
    result["exact"] = {name: toks == expected for name, toks in got["runs"].items()}
    result["first_diff"] = {
        name: [next((j for j, (a, b) in enumerate(zip(t, e, strict=False)) if a != b), None)
               for t, e in zip(toks, expected, strict=True)]
        for name, toks in got["runs"].items()
    }  # fmt: skip
    log(
        f"token check on {dev} fp32: {result['exact']} (engine {result['engine']}, hf experts {result['hf_experts']})"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "tokens"])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--profile-out", default="", help="step: write the profiler's table here")
    p.add_argument(
        "--tiny", action="store_true", help="step: the tiny shape (with --device cpu: a smoke test)"
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="20b", help="step: gpt-oss-20b or -120b")
    p.add_argument(
        "--quantization", choices=["none", "mxfp4"], default="mxfp4", help="step: the experts' format"
    )
    p.add_argument(
        "--mxfp4-order", choices=["k", "n"], default="", help="step: how the packed experts are stored"
    )
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if args.mxfp4_order:
        from dynamo_lite.engines.reference import moe_mxfp4

        moe_mxfp4.WEIGHT_ORDER = args.mxfp4_order
    started = time.perf_counter()
    try:
        result = step(args) if args.what == "step" else tokens(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": repr(e)}
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text, flush=True)
    ok = "error" not in result and (args.what != "tokens" or all(result.get("exact", {}).values()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

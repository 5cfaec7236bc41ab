"""gpt-oss's MXFP4 experts on one GPU: the Triton kernels against dequantize-then-bf16, their speed per tile
shape, the tiny model token for token against transformers, and a checkpoint in the published layout loaded
packed.

    python -m benchmarks.gpu.gpt_oss_mxfp4 kernel [--json out.json]   # correctness + timing at the 120b layer
    python -m benchmarks.gpu.gpt_oss_mxfp4 words [--json out.json]    # the engine's word layout vs bytes
    python -m benchmarks.gpu.gpt_oss_mxfp4 tokens [--json out.json]   # tiny gpt-oss, MXFP4 experts, vs transformers
    python -m benchmarks.gpu.gpt_oss_mxfp4 load --shape 20b           # prepare --gpt-oss-checkpoint, then load it

``kernel``: random MXFP4 experts of gpt-oss-120b's layer (128 experts, hidden 2880, intermediate 2880), random
routings (expert 0 left without rows, expert 1 with one): the kernels' output against the routed experts
dequantized to bf16 and multiplied by torch's grouped product (relative error), then each tile configuration timed
(CUDA graphs, median) at decode sizes (1..256 tokens: bytes of the routed experts over the time, vs the copy
bandwidth) and prefill sizes (FLOP/s vs the dense bf16 matmul rate measured in the same run).

``tokens``: the tiny gpt-oss written as an MXFP4 checkpoint; fp32 engine (the kernels with fp32 products)
aggregated, 8 batched, and prefill → decode by CUDA IPC against transformers (which dequantizes the same
checkpoint); bf16 logits of the prompts against transformers' bf16.

``load``: the 20b-shape checkpoint written by ``python -m dynamo_lite prepare --gpt-oss-checkpoint`` read by the
engine with ``--quantization mxfp4``: peak GPU memory during the load against the packed size, then a few tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from benchmarks.gpu.gpt_oss import copy_bandwidth, engine_token_runs, time_graph

LIMIT, ALPHA = 7.0, 1.702


def matmul_rate(dev: torch.device) -> float:
    """Dense bf16 FLOP/s of an 8192^3 matmul on random data (median of 10)."""
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times)


def layer(
    dev: torch.device, experts: int = 128, hidden: int = 2880, inter: int = 2880, seed: int = 0
) -> tuple:
    from dynamo_lite.engines.reference.moe_mxfp4 import random_mxfp4

    gen = torch.Generator(device=dev).manual_seed(seed)
    # Scale rows aligned as the engine stores them on CUDA (``for_kernels``), so word-read scales apply.
    gate_up = random_mxfp4(experts, 2 * inter, hidden, hidden**-0.5, gen, dev).with_aligned_scales()
    down = random_mxfp4(experts, hidden, inter, inter**-0.5, gen, dev).with_aligned_scales()
    gub = (torch.randn(experts, 2 * inter, generator=gen, device=dev) * 0.1).bfloat16()
    dnb = (torch.randn(experts, hidden, generator=gen, device=dev) * 0.1).bfloat16()
    return gate_up, gub, down, dnb


def routing(tokens: int, experts: int, top_k: int, dev: torch.device, seed: int) -> tuple:
    gen = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.argsort(torch.rand(tokens, experts - 2, generator=gen, device=dev), dim=1)[:, :top_k] + 2
    ids[0, 0] = 1  # expert 1: one row; expert 0: none
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen, device=dev), dim=1).bfloat16()
    return weights, ids


def candidate_configs() -> list:
    from dynamo_lite.engines.reference.moe_mxfp4 import DECODE_CONFIG, PREFILL_CONFIG, KernelConfig

    # Measured 2026-12-07 on an H100: the weights as the MMA's left side (swap_ab) and our own unpacking were
    # slower at every decode size, and larger tiles slower than 16x64x128. Then found (the compiled kernels' IR):
    # byte-wide scale loads were never pipelined, so each K step waited for its scales; read as 32-bit words they
    # are. So: the word-read scales over tile shapes, warps and stages, and the inputs split over 2 or 4 programs.
    decode = [
        KernelConfig(16, bn, bk, w, st, True, scale_words=True)
        for bn, bk in ((32, 128), (64, 128), (128, 128), (32, 256), (64, 256))
        for w, st in ((4, 3), (4, 5), (2, 4))
    ]
    decode += [
        KernelConfig(16, bn, 128, 4, 4, True, split_k=sk, scale_words=True)
        for bn in (32, 64)
        for sk in (2, 4)
    ]
    decode += [KernelConfig(16, 64, 128, 4, 4, True, True, scale_words=True)]
    prefill = [KernelConfig(128, 128, 64, 8, 4, True), KernelConfig(128, 256, 64, 8, 3, True)]
    prefill += [KernelConfig(64, 128, 64, 4, 4, True), KernelConfig(128, 128, 128, 8, 3, True)]
    prefill += [
        KernelConfig(128, 128, 128, 8, 3, True, scale_words=True),
        KernelConfig(128, 128, 128, 4, 3, True, scale_words=True),
        KernelConfig(64, 128, 128, 4, 4, True, scale_words=True),
        KernelConfig(128, 256, 128, 8, 3, True, scale_words=True),
    ]
    return list(dict.fromkeys([DECODE_CONFIG, PREFILL_CONFIG, *decode, *prefill]))


def compiling_configs(configs: list, device: str, parallel: int = 12) -> list:
    """The configs whose kernels compile (each tried in a process of its own: a compiler abort must not end the
    benchmark); the compiled kernels land in Triton's cache for the timing that follows."""
    import subprocess

    pending = list(configs)
    running: list[tuple[Any, Any]] = []
    ok = []
    while pending or running:
        while pending and len(running) < parallel:
            cfg = pending.pop(0)
            spec = ",".join(str(int(v)) for v in (cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps,
                                                  cfg.num_stages, cfg.scaled_dot, cfg.swap_ab, cfg.split_k,
                                                  cfg.scale_words))  # fmt: skip
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.gpu.gpt_oss_mxfp4",
                "compile",
                "--device",
                device,
                "--config",
                spec,
            ]
            running.append((cfg, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        cfg, proc = running.pop(0)
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            ok.append(cfg)
        else:
            log(f"does not compile: {cfg}: {err.decode(errors='replace').strip().splitlines()[:1]}")
    return ok


def compile_one(args: argparse.Namespace) -> dict:
    from dynamo_lite.engines.reference import moe_mxfp4 as mx

    bm, bn, bk, w, st, sd, sw, sk, wd = (int(v) for v in args.config.split(","))
    dev = torch.device(args.device)
    gate_up, gub, down, dnb = layer(dev, experts=2)
    weights, ids = torch.ones(8, 1, device=dev).bfloat16(), torch.zeros(8, 1, dtype=torch.long, device=dev)
    h = torch.randn(8, 2880, device=dev).bfloat16()
    cfg = mx.KernelConfig(bm, bn, bk, w, st, bool(sd), bool(sw), sk, bool(wd))
    mx.experts_mxfp4(h, weights, ids, gate_up, gub, down, dnb, LIMIT, ALPHA, config=cfg)
    torch.cuda.synchronize()
    return {}


def kernel_breakdown(fn: Any, iters: int = 20) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel ``fn`` launches (torch.profiler, eager calls)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0)
        if us > 0 and evt.key:
            totals[evt.key[:60]] = round(us / iters, 2)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:8])


def kernel(args: argparse.Namespace) -> dict:
    from dynamo_lite.engines.reference import moe
    from dynamo_lite.engines.reference import moe_mxfp4 as mx

    dev = torch.device(args.device)
    torch.cuda.set_device(dev)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev)}
    bw = copy_bandwidth(dev)
    flops = matmul_rate(dev)
    result |= {"copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}
    log(f"copy {bw / 1e9:.0f} GB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    configs = compiling_configs(candidate_configs(), args.device)
    result["configs_that_compile"] = [str(c) for c in configs]
    gate_up, gub, down, dnb = layer(dev)
    dense = (gate_up.dequantize(torch.bfloat16), gub, down.dequantize(torch.bfloat16), dnb)
    # The same weights stored output-rows-innermost ("n", keyed "<config> n"): read by the kernels through strides.
    orders = {"k": (gate_up, down), "n": (gate_up.n_major(), down.n_major())}
    grouped = functools.partial(moe.experts, grouped_mm=moe._grouped_mm_torch)
    checks = []
    for tokens in (1, 64, 4096):
        weights, ids = routing(tokens, 128, 4, dev, seed=tokens)
        h = torch.randn(tokens, 2880, device=dev).bfloat16()
        ref = grouped(h, weights, ids, *dense, LIMIT, ALPHA).float()
        for cfg in configs if tokens < 4096 else configs[:: max(1, len(configs) // 4)]:
            for order, (gu_w, dn_w) in orders.items():
                if order == "n" and (tokens == 4096 or cfg.block_m > 32 or not cfg.scale_words):
                    continue
                out = torch.full((tokens, 2880), float("nan"), device=dev)
                out.copy_(mx.experts_mxfp4(h, weights, ids, gu_w, gub, dn_w, dnb, LIMIT, ALPHA, config=cfg))
                err = float((out - ref).norm() / ref.norm())
                name = str(cfg) + (" n" if order == "n" else "")
                checks.append(
                    {"tokens": tokens, "config": name, "rel_error": err, "nan": bool(out.isnan().any())}
                )
                log(f"check {tokens} tokens {name}: rel error {err:.2e}")
    result["checks"] = checks
    result["correct"] = all(c["rel_error"] < 2e-2 and not c["nan"] for c in checks)
    expert_bytes = gate_up.expert_nbytes() + down.expert_nbytes()
    timings = []
    for tokens in args.tokens:
        weights, ids = routing(tokens, 128, 4, dev, seed=tokens)
        h = torch.randn(tokens, 2880, device=dev).bfloat16()
        used = int(ids.unique().numel())
        moved = used * expert_bytes
        work = 2 * tokens * 4 * (2880 * 5760 + 2880 * 2880)
        decode = tokens * 4 < mx.PREFILL_FROM_ROWS_PER_EXPERT * 128
        row: dict[str, Any] = {"tokens": tokens, "experts_used": used, "GB": moved / 1e9, "configs": {}}
        for cfg, order in ((c, o) for c in configs for o in orders):
            if decode != (cfg.block_m <= 32) and cfg != mx.pick_config(tokens * 4, 128):
                continue
            if (tokens >= 16384 and cfg.block_m == 16) or (
                order == "n" and (not decode or cfg.swap_ab or not cfg.scale_words)
            ):
                continue
            gu_w, dn_w = orders[order]
            fn = functools.partial(
                mx.experts_mxfp4, h, weights, ids, gu_w, gub, dn_w, dnb, LIMIT, ALPHA, config=cfg
            )
            name = str(cfg) + (" n" if order == "n" else "")
            try:
                seconds = time_graph(fn, iters=20)
            except Exception as e:
                row["configs"][name] = {"error": repr(e)[:200]}
                continue
            row["configs"][name] = {"ms": seconds * 1e3, "GBps": moved / seconds / 1e9,
                                    "TFLOPs": work / seconds / 1e12}  # fmt: skip
        ok = {k: v for k, v in row["configs"].items() if "ms" in v}
        best = min(ok, key=lambda k: ok[k]["ms"])
        chosen = str(mx.pick_config(tokens * 4, 128))
        row["best"], row["chosen"] = best, chosen
        b, c = ok[best], ok.get(chosen, {})
        log(f"{tokens} tokens: best {best} {b['ms']:.3f} ms ({b['GBps']:.0f} GB/s, {b['TFLOPs']:.0f} TFLOP/s); "
            f"chosen {c.get('ms', float('nan')):.3f} ms; floor {moved / bw * 1e3:.3f} ms")  # fmt: skip
        row["floor_ms"] = moved / bw * 1e3
        row["compute_floor_ms"] = work / flops * 1e3
        if tokens <= 256:
            best_cfg = next(c for c in configs if best.startswith(str(c)))
            gu_w, dn_w = orders["n" if best.endswith(" n") else "k"]
            fn = functools.partial(
                mx.experts_mxfp4, h, weights, ids, gu_w, gub, dn_w, dnb, LIMIT, ALPHA, config=best_cfg
            )
            row["kernels_us"] = kernel_breakdown(fn)
            log(f"{tokens} tokens, best config, per kernel (us): {row['kernels_us']}")
        timings.append(row)
    result["timings"] = timings
    return result


def words(args: argparse.Namespace) -> dict:
    """The engine's weight layout on CUDA (``mxfp4_words``, unpacked by PTX) against the checkpoint's bytes (the
    compiler's e2m1 unpacking): each word tile checked against dequantize-then-bf16, then timed beside the byte
    layout's chosen tiles, at decode and prefill sizes of the 120b layer."""
    from dynamo_lite.engines.reference import moe
    from dynamo_lite.engines.reference import moe_mxfp4 as mx

    k = mx.KernelConfig
    dev = torch.device(args.device)
    torch.cuda.set_device(dev)
    bw, flops = copy_bandwidth(dev), matmul_rate(dev)
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "copy_bandwidth_GBps": bw / 1e9,
                              "bf16_matmul_TFLOPs": flops / 1e12, "checks": {}, "timings": {}}  # fmt: skip
    gate_up, gub, down, dnb = layer(dev)
    gu_words, dn_words = gate_up.as_words(), down.as_words()
    dense = (gate_up.dequantize(torch.bfloat16), gub, down.dequantize(torch.bfloat16), dnb)
    grouped = functools.partial(moe.experts, grouped_mm=moe._grouped_mm_torch)
    decode = [mx.WORDS_SMALL_DECODE_CONFIG, mx.WORDS_DECODE_CONFIG]
    decode += [k(16, bn, bk, 4, st, False, sw, 1, True) for bn, bk, st, sw in
               ((64, 128, 4, False), (128, 128, 3, True), (32, 128, 4, True), (64, 256, 4, True))]  # fmt: skip
    prefill = [mx.WORDS_PREFILL_CONFIG, mx.WORDS_LONG_PREFILL_CONFIG]
    prefill += [dataclasses.replace(c, columns_first=False) for c in prefill]  # the launch order's effect
    prefill += [k(bm, bn, bk, w, st, False, sw, 1, True) for bm, bn, bk, w, st, sw in
                ((128, 128, 64, 4, 5, True), (128, 128, 128, 8, 3, True), (256, 128, 128, 8, 3, True),
                 (128, 128, 128, 4, 4, False))]  # fmt: skip
    decode, prefill = list(dict.fromkeys(decode)), list(dict.fromkeys(prefill))
    for tokens in (1, 64, 4096):
        weights, ids = routing(tokens, 128, 4, dev, seed=tokens)
        h = torch.randn(tokens, 2880, device=dev).bfloat16()
        ref = grouped(h, weights, ids, *dense, LIMIT, ALPHA).float()
        for cfg in decode if tokens < 4096 else prefill:
            out = mx.experts_mxfp4(
                h, weights, ids, gu_words, gub, dn_words, dnb, LIMIT, ALPHA, config=cfg
            ).float()
            result["checks"][f"{tokens} {cfg}"] = float((out - ref).norm() / ref.norm())
    result["correct"] = all(e < 2e-2 for e in result["checks"].values())
    log(f"word tiles within {max(result['checks'].values()):.2e} of dequantize-then-bf16")
    expert_bytes = gate_up.expert_nbytes() + down.expert_nbytes()
    for tokens in args.tokens:
        weights, ids = routing(tokens, 128, 4, dev, seed=tokens)
        h = torch.randn(tokens, 2880, device=dev).bfloat16()
        moved = int(ids.unique().numel()) * expert_bytes
        rows: dict[str, float] = {}
        byte_cfg = mx.pick_config(tokens * 4, 128)
        runs = [("bytes " + str(byte_cfg), gate_up, down, byte_cfg)]
        runs += [("words " + str(c), gu_words, dn_words, c) for c in (decode if tokens <= 256 else prefill)]
        for name, gu_w, dn_w, cfg in runs:
            if tokens >= 16384 and cfg.block_m == 16:
                continue
            fn = functools.partial(
                mx.experts_mxfp4, h, weights, ids, gu_w, gub, dn_w, dnb, LIMIT, ALPHA, config=cfg
            )
            rows[name] = time_graph(fn, iters=20) * 1e3
        chosen = "words " + str(mx.pick_config(tokens * 4, 128, words=True))
        result["timings"][str(tokens)] = {"floor_ms": moved / bw * 1e3, "ms": rows, "chosen": chosen}
        best = min(rows, key=rows.get)
        log(f"{tokens} tokens: bytes {rows[runs[0][0]]:.3f} ms, words (chosen) {rows.get(chosen, float('nan')):.3f}"
            f" ms, best {best} {rows[best]:.3f} ms; floor {moved / bw * 1e3:.3f} ms")  # fmt: skip
    return result


def tokens(args: argparse.Namespace) -> dict:
    import transformers

    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, load_gpt_oss_weights
    from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
    from dynamo_lite.engines.reference.kv_cache import KvCache
    from dynamo_lite.engines.reference.model import build_step
    from dynamo_lite.gpt_oss.tiny import write_model_folder
    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "engines" / "reference"))
    from gpt_oss_testing import NEW_TOKENS, prompts

    dev = torch.device(args.device)
    folder = write_model_folder(Path(tempfile.mkdtemp(prefix="tiny-mxfp4-")), mxfp4=True, seed=7)
    quant = transformers.Mxfp4Config(dequantize=True)
    result: dict[str, Any] = {"device": str(dev)}

    def hf_model(dtype: torch.dtype) -> Any:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=dtype, quantization_config=quant
        )
        model = model.to(device=dev, dtype=dtype).eval()
        # The dequantized experts may stay in the dtype transformers dequantized them to; cast them too.
        for module in model.modules():
            for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
                    setattr(module, name, torch.nn.Parameter(t.data.to(dtype), requires_grad=False))
        return model

    hf = hf_model(torch.float32)
    try:
        hf.config._experts_implementation = "eager"
        for lyr in hf.model.layers:
            lyr.mlp.experts.config._experts_implementation = "eager"
    except AttributeError:
        pass
    expected = []
    with torch.inference_mode():
        for ids in prompts():
            gen = hf.generate(torch.tensor([ids], device=dev), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=0)  # fmt: skip
            expected.append(gen[0, len(ids) :].tolist())
    del hf
    # bf16 logits: our model (the kernels with bf16 products) vs transformers in bf16, whole prompts.
    hf16 = hf_model(torch.bfloat16)
    cfg = GptOssConfig.from_folder(folder)
    ours = GptOssModel(cfg, load_gpt_oss_weights(folder, cfg, torch.bfloat16, dev, mxfp4=True), 128)
    result["bf16_moe_impl"] = ours.moe_impl
    errors, agree = [], []
    for ids in prompts():
        cache = KvCache(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 2, 128, torch.bfloat16, dev, cfg.layer_windows
        )
        got = ours.forward(build_step([], [(0, 0, ids)], list(range(len(ids))), dev), cache)
        with torch.inference_mode():
            ref = hf16(torch.tensor([ids], device=dev)).logits[0].float()
        errors.append(float((got - ref).norm() / ref.norm()))
        agree.append(float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
    result["bf16_logits_rel_error_max"] = max(errors)
    result["bf16_argmax_agreement_min"] = min(agree)
    del hf16, ours
    torch.cuda.empty_cache()

    def settings(mode: str) -> EngineSettings:
        return EngineSettings(role=mode, model_path=str(folder), dtype="float32", device=str(dev), quantization="mxfp4",
                              max_batch_size=8, max_num_tokens=48, max_seq_len=128)  # fmt: skip

    def request(i: int, ids: list[int], **kw: Any) -> GenerateRequest:
        opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        return GenerateRequest(request_id=f"r{i}", model="tiny", token_ids=ids, sampling=opts, **kw)

    got = asyncio.run(engine_token_runs(settings, request, prompts()))
    result |= {k: v for k, v in got.items() if k != "runs"}
    result["exact"] = {name: toks == expected for name, toks in got["runs"].items()}
    log(f"tokens: {result['exact']}, bf16 logits rel error {result['bf16_logits_rel_error_max']:.2e}, "
        f"argmax agreement {result['bf16_argmax_agreement_min']:.3f}, engine {result['engine']}")  # fmt: skip
    return result


def load(args: argparse.Namespace) -> dict:
    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.gpt_oss.tiny import write_model_folder
    from dynamo_lite.protocol import GenerateRequest, SamplingOptions

    dev = torch.device(args.device)
    folder = Path(args.model_dir or f"/tmp/gpt-oss-{args.shape}-mxfp4")
    started = time.perf_counter()
    if not (folder / "model.safetensors.index.json").exists():
        write_model_folder(folder, shape=args.shape, mxfp4=True)
    result: dict[str, Any] = {"shape": args.shape, "write_s": time.perf_counter() - started}
    result["checkpoint_GB"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9
    torch.cuda.set_device(dev)
    torch.empty(1, device=dev)
    torch.cuda.reset_peak_memory_stats(dev)
    engine = build_engine(EngineSettings(model_path=str(folder), dtype="bfloat16", device=str(dev),
                                         quantization="mxfp4", max_batch_size=4, max_seq_len=1024,
                                         free_gpu_memory_fraction=0.3))  # fmt: skip

    async def run() -> list[int]:
        await engine.start()
        try:
            result["load_s"] = time.perf_counter() - started - result["write_s"]
            w = engine._model.weights
            result["weights_GB"] = sum(x.nbytes for lw in w.layers for x in (lw.gate_up, lw.down)) / 1e9
            result["moe_impl"] = engine._model.moe_impl
            opts = SamplingOptions(max_tokens=16, temperature=0.0, ignore_eos=True)
            req = GenerateRequest(request_id="r", model="m", token_ids=list(range(100, 140)), sampling=opts)
            return [t async for c in engine.generate(req) for t in c.token_ids]
        finally:
            await engine.stop()

    before_kv = torch.cuda.memory_allocated(dev)
    toks = asyncio.run(run())
    result["tokens"] = toks
    result["peak_GB"] = torch.cuda.max_memory_allocated(dev) / 1e9
    result["allocated_before_GB"] = before_kv / 1e9
    log(f"load {args.shape}: checkpoint {result['checkpoint_GB']:.1f} GB, expert weights on GPU "
        f"{result['weights_GB']:.1f} GB, peak {result['peak_GB']:.1f} GB, load {result['load_s']:.0f} s, "
        f"{result['moe_impl']}, tokens {toks}")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernel", "words", "tokens", "load", "compile"])
    p.add_argument("--config", default="", help="compile: BM,BN,BK,warps,stages,scaled_dot")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 4096, 16384])
    p.add_argument("--shape", choices=["tiny", "20b", "120b"], default="20b")
    p.add_argument("--model-dir", default="")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    started = time.perf_counter()
    try:
        run = {"kernel": kernel, "words": words, "tokens": tokens, "load": load, "compile": compile_one}
        result = run[args.what](args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result = {"error": repr(e)}
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text[-3000:], flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())

"""gpt-oss prefill on one GPU: the flash prefill attention (Triton) against the eager chunked attention, and the
whole model's prefill throughput against the card's dense bf16 compute floor.

    python -m benchmarks.gpu.prefill_attention kernel [--shapes 20b 120b] [--json out.json]
    python -m benchmarks.gpu.prefill_attention model --shape 20b|120b [--quantization mxfp4] [--json out.json]
    python -m benchmarks.gpu.prefill_attention kernel --tiny --device cpu   # smoke test (TRITON_INTERPRET=1 runs
    python -m benchmarks.gpu.prefill_attention model --tiny --device cpu    #  the kernel on a CPU, slowly)

``kernel``: ``--prompts`` (64) prompts of ``--prompt-len`` (1000) tokens, each one prefill chunk as the engine
runs it (queries a strided view of the fused qkv buffer; random bf16 data), at gpt-oss's attention shape (64
query / 8 KV heads of 64: the same in 20b and 120b, which differ in layer count only). For a full-attention layer
and a 128-window layer: the eager attention and each tile configuration of the flash kernel timed with CUDA events
over all prompts (median of ``--iters``), as ms and as TFLOP/s of the keys each query really sees (causal,
windowed); the flash kernel's error against the eager attention in fp32 on one prompt (fp32 and bf16 inputs); then
per model shape the attention time of a whole prefill of the prompts (its full and sliding layers).

``model``: the engine's own ``GptOssModel`` at the 20b or 120b shape with random weights made as
``load_format: dummy`` makes them (bf16, experts MXFP4 by default), the prompts prefilled in steps of
``--step-tokens`` (16384, the seed's prefill ``max_num_tokens``) with the flash attention and with the eager one:
tokens/s and the share of the dense bf16 compute floor. FLOPs per token = 2 x active parameters without the
embedding and the output head (qkv, o, router, top-k experts, with biases) + the attention's (4 x heads x head_dim x
the keys each token sees, averaged over the prompt). Peak: 989 TFLOP/s dense bf16 for H100 SXM and H200 (same
tensor cores), printed with the card's name; any other card: the 8192^3 bf16 matmul rate measured in the run
(also printed on H100/H200 for comparison). Then one step's parts timed alone (attention, qkv/o linears,
router + experts, norms/rope/rest) so the gap to the floor has an address.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu.common import log

SHAPES = {
    "20b": {"num_hidden_layers": 24, "num_local_experts": 32},
    "120b": {},
}  # 120b: the config's defaults
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense (no sparsity) bf16 tensor-core FLOP/s, SXM parts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Any, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, a host clock elsewhere), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def config_of(shape: str, tiny: bool) -> Any:
    from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig
    from dynamo_lite.gpt_oss.tiny import TINY_SHAPE, gpt_oss_config

    return GptOssConfig.from_dict(gpt_oss_config(**(TINY_SHAPE if tiny else SHAPES[shape])))


def visible_keys(prompt_len: int, window: int) -> int:
    """Keys summed over the prompt's queries: causal, and within ``window`` positions when it is > 0."""
    if not window:
        return prompt_len * (prompt_len + 1) // 2
    inside = min(prompt_len, window)
    return inside * (inside + 1) // 2 + (prompt_len - inside) * window


def attention_flops(cfg: Any, prompt_len: int, window: int) -> int:
    """q·k and p·v of one layer over one prompt (2 FLOPs per multiply-add, two products)."""
    return 4 * cfg.num_heads * cfg.head_dim * visible_keys(prompt_len, window)


def flops_per_token(cfg: Any, prompt_len: int) -> dict:
    """2 x active parameters (no embedding, no output head) + the attention's FLOPs, per prompt token."""
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    per_layer = (
        hidden * qkv_out + qkv_out  # qkv + bias
        + cfg.num_heads * hd * hidden + hidden  # o + bias
        + hidden * cfg.num_experts + cfg.num_experts  # router + bias
        + cfg.experts_per_token * (hidden * 2 * inter + 2 * inter + inter * hidden + hidden)  # routed experts
    )  # fmt: skip
    active = per_layer * cfg.num_layers
    attention = sum(attention_flops(cfg, prompt_len, w) for w in cfg.layer_windows) / prompt_len
    return {
        "active_params": active,
        "dense": 2 * active,
        "attention": attention,
        "total": 2 * active + attention,
    }


def peak_flops(device: torch.device) -> tuple[float, str]:
    """The card's dense bf16 peak and where it comes from (the datasheet for H100/H200, else measured)."""
    if device.type != "cuda":
        return float("nan"), "cpu (no peak)"
    name = torch.cuda.get_device_name(device)
    for card, peak in PEAK_BF16.items():
        if card in name:
            return peak, f"{card} datasheet dense bf16 ({peak / 1e12:.0f} TFLOP/s)"
    rate = matmul_rate(device)
    return rate, f"measured 8192^3 bf16 matmul on {name} ({rate / 1e12:.0f} TFLOP/s)"


def matmul_rate(device: torch.device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_it(lambda: a @ b, device, iters=10, warmup=3)
    return 2 * n**3 / seconds


def flash_fn(device: torch.device) -> Any:
    """The flash kernel where it runs on ``device`` (CUDA, or a CPU under Triton's interpreter), else None."""
    import os

    from dynamo_lite.engines.reference import prefill_attention as pa

    if not pa.HAVE_TRITON:
        return None
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return pa.prefill_attention_triton
    return None


# ---- the kernel alone ----


def kernel(args: argparse.Namespace, device: torch.device) -> dict:
    from dynamo_lite.engines.reference import prefill_attention as pa
    from dynamo_lite.engines.reference.attention import prefill_attention

    cfg = config_of("20b", args.tiny)
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    window = cfg.sliding_window
    n, prompts = args.prompt_len, args.prompts
    result: dict[str, Any] = {"heads": nh, "kv_heads": nkv, "head_dim": hd, "window": window}
    result |= {"prompts": prompts, "prompt_len": n}
    flash = flash_fn(device)
    gen = torch.Generator(device=device).manual_seed(0)
    # One fused qkv buffer for all prompts, as a prefill step holds it; each prompt reads its rows.
    qkv = torch.randn(prompts * n, nh + 2 * nkv, hd, generator=gen, device=device).to(torch.bfloat16)
    sinks = torch.randn(nh, generator=gen, device=device) * 2
    scale = hd**-0.5
    views = [(qkv[p * n : (p + 1) * n, :nh], qkv[p * n : (p + 1) * n, nh : nh + nkv],
              qkv[p * n : (p + 1) * n, nh + nkv :]) for p in range(prompts)]  # fmt: skip

    if flash is not None:  # correctness at this shape first: a wrong kernel's speed means nothing
        q, k, v = views[0]
        errors = {}
        for w in (0, window):
            ref = prefill_attention(q.float(), k.float(), v.float(), 0, 0, w, sinks, scale)
            got32 = flash(q.float(), k.float(), v.float(), 0, 0, w, sinks, scale)
            got16 = flash(q, k, v, 0, 0, w, sinks, scale).float()
            errors[f"window_{w}"] = {
                "fp32_max_abs": float((got32 - ref).abs().max()),
                "bf16_rel": float((got16 - ref).norm() / ref.norm()),
            }
            # A continuing chunk: the second half of the prompt over the whole prompt's keys (a full layer's
            # cache) or the window's reach before it (a sliding layer's ring), as the model passes them.
            half = n // 2
            k_start = max(0, half - w + 1) if w else 0
            ref_c = prefill_attention(
                q[half:].float(), k[k_start:].float(), v[k_start:].float(), half, k_start, w, sinks, scale
            )
            got_c = flash(
                q[half:].float(), k[k_start:].float(), v[k_start:].float(), half, k_start, w, sinks, scale
            )
            errors[f"window_{w}"]["continuing_fp32_max_abs"] = float((got_c - ref_c).abs().max())
        result["errors"] = errors
        log(f"flash vs eager errors: {errors}")

    layers: dict[str, dict] = {}
    configs = pa.CANDIDATE_CONFIGS if device.type == "cuda" else pa.CANDIDATE_CONFIGS[:1]
    for label, w in (("full", 0), ("sliding", window)):
        flops = attention_flops(cfg, n, w) * prompts
        row: dict[str, Any] = {"tflop": flops / 1e12}

        def run_all(fn: Any, w: int = w, **kw: Any) -> None:
            for q, k, v in views:
                fn(q, k, v, 0, 0, w, sinks, scale, **kw)

        try:
            t = time_it(lambda: run_all(prefill_attention), device, args.iters)
            row["eager_ms"] = t * 1e3
            row["eager_tflops"] = flops / t / 1e12
        except Exception as e:  # e.g. out of memory: the flash rows still count
            row["eager_error"] = repr(e)
        if flash is not None:
            row["flash"] = []
            for c in configs:
                entry: dict[str, Any] = {"config": [c.block_m, c.block_n, c.num_warps, c.num_stages]}
                try:
                    t = time_it(lambda c=c: run_all(flash, config=c), device, args.iters)
                    entry |= {"ms": t * 1e3, "tflops": flops / t / 1e12}
                except Exception as e:  # a tile shape that does not compile here: the others still run
                    entry["error"] = repr(e)[:300]
                row["flash"].append(entry)
            default = row["flash"][0]  # the engine's configuration
            timed = [r for r in row["flash"] if "ms" in r]
            if "ms" in default:
                row["flash_default_ms"] = default["ms"]
                if "eager_ms" in row:
                    row["speedup_default"] = row["eager_ms"] / default["ms"]
            if timed:
                row["flash_best"] = min(timed, key=lambda r: r["ms"])
                if "eager_ms" in row:
                    row["speedup_best"] = row["eager_ms"] / row["flash_best"]["ms"]
        layers[label] = row
        log(f"{label} layer, {prompts} x {n} tokens: {json.dumps(row)}")
    result["per_layer"] = layers
    shapes = {}
    for shape in ("tiny",) if args.tiny else args.shapes:
        scfg = config_of(shape, shape == "tiny")
        full = sum(1 for w in scfg.layer_windows if not w)
        sliding = scfg.num_layers - full
        row = {"layers_full": full, "layers_sliding": sliding}
        for impl, key in (("eager", "eager_ms"), ("flash", "flash_default_ms")):
            if layers["full"].get(key) is not None and layers["sliding"].get(key) is not None:
                row[f"{impl}_ms"] = full * layers["full"][key] + sliding * layers["sliding"][key]
        if "eager_ms" in row and "flash_ms" in row:
            row["speedup"] = row["eager_ms"] / row["flash_ms"]
        shapes[shape] = row
        log(f"{shape}: attention of one prefill of {prompts} x {n} tokens: {json.dumps(row)}")
    result["per_model"] = shapes
    return result


# ---- the whole model's prefill ----


def model(args: argparse.Namespace, device: torch.device) -> dict:
    from dynamo_lite.engines.reference import decode_attention
    from dynamo_lite.engines.reference.gpt_oss_loader import random_gpt_oss_weights
    from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
    from dynamo_lite.engines.reference.kv_cache import KvCache
    from dynamo_lite.engines.reference.model import build_step

    cfg = config_of(args.shape, args.tiny)
    shape = "tiny" if args.tiny else args.shape
    n, prompts = args.prompt_len, args.prompts
    dtype = torch.bfloat16
    result: dict[str, Any] = {"shape": shape, "quantization": args.quantization, "prompts": prompts,
                              "prompt_len": n}  # fmt: skip
    peak, peak_source = peak_flops(device)
    result |= {"peak_flops": peak, "peak_source": peak_source}
    log(f"peak: {peak_source}")
    if device.type == "cuda" and not args.tiny:
        rate = matmul_rate(device)
        result["measured_matmul_tflops"] = rate / 1e12
        log(f"measured 8192^3 bf16 matmul: {rate / 1e12:.0f} TFLOP/s")
    fpt = flops_per_token(cfg, n)
    result["flops_per_token"] = fpt
    log(f"FLOPs/token: {fpt['total'] / 1e9:.3f} G ({fpt['active_params'] / 1e9:.3f} G active params w/o "
        f"embedding/head; attention {fpt['attention'] / 1e6:.1f} M)")  # fmt: skip
    started = time.perf_counter()
    weights = random_gpt_oss_weights(cfg, dtype, device, mxfp4=args.quantization == "mxfp4")
    sync(device)
    log(
        f"random {shape}-shape weights ({args.quantization} experts) in {time.perf_counter() - started:.1f} s"
    )
    max_seq = n + 16
    per_step = max(1, min(prompts, args.step_tokens // n))
    cache = KvCache(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, per_step, max_seq, dtype, device, cfg.layer_windows
    )
    gen = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for _ in range(prompts)]
    steps = []
    for s0 in range(0, prompts, per_step):  # each step prefills `per_step` whole prompts into slots 0..
        group = prompt_ids[s0 : s0 + per_step]
        rows = [(i + 1) * n - 1 for i in range(len(group))]
        steps.append(build_step([], [(i, 0, ids) for i, ids in enumerate(group)], rows, device))
    result["prompts_per_step"] = per_step
    decode = decode_attention.decode_attention_triton if device.type == "cuda" else None
    flash = flash_fn(device)
    runs: dict[str, dict] = {}
    for impl, fn in (("flash", flash), ("eager", None)):
        if impl == "flash" and fn is None:
            runs[impl] = {"skipped": "no CUDA and not TRITON_INTERPRET=1"}
            continue
        m = GptOssModel(cfg, weights, max_seq, decode, prefill_attention=fn)
        result["moe_impl"] = m.moe_impl

        def prefill_all(m: GptOssModel = m) -> torch.Tensor:
            out = None
            for batch in steps:
                out = m.forward(batch, cache)
            return out

        try:
            with torch.inference_mode():
                t = time_it(prefill_all, device, iters=args.iters if device.type == "cuda" else 1, warmup=1)
            tokens = prompts * n
            rate = tokens / t
            run = {"seconds": t, "tokens_per_s": rate, "tflops": rate * fpt["total"] / 1e12}
            if peak == peak:  # not NaN
                run["pct_of_peak"] = 100 * rate * fpt["total"] / peak
            runs[impl] = run
            log(f"{shape} prefill, {impl} attention: {json.dumps(run)}")
        except Exception as e:
            runs[impl] = {"error": repr(e)[:500]}
            log(f"{shape} prefill, {impl} attention failed: {e!r}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["prefill"] = runs
    if "tokens_per_s" in runs.get("flash", {}) and "tokens_per_s" in runs.get("eager", {}):
        result["speedup"] = runs["flash"]["tokens_per_s"] / runs["eager"]["tokens_per_s"]
    try:
        with torch.inference_mode():
            result["parts_one_step"] = parts(cfg, weights, flash, steps[0], device, args.iters)
    except Exception as e:
        result["parts_one_step"] = {"error": repr(e)[:500]}
    return result


def parts(cfg: Any, weights: Any, flash: Any, batch: Any, device: torch.device, iters: int) -> dict:
    """One step's pieces over all layers, timed alone on the step's token count (random activations)."""
    import torch.nn.functional as F

    from dynamo_lite.engines.reference.attention import prefill_attention
    from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
    from dynamo_lite.engines.reference.rope import rope_

    m = GptOssModel(cfg, weights, batch.positions.numel() + 16, None, prefill_attention=flash)
    tokens = batch.input_ids.shape[0]
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gen = torch.Generator(device=device).manual_seed(2)
    h = torch.randn(tokens, cfg.hidden_size, generator=gen, device=device).to(m.dtype)
    qkv = torch.randn(tokens, nh + 2 * nkv, hd, generator=gen, device=device).to(m.dtype)
    attn = torch.randn(tokens, nh * hd, generator=gen, device=device).to(m.dtype)
    attention_impl = flash or prefill_attention

    def attention() -> None:
        for i, lw in enumerate(weights.layers):
            for c in batch.prefills:
                sl = slice(c.offset, c.offset + c.length)
                attention_impl(qkv[sl, :nh], qkv[sl, nh : nh + nkv], qkv[sl, nh + nkv :], 0, 0, m.windows[i],
                               lw.sinks, m.scale)  # fmt: skip

    def linears() -> None:
        for i in range(cfg.num_layers):
            m._qkv[i](h)
            m._o[i](attn)

    def experts() -> None:
        for i in range(cfg.num_layers):
            m._mlp(i, h)

    def norms_rope() -> None:
        cos = m.cos[batch.positions].unsqueeze(1)
        sin = m.sin[batch.positions].unsqueeze(1)
        for lw in weights.layers:
            F.rms_norm(h, (cfg.hidden_size,), lw.input_norm, cfg.rms_norm_eps)
            rope_(qkv[:, : nh + nkv], cos, sin)  # the model's own (in place)

    out: dict[str, Any] = {"tokens": tokens}
    for name, fn in (("attention", attention), ("qkv_o_linears", linears), ("mlp_router_experts", experts),
                     ("norm_rope", norms_rope)):  # fmt: skip
        try:
            out[f"{name}_ms"] = time_it(fn, device, iters=max(1, iters // 2), warmup=1) * 1e3
        except Exception as e:
            out[f"{name}_error"] = repr(e)[:300]
    log(f"one step's parts ({tokens} tokens, all layers): {json.dumps(out)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["kernel", "model"])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tiny", action="store_true", help="the tiny shape (with --device cpu: a smoke test)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="20b", help="model: gpt-oss-20b or -120b")
    p.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=["20b", "120b"], help="kernel: totals"
    )
    p.add_argument(
        "--quantization", choices=["none", "mxfp4"], default="mxfp4", help="model: the experts' format"
    )
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--step-tokens", type=int, default=16384, help="model: prefill tokens per step")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "what": args.what,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    try:
        result |= kernel(args, device) if args.what == "kernel" else model(args, device)
    except Exception as e:
        import traceback

        traceback.print_exc()
        result["error"] = repr(e)
    result["seconds"] = time.perf_counter() - started
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text, flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())

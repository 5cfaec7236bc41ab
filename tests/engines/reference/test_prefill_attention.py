"""The flash prefill attention (Triton) against the eager chunked prefill attention, run by Triton's CPU
interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set before triton is imported): fp32 within 1e-5 and
bf16 within bf16 rounding, across lengths, GQA groups, windows (none, the tiny model's 16, gpt-oss's 128), chunks
that continue after cached positions, tile shapes, with and without sinks; then the tiny gpt-oss with the kernel
as its prefill attention: the same logits through chunked prefill and the same greedy tokens on the engine's test
prompts. On a GPU the same kernel is timed and checked at the real shapes by
``benchmarks/gpu/prefill_attention.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from gpt_oss_testing import tiny_folder
from reference_testing import project_env

from dynamo_lite.engines.reference import prefill_attention as pa

ROOT = Path(__file__).resolve().parents[3]

_KERNEL_CHECK = """
import torch
from dynamo_lite.engines.reference.attention import prefill_attention
from dynamo_lite.engines.reference.prefill_attention import FlashConfig, prefill_attention_triton

gen = torch.Generator().manual_seed(0)
SMALL = (FlashConfig(16, 16), FlashConfig(16, 32), FlashConfig(32, 16))


def case(n, q_start, window, heads, kv_heads, head_dim, cached_window):
    # Keys as the model passes them: a first chunk sees its own keys; a continuing chunk of a full layer sees the
    # cache from 0, of a windowed layer the `window - 1` positions before it (the ring) then its own.
    k_start = max(0, q_start - cached_window + 1) if cached_window and q_start else 0
    m = q_start + n - k_start
    fused = torch.randn(n, heads + 2 * kv_heads, head_dim, generator=gen)
    q = fused[:, :heads]  # a strided view, as the fused qkv buffer gives it
    cache = torch.randn(kv_heads, m + 5, head_dim, generator=gen)
    k = cache[:, :m].transpose(0, 1)  # a cache slot's layout: [KVH, positions, D] seen as [m, KVH, D]
    v = torch.randn(m, kv_heads, head_dim, generator=gen)
    sinks = torch.randn(heads, generator=gen) * 2
    return q, k, v, q_start, k_start, window, sinks, head_dim**-0.5


CASES = [  # n, q_start, window, heads, kv_heads, head_dim, window of the cached keys
    (1, 0, 0, 4, 2, 16, 0),
    (5, 0, 16, 4, 2, 16, 16),
    (16, 0, 16, 4, 2, 16, 16),
    (37, 0, 0, 4, 2, 16, 0),
    (70, 0, 16, 4, 2, 16, 16),
    (9, 23, 0, 4, 2, 16, 0),  # a chunk after 23 cached positions, full attention
    (9, 23, 16, 4, 2, 16, 16),  # ... windowed: the ring's 15 positions before it
    (40, 7, 16, 4, 2, 16, 16),  # continuing inside the window's reach
    (1, 60, 16, 4, 2, 16, 16),  # one token after the ring wrapped
    (33, 17, 0, 8, 1, 64, 0),  # gpt-oss's 8 query heads per kv head, head dim 64
    (200, 0, 128, 8, 1, 64, 128),  # gpt-oss's window
    (60, 150, 128, 8, 1, 64, 128),
    (60, 150, 0, 8, 1, 64, 0),
]
for n, q_start, window, heads, kv_heads, hd, cached in CASES:
    args = case(n, q_start, window, heads, kv_heads, hd, cached)
    ref = prefill_attention(*args)
    for cfg in SMALL:
        got = prefill_attention_triton(*args, config=cfg)
        assert got.shape == ref.shape and got.dtype == torch.float32
        err = float((got - ref).abs().max())
        assert err < 1e-5, (n, q_start, window, cfg, err)
    # Without sinks: the plain causal/windowed softmax (a huge negative sink is the same thing eagerly).
    q, k, v, qs, ks, w, _, scale = args
    none = prefill_attention_triton(q, k, v, qs, ks, w, None, scale, config=SMALL[0])
    eager = prefill_attention(q, k, v, qs, ks, w, torch.full((heads,), -1e30), scale)
    assert float((none - eager).abs().max()) < 1e-5, (n, q_start, window, "no sinks")

for n, q_start, window, heads, kv_heads, hd, cached in CASES[3:]:
    q, k, v, qs, ks, w, sinks, scale = case(n, q_start, window, heads, kv_heads, hd, cached)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = prefill_attention(qb.float(), kb.float(), vb.float(), qs, ks, w, sinks, scale)
    eager = prefill_attention(qb, kb, vb, qs, ks, w, sinks, scale)  # scores rounded to bf16 on the way
    got = prefill_attention_triton(qb, kb, vb, qs, ks, w, sinks, scale, config=SMALL[1])
    assert got.dtype == torch.bfloat16
    err = float((got.float() - exact).norm() / exact.norm())
    assert err < 1e-2, (n, q_start, window, err)  # bf16 inputs and output: the output's own rounding
    torch.testing.assert_close(got.float(), eager.float(), atol=3e-2, rtol=2e-2)
print("kernel ok")
"""

_MODEL_CHECK = """
import sys
from pathlib import Path

import torch
from gpt_oss_testing import NEW_TOKENS, WINDOW, prompts

from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, load_gpt_oss_weights
from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.model import build_step
from dynamo_lite.engines.reference.prefill_attention import prefill_attention_triton

cpu = torch.device("cpu")
folder = Path(sys.argv[1])
cfg = GptOssConfig.from_folder(folder)
weights = load_gpt_oss_weights(folder, cfg, torch.float32, cpu)
eager = GptOssModel(cfg, weights, max_seq_len=128)
flash = GptOssModel(cfg, weights, max_seq_len=128, prefill_attention=prefill_attention_triton)
assert eager.prefill_attention is None and flash.prefill_attention is prefill_attention_triton


def new_cache(slots=8):
    return KvCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, slots, 128, torch.float32, cpu, cfg.layer_windows)


# Chunks that start inside, at and past the window's reach; every row's logits.
ids = torch.randint(0, 199_998, (60,), generator=torch.Generator().manual_seed(2)).tolist()
caches = {model: new_cache() for model in (eager, flash)}
start = 0
for n in (7, WINDOW, 3, WINDOW + 9, 9):  # ends at 7, 23, 26, 51, 60
    out = {m: m.forward(build_step([], [(2, start, ids[start:start + n])], list(range(n)), cpu), c)
           for m, c in caches.items()}
    err = float((out[flash] - out[eager]).abs().max())
    assert err < 1e-5, (start, n, err)
    start += n

# The engine's test prompts prefilled in one step (eight chunks), then greedy decode: the same tokens.
def greedy(model):
    cache, ps = new_cache(), prompts()
    rows = [sum(len(p) for p in ps[: i + 1]) - 1 for i in range(len(ps))]
    logits = model.forward(build_step([], [(i, 0, p) for i, p in enumerate(ps)], rows, cpu), cache)
    tokens = [[t] for t in logits.argmax(-1).tolist()]
    for step in range(NEW_TOKENS - 1):
        decode = [(i, len(p) + step, tokens[i][-1]) for i, p in enumerate(ps)]
        logits = model.forward(build_step(decode, [], list(range(len(ps))), cpu), cache)
        for i, t in enumerate(logits.argmax(-1).tolist()):
            tokens[i].append(t)
    return tokens, logits


(want, want_logits), (got, got_logits) = greedy(eager), greedy(flash)
assert got == want, (got, want)
assert float((got_logits - want_logits).abs().max()) < 1e-4
print("model ok")
"""


def _interpret(script: str, *args: str) -> None:
    pytest.importorskip("triton")
    env = project_env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path(__file__).parent)])
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def test_flash_kernel_equals_the_eager_attention_in_the_interpreter() -> None:
    """fp32 within 1e-5 for every case and tile shape, without sinks too; bf16 within the output's rounding."""
    _interpret(_KERNEL_CHECK)


def test_tiny_gpt_oss_with_the_flash_prefill_keeps_its_logits_and_tokens(tmp_path_factory) -> None:  # noqa: ANN001
    """Chunked prefill across the window: every row's logits within 1e-5 of the eager path; eight prompts in
    one step then 20 greedy decode steps: the same tokens."""
    _interpret(_MODEL_CHECK, str(tiny_folder(tmp_path_factory)))


_COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dynamo_lite.engines.reference import prefill_attention as pa

fn = pa._prefill_kernel
ints = ["n", "q_start", "k_start", "window", "stride_qn", "stride_qh", "stride_kn", "stride_kh", "stride_vn",
        "stride_vh", "stride_on"]
CASES = (("bf16", False, True, pa.DEFAULT_CONFIG), ("fp32", True, False, pa.CANDIDATE_CONFIGS[-1]))
for dtype, ieee, windowed, cfg in CASES:
    consts = dict(GROUP=8, HEAD_DIM=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, WINDOWED=windowed, HAS_SINKS=True,
                  IEEE=ieee, UPCAST=False, INTERPRETED=False)
    sig = {**{k: "*" + dtype for k in ("Q", "K", "V", "Out")}, "Sinks": "*fp32", "qk_scale": "fp32",
           **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    assert ieee or "wgmma" in kernel.asm["ptx"], "bf16 without Hopper tensor-core products"  # fp32: exact FMAs
print("compiled")
"""


def test_the_compiled_kernel_builds_for_hopper() -> None:
    """The path the interpreter does not take (``range`` loops, constexpr branches, tensor-core products)
    compiled ahead of time for sm_90 without a GPU: bf16 windowed at the default tiles, fp32 (IEEE) full."""
    pytest.importorskip("triton")
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_COMPILE_CHECK)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=project_env(),
    )  # fmt: skip
    if run.returncode and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert run.returncode == 0, run.stderr[-4000:]


def test_the_kernel_is_used_only_where_it_runs() -> None:
    """No CUDA (CI): the engine keeps the eager attention; the checks that would pick the kernel say no."""
    assert not pa.triton_supported(torch.bfloat16, 64, torch.device("cpu"))
    if pa.HAVE_TRITON and torch.cuda.is_available():
        dev = torch.device("cuda")
        assert pa.triton_supported(torch.bfloat16, 64, dev)
        assert pa.self_check(torch.bfloat16, 64, 8, 64, dev, 128) < 2e-2
        assert pa.self_check(torch.float32, 64, 8, 64, dev, 128) < 1e-5


def test_chunk_keys_must_cover_the_queries() -> None:
    q = torch.zeros(4, 2, 16)
    k = torch.zeros(3, 1, 16)
    with pytest.raises(ValueError, match="do not cover"):
        pa.prefill_attention_triton(q, k, k, 0, 0, 0, None, 0.25)

"""gpt-oss's rotary embedding: the one-pass Triton kernel gives the torch form's bits on the GPU, on a strided
view of a fused qkv as the model calls it; in Triton's interpreter (CPU) fp32 bit for bit and bf16 within one
rounding (the interpreter rounds fp32 -> bf16 half-up, not to nearest even)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference_testing import project_env

ROOT = Path(__file__).resolve().parents[3]

_CHECK = """
import torch
from dynamo_lite.engines.reference import rope

def check(device, dtype, tokens, heads, extra, head_dim=64):
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + extra) * head_dim, generator=gen).to(device=device, dtype=dtype)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(device=device, dtype=dtype)[:, None]
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(device=device, dtype=dtype)[:, None]
    # the last `extra` of the rotated heads are k heads, followed by as many v heads (gpt-oss's q|k|v)
    index = torch.randperm(3 * tokens * 2 * extra, generator=gen)[: tokens * 2 * extra].to(device)
    expected = qkv.clone()
    rope.rope_torch_(expected[:, : heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    expected_rows = torch.zeros(3 * tokens * 2 * extra, head_dim, dtype=dtype, device=device)
    expected_rows.index_copy_(0, index, expected[:, (heads - extra) * head_dim :].reshape(-1, head_dim))
    for store in (False, True):
        got = qkv.clone()
        rows = torch.zeros_like(expected_rows)
        view = got[:, : heads * head_dim].view(tokens, heads, head_dim)  # rows strided by the whole qkv
        assert tokens == 1 or view.stride(0) != heads * head_dim
        rope._rope_kernel[(tokens,)](view, view.stride(0), cos, sin, cos.stride(0), rows, index, HEADS=heads,
                                     HEAD_DIM=head_dim, BLOCK_H=16, KV_HEADS=extra if store else 0,
                                     num_warps=4, enable_fp_fusion=False)
        if dtype == torch.float32 or device != "cpu":
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(got.view(bits), expected.view(bits)), (dtype, heads)
            if store:  # the cache rows hold the rotated k heads and the v heads, bit for bit
                assert torch.equal(rows.view(bits), expected_rows.view(bits)), (dtype, heads)
        else:
            torch.testing.assert_close(got, expected, atol=2**-4, rtol=2**-7)  # a rounding of either product
            if store:
                torch.testing.assert_close(rows, expected_rows, atol=2**-4, rtol=2**-7)
                assert torch.equal(rows[index].view(tokens, -1), got[:, (heads - extra) * head_dim :])
        assert torch.equal(got[:, heads * head_dim :], qkv[:, heads * head_dim :])  # v untouched
        if not store:
            assert not rows.any()

    # rope_ with a store on this device: the kernel on CUDA, the torch form + index_copy_ elsewhere
    got = qkv.clone()
    rows = torch.zeros_like(expected_rows)
    view = got[:, : heads * head_dim].view(tokens, heads, head_dim)
    store = (got[:, (heads - extra) * head_dim :], rows, index)
    assert rope.kernel_applies(view, cos, sin, store) == (DEVICE != "cpu")  # one row too (any stride(0))
    rope.rope_(view, cos, sin, store)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.view(bits), expected.view(bits)) and torch.equal(rows.view(bits), expected_rows.view(bits))

for dtype in (torch.bfloat16, torch.float32):
    for tokens, heads, extra in ((5, 72, 8), (3, 12, 4), (1, 20, 2)):
        check(DEVICE, dtype, tokens, heads, extra)
print("rope ok")
"""


def _run(device: str, interpret: bool) -> subprocess.CompletedProcess:
    env = project_env()
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    code = textwrap.dedent(_CHECK).replace("DEVICE", repr(device))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env
    )


def test_the_rope_kernel_gives_the_torch_forms_bits_in_the_interpreter() -> None:
    pytest.importorskip("triton")
    run = _run("cpu", interpret=True)
    assert run.returncode == 0 and "rope ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_rope_kernel_gives_the_torch_forms_bits_on_the_gpu() -> None:
    run = _run("cuda", interpret=False)
    assert run.returncode == 0 and "rope ok" in run.stdout, run.stderr[-3000:]

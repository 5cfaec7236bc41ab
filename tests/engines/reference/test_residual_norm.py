"""The residual add + RMSNorm kernel, and its form that first sums the routed experts' fp32 partial outputs,
against torch's ops (Triton's interpreter on CPUs, the kernel itself on CUDA)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference_testing import project_env

from dynamo_lite.engines.reference import residual_norm

pytest.importorskip("triton")

_CHECK = """
import torch
import torch.nn.functional as F
from dynamo_lite.engines.reference import residual_norm as rn

DEVICE = {device!r}
gen = torch.Generator().manual_seed(0)
for tokens, hidden, slices, top_k, dtype in ((1, 2880, 2, 4, torch.bfloat16), (7, 96, 1, 4, torch.bfloat16),
                                             (3, 64, 3, 2, torch.float16), (5, 200, 1, 1, torch.float32)):
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(DEVICE, dtype)
    delta = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    parts = torch.randn(slices, tokens, top_k, hidden, generator=gen).to(DEVICE)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2**-4, rtol=2**-6)  # |y| up to ~8
    for given, y in ((delta, delta), (parts, parts.sum(dim=(0, 2)).to(dtype))):
        want_sum = x + y
        got_sum, got_norm = rn._launch(x, given, weight, 1e-5, slices=slices if given is parts else 0,
                                       top_k=top_k if given is parts else 0)
        assert got_sum.dtype == got_norm.dtype == dtype and got_norm.shape == x.shape
        # one add rounded once (the interpreter rounds fp32 -> bf16/fp16 half-up, not to nearest even)
        if given is delta and (DEVICE != "cpu" or dtype == torch.float32):
            assert torch.equal(got_sum, want_sum), (tokens, hidden)
        else:  # the sum's order over slices and experts may differ from torch's by an fp32 rounding
            torch.testing.assert_close(got_sum, want_sum, **tol)
        want_norm = F.rms_norm(got_sum.float(), (hidden,), weight.float(), 1e-5)  # the norm of the sum it kept
        torch.testing.assert_close(got_norm.float(), want_norm, atol=2e-6 if dtype == torch.float32 else 2**-6,
                                   rtol=2e-6 if dtype == torch.float32 else 2**-7)
print("residual norm ok")
"""


def _run(device: str, interpret: bool) -> subprocess.CompletedProcess:
    env = project_env(**({"TRITON_INTERPRET": "1"} if interpret else {}))
    code = _CHECK.format(device=device)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_fused_residual_norm_matches_torch_in_the_interpreter() -> None:
    run = _run("cpu", interpret=True)
    assert run.returncode == 0 and "residual norm ok" in run.stdout, run.stderr[-3000:]


def test_other_devices_and_dtypes_keep_torchs_ops() -> None:
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert not residual_norm.fused_applies(x)
    weight, delta = torch.rand(16, dtype=torch.bfloat16), torch.randn(3, 16, dtype=torch.bfloat16)
    summed, normed = residual_norm.add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(summed, x + delta)
    assert torch.equal(normed, torch.nn.functional.rms_norm(x + delta, (16,), weight, 1e-5))
    parts = torch.randn(2, 3, 4, 16)
    summed, normed = residual_norm.moe_add_rms_norm(parts, x, weight, 1e-5)
    assert torch.equal(summed, x + parts.sum(dim=(0, 2)).to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_residual_norm_matches_torch_on_cuda() -> None:
    assert residual_norm.fused_applies(torch.zeros(2, 8, device="cuda", dtype=torch.bfloat16))
    assert not residual_norm.fused_applies(torch.zeros(2, 8, device="cuda"))  # fp32 keeps torch's ops
    run = _run("cuda", interpret=False)
    assert run.returncode == 0 and "residual norm ok" in run.stdout, run.stderr[-3000:]

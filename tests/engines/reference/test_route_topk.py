"""The router's fused top-k + softmax against torch's ``topk`` then ``softmax`` (Triton's interpreter on CPUs, the
kernel itself on CUDA)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from reference_testing import project_env

pytest.importorskip("triton")

_CHECK = """
import torch
from dynamo_lite.engines.reference import route_topk

gen = torch.Generator().manual_seed(0)
for tokens, experts, top_k, dtype in ((1, 128, 4, torch.bfloat16), (37, 32, 4, torch.bfloat16),
                                      (5, 8, 2, torch.float16), (3, 20, 3, torch.bfloat16)):
    logits = torch.randn(tokens, experts, generator=gen).to(dtype)
    logits[0, 3] = logits[0, 5] = logits[0].max() + 1  # a tie: the lower expert id first
    weights, ids = route_topk.topk_softmax(logits, top_k)
    top, want_ids = torch.topk(logits.float(), top_k, dim=-1)
    want = torch.softmax(top, dim=1).to(dtype)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert ids[0, :2].tolist() == [3, 5]
    assert torch.equal(torch.sort(ids, dim=1).values, torch.sort(want_ids, dim=1).values)
    # numpy's expf here, not CUDA's: the rounding to bf16/fp16 may land one unit apart (on CUDA: equal)
    assert torch.allclose(weights.float(), want.float(), rtol=2**-7, atol=0), (weights - want).abs().max()
assert not route_topk.fused_topk_applies(torch.zeros(2, 8, dtype=torch.bfloat16))  # CPUs keep torch's ops

# the small steps' router product: fp32 sums of each expert's row, bias added, rounded once
for tokens, experts, hidden in ((1, 128, 2880), (3, 10, 96)):
    h = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w = (torch.randn(experts, hidden, generator=gen) * hidden**-0.5).bfloat16()
    b = torch.randn(experts, generator=gen).bfloat16()
    got = route_topk.router_logits(h, w, b)
    want = (h.float() @ w.float().T + b.float()).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, experts)
    torch.testing.assert_close(got.float(), want.float(), atol=2**-7, rtol=2**-7)  # the interpreter rounds half-up
"""


def test_fused_topk_softmax_matches_torch_in_the_interpreter() -> None:
    env = project_env(TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_topk_softmax_matches_torch_on_cuda() -> None:
    from dynamo_lite.engines.reference import route_topk

    assert not route_topk.fused_topk_applies(torch.zeros(2, 8, device="cuda"))  # fp32 keeps torch's ops
    gen = torch.Generator(device="cuda").manual_seed(1)
    for tokens in (1, 64, 4096):
        logits = torch.randn(tokens, 128, generator=gen, device="cuda").bfloat16()
        weights, ids = route_topk.topk_softmax(logits, 4)
        top, want_ids = torch.topk(logits, 4, dim=-1)
        assert torch.equal(ids, want_ids) or torch.equal(logits.gather(1, ids), top)
        assert torch.equal(weights, torch.softmax(top, dim=1, dtype=top.dtype))
    for tokens in (1, 8):  # the small steps' router product against cuBLAS's (fp32 sums in another order)
        h = torch.randn(tokens, 2880, generator=gen, device="cuda").bfloat16()
        w = (torch.randn(128, 2880, generator=gen, device="cuda") * 2880**-0.5).bfloat16()
        b = torch.randn(128, generator=gen, device="cuda").bfloat16()
        assert route_topk.small_router_applies(h, w)
        got = route_topk.router_logits(h, w, b)
        torch.testing.assert_close(got, torch.nn.functional.linear(h, w, b), atol=2**-7, rtol=2**-8)

"""The torch engine's ranks on GPUs (NCCL data group): TP2 and attention-DP2 against one rank, the KV handed
from a head-split prefill to an attention-DP decode through device memory rank by rank (each prefill rank writing
its KV heads into rank 0's CUDA hold, each decode rank copying its sequences out of it, all by CUDA IPC; nothing
relayed over NCCL), and a follower killed mid-stream (the NCCL group aborted). Needs 2 GPUs; skipped
elsewhere. ``bash benchmarks/gpu/run_ranks.sh check`` runs it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import torch

from dynamo_lite.engines.base import EngineError
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.protocol import GenerateRequest, Phase, SamplingOptions
from tests.engines.reference.test_ranks import generate, probe_logits, prompts, request, settings, tokens

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-gpt-oss"))


def on_cuda(folder: Path, mode: str = "agg", **kw: object):  # noqa: ANN201
    return build_engine(dataclasses.replace(settings(folder, mode, **kw), device="cuda:0"))


async def run(engine) -> dict:  # noqa: ANN001
    await engine.start()
    try:
        with torch.cuda.device(0):
            logits = [t.float().cpu() for t in probe_logits(engine)]
        got = await asyncio.gather(*(generate(engine, request(i, ids)) for i, ids in enumerate(prompts())))
        return {"logits": logits, "tokens": [tokens(c) for c in got]}
    finally:
        await engine.stop()


@pytest.fixture(scope="module")
def one_rank(gpt_oss: Path) -> dict:
    return asyncio.run(run(on_cuda(gpt_oss)))


@pytest.mark.parametrize(
    "kw", [{"tp": 2, "ep": 2}, {"tp": 2, "ep": 2, "dp": True}], ids=["tp2", "attention-dp2"]
)
def test_two_gpus_match_one(kw: dict, one_rank: dict, gpt_oss: Path) -> None:
    ranked = asyncio.run(run(on_cuda(gpt_oss, **kw)))
    for got, want in zip(ranked["logits"], one_rank["logits"], strict=True):
        assert float((got - want).abs().max()) < 1e-4  # fp32; NCCL sums in another order than one GPU
    assert ranked["tokens"] == one_rank["tokens"]


def test_kv_handoff_through_device_memory(one_rank: dict, gpt_oss: Path) -> None:
    async def go() -> tuple[list[list[int]], object, object]:
        prefill = on_cuda(gpt_oss, "prefill", tp=2, ep=2)
        decode = on_cuda(gpt_oss, "decode", tp=2, ep=2, dp=True)
        await prefill.start()
        await decode.start()
        try:

            async def one(i: int, ids: list[int]) -> list[int]:
                first = await generate(prefill, request(i, ids, phase=Phase.PREFILL))
                rest = await generate(
                    decode,
                    request(i, ids, phase=Phase.DECODE, kv=first[0].kv, generated_ids=first[0].token_ids),
                )
                return [*first[0].token_ids, *tokens(rest)]

            out = list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts()))))
            return out, decode.stats(), (prefill._runner.state, decode._runner.state)
        finally:
            await prefill.stop()
            await decode.stop()

    got, stats, (sent, received) = asyncio.run(go())
    assert got == one_rank["tokens"] and stats.kv_recomputes == 0
    for name, state in (("prefill", sent), ("decode", received)):
        print(
            f"{name} KV bytes per rank (direct, relayed): {state.kv_bytes_by_rank} {state.kv_relayed_by_rank}"
        )
    # Each prefill rank wrote its half of the heads, each sequence's owning decode rank copied all of them.
    total = stats.kv_transfer_bytes
    assert sent.kv_bytes_by_rank == [total // 2] * 2 and not any(sent.kv_relayed_by_rank)
    assert sum(received.kv_bytes_by_rank) == total and not any(received.kv_relayed_by_rank)


def test_a_follower_killed_mid_stream_fails_the_stream(gpt_oss: Path) -> None:
    async def go() -> float:
        engine = on_cuda(gpt_oss, tp=2, ep=2)
        await engine.start()
        [follower] = engine._ranks.pids
        opts = SamplingOptions(max_tokens=60, temperature=0.0, ignore_eos=True)
        req = GenerateRequest(request_id="r", model="tiny", token_ids=[1, 2, 3], sampling=opts)
        killed_at = 0.0
        try:
            with pytest.raises(EngineError):
                async with aclosing(engine.generate(req)) as chunks:
                    async for chunk in chunks:
                        if chunk.token_ids and not killed_at:
                            os.kill(follower, signal.SIGKILL)
                            killed_at = time.monotonic()
            return time.monotonic() - killed_at
        finally:
            await engine.stop()

    took = asyncio.run(go())
    print(f"stream failed {took:.3f} s after the kill")
    assert took < 2.0

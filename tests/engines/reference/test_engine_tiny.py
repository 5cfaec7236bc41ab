"""The engine end to end on a tiny random llama (no model package needed, seconds to run): streaming,
batching, the prefill → decode KV handoff over both transports, cancellation — on CPU, and on CUDA where
present (the same tokens as on CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from reference_testing import collect, request, tokens, write_tiny_hf_llama

from dynamo_lite.engines.base import EngineError, EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.protocol import FinishReason, Phase

transformers = pytest.importorskip("transformers")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
PROMPTS = [list(range(3, 40)), [5, 9, 11], list(range(100, 20, -1))]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):  # noqa: ANN001
    return write_tiny_hf_llama(tmp_path_factory.mktemp("tiny-llama"))


def settings(folder, mode: str, device: str = "cpu", **extra: object) -> EngineSettings:  # noqa: ANN001
    return EngineSettings(
        role=mode, model_path=str(folder), device=device, dtype="float32", threads=2, max_batch_size=3,
        max_num_tokens=16, max_seq_len=128, extra=dict(extra),
    )  # fmt: skip


async def started(s: EngineSettings):  # noqa: ANN201
    engine = build_engine(s)
    await engine.start()
    return engine


@pytest.mark.parametrize("device", DEVICES)
async def test_batch_equals_alone_and_cpu(tiny_folder, device: str) -> None:
    engine = await started(settings(tiny_folder, "agg", device))
    try:
        reqs = [request(p, str(i), max_tokens=12, ignore_eos=True) for i, p in enumerate(PROMPTS)]
        alone = [tokens(await collect(engine, r)) for r in reqs]
        # 4 requests for 3 slots: one waits for a slot; prompts are chunked 16 tokens per step.
        together = await asyncio.gather(*(collect(engine, r) for r in [*reqs, reqs[0]]))
        assert [tokens(c) for c in together] == [*alone, alone[0]]
        assert all(c[-1].finish_reason == FinishReason.LENGTH for c in together)
    finally:
        await engine.stop()
    if device == "cuda":
        cpu = await started(settings(tiny_folder, "agg", "cpu"))
        try:
            assert [tokens(await collect(cpu, r)) for r in reqs] == alone
        finally:
            await cpu.stop()


@pytest.mark.parametrize("use_shm", [True, False])
async def test_handoff_over_shm_and_tcp(tiny_folder, use_shm: bool) -> None:
    agg = await started(settings(tiny_folder, "agg"))
    prefill = await started(settings(tiny_folder, "prefill", kv_use_shm=use_shm))
    decode = await started(settings(tiny_folder, "decode", kv_use_shm=use_shm))
    try:
        for prompt in PROMPTS:
            expected = tokens(await collect(agg, request(prompt, max_tokens=10, ignore_eos=True)))
            first_req = request(prompt, max_tokens=10, ignore_eos=True)
            first_req.phase = Phase.PREFILL
            [first] = await collect(prefill, first_req)
            rest_req = request(prompt, max_tokens=10, ignore_eos=True)
            rest_req.phase, rest_req.kv, rest_req.generated_ids = Phase.DECODE, first.kv, first.token_ids
            rest = await collect(decode, rest_req)
            assert first.token_ids + tokens(rest) == expected
            assert rest[-1].cached_tokens == len(prompt)
        stats = decode.stats()
        assert stats.kv_transfers == len(PROMPTS) and stats.kv_recomputes == 0
        assert prefill.stats().kv_transfers == len(PROMPTS)
    finally:
        for engine in (agg, prefill, decode):
            await engine.stop()
    assert prefill.exporter is not None and prefill.exporter.held_bytes == 0


async def test_abort_frees_slot_and_stop_fails_open_streams(tiny_folder) -> None:
    engine = await started(settings(tiny_folder, "agg"))
    gen = engine.generate(request(PROMPTS[0], max_tokens=100, ignore_eos=True))
    await gen.__anext__()
    await gen.aclose()
    for _ in range(200):
        if engine.stats().active_seqs == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().active_seqs == 0
    running = engine.generate(request(PROMPTS[1], max_tokens=120, ignore_eos=True))
    await running.__anext__()
    await engine.stop()
    with pytest.raises(EngineError, match="engine stopped"):
        async for _ in running:
            pass

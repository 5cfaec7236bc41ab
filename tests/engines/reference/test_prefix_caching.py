"""Prefix caching in the torch engine: a prompt that starts with blocks a freed slot still holds skips them."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.protocol import GenerateRequest, KvEventKind, SamplingOptions

pytest.importorskip("torch")


async def generate(engine, rid: str, prompt: list[int], n: int = 6) -> tuple[list[int], int]:  # noqa: ANN001
    request = GenerateRequest(rid, "m", prompt, SamplingOptions(max_tokens=n, temperature=0, ignore_eos=True))
    tokens, cached = [], 0
    async with aclosing(engine.generate(request)) as chunks:
        async for chunk in chunks:
            tokens += chunk.token_ids
            cached = max(cached, chunk.cached_tokens)
    return tokens, cached


async def test_shared_prefix_is_reused_and_reported() -> None:
    from dynamo_lite.engines.reference import build_engine
    from dynamo_lite.model_files import ModelNotFound

    try:
        engine = build_engine(
            EngineSettings(
                dtype="float32",
                threads=2,
                max_batch_size=2,
                max_seq_len=512,
                extra={"enable_prefix_caching": True, "kv_block_size": 16},
            )
        )
    except ModelNotFound as e:
        pytest.skip(str(e))
    events: list[tuple[int, list[int]]] = []
    engine.on_kv_event = events.append
    await engine.start()
    try:
        system = list(range(1000, 1100))  # 100 tokens: 6 full blocks of 16
        _, cached_first = await generate(engine, "a", system + [5, 6, 7])
        assert cached_first == 0
        assert events and events[-1][0] == KvEventKind.STORED
        tokens, cached_second = await generate(engine, "b", system + [8, 9])
        assert cached_second == 96  # the 6 full shared blocks were not recomputed
        assert len(tokens) == 6
        # Same prompt, fresh engine state vs reused prefix: greedy tokens agree (fp32).
        again, cached_third = await generate(engine, "c", system + [8, 9])
        assert cached_third == 96 and again == tokens
        assert engine.stats().active_seqs == 0
    finally:
        await engine.stop()

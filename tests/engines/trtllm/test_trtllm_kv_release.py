"""Nothing stranded with TensorRT-LLM (STAND-IN, not TensorRT-LLM): a prefill's KV that nobody will pull is
released at once — its context-only request aborted — instead of waiting for TensorRT-LLM's transfer timeout.

Prefill and decode workers (``--engine trtllm`` on the stand-in) and the router share the in-process runtime.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing
from pathlib import Path
from types import ModuleType

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.protocol import GenerateRequest, SamplingOptions
from dynamo_lite.router.orchestrator import Router
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.config import RuntimeSettings
from dynamo_lite.runtime.registry import LiveView
from dynamo_lite.runtime.runtime import Runtime
from dynamo_lite.worker.worker import Worker, WorkerSettings

MODEL = "standin-model"
_namespaces = itertools.count()


async def _start(model_dir: Path) -> tuple[Worker, Worker, Router, list]:
    ns = f"trtllm-release-{next(_namespaces)}"
    workers = []
    for mode in ("prefill", "decode"):
        w = Worker(
            WorkerSettings(
                role=mode,
                engine="trtllm",
                engine_settings=EngineSettings(model_path=str(model_dir), served_model_name=MODEL),
                runtime=RuntimeSettings.embedded(namespace=ns),
            )
        )
        await w.start()
        workers.append(w)
    runtime = await Runtime.connect(RuntimeSettings.embedded(namespace=ns))
    view = LiveView(runtime)
    await view.start()
    router = Router(runtime, view, RouterSettings())
    return workers[0], workers[1], router, [view, runtime]


async def _stop(prefill: Worker, decode: Worker, rest: list) -> None:
    for w in (prefill, decode):
        await w.stop(drain_s=0)
    await rest[0].stop()
    await rest[1].close()


def _request(rid: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        rid, MODEL, list(range(10, 40)), SamplingOptions(max_tokens=max_tokens, temperature=0)
    )


async def _aborted_within(llm, request_id: int, pending: dict, within: float) -> float:  # noqa: ANN001
    started = time.monotonic()
    async with asyncio.timeout(within):
        while request_id not in llm.aborted or request_id in pending:  # noqa: ASYNC110 — stand-in state
            await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_client_gone_before_the_decode_pull_aborts_the_context_request(
    standin: ModuleType, model_dir: Path
) -> None:
    from tensorrt_llm.llmapi import PENDING_KV

    prefill, decode, router, rest = await _start(model_dir)
    try:
        async with aclosing(router.generate(MODEL, _request("gone"))) as chunks:
            first = await anext(chunks)  # the prefill's first token: its KV waits for a decode worker
        # the client left here, before any decode worker pulled the KV
        llm = prefill.engine._llm
        ctx_id = llm.requests[-1].request_id
        assert first.token_ids
        took = await _aborted_within(llm, ctx_id, PENDING_KV, within=1.0)
        assert took < 1.0 and prefill.engine.kv_releases == 1
        assert not decode.engine._llm.requests  # no decode worker ever saw it
    finally:
        await _stop(prefill, decode, rest)


async def test_a_decode_that_recomputes_releases_the_prefills_kv(
    standin: ModuleType, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tensorrt_llm.llmapi import PENDING_KV, RequestError, RequestOutput

    def transfer_fails(self, disagg):  # noqa: ANN001 — the decode side's KV transfer breaks
        raise RequestError("UCX transfer failed")

    monkeypatch.setattr(RequestOutput, "_check_generation_only", transfer_fails)
    prefill, decode, router, rest = await _start(model_dir)
    try:
        tokens = []
        async with aclosing(router.generate(MODEL, _request("recompute"))) as chunks:
            async for chunk in chunks:
                tokens.extend(chunk.token_ids)
        assert len(tokens) == 8 and decode.engine.stats().kv_recomputes == 1  # the request still completes
        llm = prefill.engine._llm
        ctx_id = llm.requests[-1].request_id
        took = await _aborted_within(llm, ctx_id, PENDING_KV, within=1.0)
        assert took < 1.0 and prefill.engine.kv_releases == 1
    finally:
        await _stop(prefill, decode, rest)


async def test_release_of_unknown_or_pulled_kv_does_nothing(standin: ModuleType, model_dir: Path) -> None:
    prefill, decode, router, rest = await _start(model_dir)
    try:
        tokens = []
        async with aclosing(router.generate(MODEL, _request("pulled"))) as chunks:
            async for chunk in chunks:
                tokens.extend(chunk.token_ids)
        assert len(tokens) == 8
        assert not prefill.engine.release_kv("no-such-transfer")
        assert not prefill.engine._llm.aborted  # a request whose KV was pulled is never aborted
    finally:
        await _stop(prefill, decode, rest)

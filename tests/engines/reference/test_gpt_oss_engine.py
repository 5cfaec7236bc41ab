"""The torch engine serving the tiny gpt-oss model, greedy fp32, token for token against transformers'
``GptOssForCausalLM.generate``: (a) aggregated, one request at a time; (c) the 8 prompts batched together; and
prefill and decode engines handing the KV over (in one process here; across processes over etcd + NATS in
tests/e2e/test_gpt_oss_disagg.py), the sliding layers' KV moving as its window only."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest
import torch
from gpt_oss_testing import NEW_TOKENS, PROMPT_LENGTHS, WINDOW, hf_greedy, prompts, tiny_folder

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import build_engine
from dynamo_lite.kv.layout import KvLayout
from dynamo_lite.protocol import GenerateRequest, Phase, SamplingOptions

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # noqa: ANN001
    return tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(folder):  # noqa: ANN001
    return hf_greedy(folder)


def settings(folder, mode: str = "agg", **extra: object) -> EngineSettings:  # noqa: ANN001
    return EngineSettings(
        role=mode,
        model_path=str(folder),
        dtype="float32",
        threads=2,
        max_batch_size=8,
        max_num_tokens=48,  # the 57- and 70-token prompts prefill in two chunks
        max_seq_len=128,
        extra=dict(extra),
    )


def request(i: int, ids: list[int], **kw: object) -> GenerateRequest:
    opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=f"r{i}", model="tiny-gpt-oss", token_ids=ids, sampling=opts, **kw)


async def generate(engine, req: GenerateRequest) -> list:  # noqa: ANN001
    async with aclosing(engine.generate(req)) as chunks:
        return [c async for c in chunks]


def tokens(chunks: list) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_prompts_cover_the_window() -> None:
    assert len(PROMPT_LENGTHS) == 8 and sum(n > WINDOW for n in PROMPT_LENGTHS) >= 4


async def test_aggregated_one_at_a_time_token_exact(folder, expected) -> None:  # noqa: ANN001
    engine = build_engine(settings(folder))
    await engine.start()
    try:
        got = [tokens(await generate(engine, request(i, ids))) for i, ids in enumerate(prompts())]
    finally:
        await engine.stop()
    assert got == expected


def test_warm_prefill_lengths_cover_each_class_of_expert_tiles() -> None:
    from dynamo_lite.engines.reference import moe_mxfp4, startup

    # gpt-oss-120b (128 experts, top 4): the decode tiles past the small grouping programs, the prefill tiles, the
    # long-prefill tiles; 20b (32 experts) reaches the last at 2048 tokens.
    assert moe_mxfp4.prefill_token_classes(128, 4) == (65, 768, 8192)
    assert startup.warm_prefill_lengths(16384, 128, 4) == [65, 768, 4096, 8192]
    assert startup.warm_prefill_lengths(3000, 32, 4) == [65, 192, 2048, 3000]
    assert startup.warm_prefill_lengths(512) == [512]  # no experts: one long prompt


async def test_warm_prefills_leave_no_trace(folder, expected, monkeypatch) -> None:  # noqa: ANN001
    """The prompt-sized prefills CUDA's warmup runs (forced here on the CPU) leave nothing behind: every prompt's
    tokens after them are transformers'."""
    from dynamo_lite.engines.reference import rank_runner, startup

    monkeypatch.setattr(startup, "WARM_PREFILL_DEVICES", ("cpu",))
    prefills: list[int] = []
    real_forward = rank_runner.LocalRunner.forward

    def observed_forward(self, decode, prefill, sample):  # noqa: ANN001, ANN202 - records, then runs
        prefills.extend(len(ids) for _, _, ids in prefill)
        return real_forward(self, decode, prefill, sample)

    monkeypatch.setattr(rank_runner.LocalRunner, "forward", observed_forward)
    engine = build_engine(settings(folder))
    await engine.start()
    try:
        cfg = engine._model.config
        warmed = startup.warm_prefill_lengths(48, cfg.num_experts, cfg.experts_per_token)  # max_num_tokens 48
        assert prefills[: len(warmed) + 1] == [*warmed, 8]  # then the short warmup step
        got = await asyncio.gather(*(generate(engine, request(i, ids)) for i, ids in enumerate(prompts())))
    finally:
        await engine.stop()
    assert [tokens(c) for c in got] == expected


async def test_eight_batched_together_token_exact(folder, expected) -> None:  # noqa: ANN001
    engine = build_engine(settings(folder))
    await engine.start()
    step_sizes: list[int] = []
    real_step = engine._step

    def observed_step(plan) -> None:  # noqa: ANN001 - records what the real step batched, then runs it
        step_sizes.append(len(plan.decode) + len(plan.prefill))
        real_step(plan)

    engine._step = observed_step
    try:
        got = await asyncio.gather(*(generate(engine, request(i, ids)) for i, ids in enumerate(prompts())))
    finally:
        await engine.stop()
    assert [tokens(c) for c in got] == expected
    assert max(step_sizes) == 8  # all eight in one step at least once


async def test_prefill_to_decode_moves_only_the_window_of_sliding_layers(folder, expected) -> None:  # noqa: ANN001
    prefill, decode = build_engine(settings(folder, "prefill")), build_engine(settings(folder, "decode"))
    await prefill.start()
    await decode.start()
    moved, layouts = [], []
    try:
        for i, ids in enumerate(prompts()):
            first = await generate(prefill, request(i, ids, phase=Phase.PREFILL))
            desc = first[0].kv
            assert desc is not None and len(first) == 1
            layouts.append(KvLayout.from_descriptor(desc))
            rest = await generate(
                decode, request(i, ids, phase=Phase.DECODE, kv=desc, generated_ids=first[0].token_ids)
            )
            moved.append([*first[0].token_ids, *tokens(rest)])
        stats = decode.stats()
    finally:
        await prefill.stop()
        await decode.stop()
    assert moved == expected
    assert stats.kv_transfers == 8 and stats.kv_recomputes == 0
    # Full layers (1, 3) hold every prompt position; sliding layers (0, 2) at most the last WINDOW.
    bytes_per_layer_token = 2 * 2 * 16 * 4  # K and V, 2 kv heads x 16, fp32
    want = [bytes_per_layer_token * (2 * n + 2 * min(n, WINDOW)) for n in PROMPT_LENGTHS]
    assert [layout.nbytes for layout in layouts] == want
    assert stats.kv_transfer_bytes == sum(want)
    assert all(layout.windowed_layers == (0, 2) and layout.window == WINDOW for layout in layouts)
    assert stats.kv_transfer_bytes < sum(layout.all_full_nbytes for layout in layouts)


async def test_kv_of_another_window_is_recomputed_not_misread(folder, expected) -> None:  # noqa: ANN001
    """A descriptor that disagrees with the model's windowed layers is refused (here: recomputed)."""
    import msgspec

    prefill, decode = build_engine(settings(folder, "prefill")), build_engine(settings(folder, "decode"))
    await prefill.start()
    await decode.start()
    try:
        ids = prompts()[5]
        first = await generate(prefill, request(5, ids, phase=Phase.PREFILL))
        wrong = msgspec.structs.replace(first[0].kv, windowed_layers=[1, 3])
        rest = await generate(
            decode, request(5, ids, phase=Phase.DECODE, kv=wrong, generated_ids=first[0].token_ids)
        )
        assert [*first[0].token_ids, *tokens(rest)] == expected[5]
        assert decode.stats().kv_recomputes == 1 and decode.stats().kv_transfers == 0
    finally:
        await prefill.stop()
        await decode.stop()


async def test_dummy_weights_are_the_same_in_every_engine(folder) -> None:  # noqa: ANN001
    """``load_format: dummy`` (what the GPU benchmark of the real shape uses): random weights from a seed, made
    where the engine runs, identical in two engines (so prefill and decode workers agree)."""
    outs = []
    for _ in range(2):
        engine = build_engine(settings(folder, load_format="dummy"))
        await engine.start()
        try:
            outs.append(tokens(await generate(engine, request(0, prompts()[4]))))
            real = engine._model.weights.layers[0].gate_up
        finally:
            await engine.stop()
    assert outs[0] == outs[1] and len(set(outs[0])) > 1
    assert float(real.std()) > 0.05 and not torch.equal(real[0], real[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_fp32_batched_token_exact(folder) -> None:  # noqa: ANN001
    """On a GPU: fp32, CUDA graphs and the Triton decode attention, against transformers on the same GPU
    (``benchmarks/gpu/gpt_oss.py tokens`` runs this and the disaggregated case by CUDA IPC)."""
    expected = hf_greedy(folder, "cuda")
    cuda = settings(folder)
    cuda.device = "cuda"
    engine = build_engine(cuda)
    await engine.start()
    try:
        assert engine._graphs is not None and engine._model.decode_attention is not None
        got = await asyncio.gather(*(generate(engine, request(i, ids)) for i, ids in enumerate(prompts())))
    finally:
        await engine.stop()
    assert [tokens(c) for c in got] == expected

"""The torch engine over 2 ranks (gloo, CPU, fp32) against one rank, for the tiny llama and the tiny gpt-oss:
tensor parallel (heads split), expert parallel, attention data-parallel. Logits within 1e-5 and the same greedy
tokens; each rank holds half of the sharded weights; KV handed between layouts (TP2 -> TP1, TP1 -> TP2,
head-split prefill -> attention-DP decode) gives the aggregated one-rank tokens; a model whose heads don't
divide is refused."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from contextlib import aclosing
from pathlib import Path

import pytest
import torch

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference import ConfigError, build_engine
from dynamo_lite.engines.reference.loader import LlamaConfig
from dynamo_lite.engines.reference.ranks import ParallelError, ParallelPlan, check_divides, shard_for
from dynamo_lite.protocol import GenerateRequest, Phase, SamplingOptions

NEW_TOKENS = 6
PROMPT_LENGTHS = (5, 11, 19, 26)  # the tiny gpt-oss's window is 16: two prompts run past it


def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(199_998) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynamo_lite.tiny_llama import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-gpt-oss"))


def settings(
    folder: Path, mode: str = "agg", tp: int = 1, ep: int = 1, dp: bool = False, quantization: str = "none"
) -> EngineSettings:
    return EngineSettings(
        quantization=quantization,
        role=mode,
        model_path=str(folder),
        dtype="float32",
        threads=1,
        max_batch_size=4,
        max_num_tokens=64,
        max_seq_len=64,
        tensor_parallel_size=tp,
        expert_parallel_size=ep,
        extra={"enable_attention_dp": dp, "warmup": False},
    )


def request(i: int, ids: list[int], **kw: object) -> GenerateRequest:
    opts = SamplingOptions(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return GenerateRequest(request_id=f"r{i}", model="tiny", token_ids=ids, sampling=opts, **kw)


async def generate(engine, req: GenerateRequest) -> list:  # noqa: ANN001
    async with aclosing(engine.generate(req)) as chunks:
        return [c async for c in chunks]


def tokens(chunks: list) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def probe_logits(engine) -> list[torch.Tensor]:  # noqa: ANN001
    """Two steps driven straight through the engine's runner while it is idle (no request in flight): a
    prefill of two prompts, then a decode of both; the sampled rows' logits."""
    slots = engine._runner.slots
    a, b = slots.allocate(), slots.allocate()
    try:
        with torch.inference_mode():
            p1, p2 = prompts()[1], prompts()[3]
            first = engine._runner.forward([], [(a, 0, p1), (b, 0, p2)], [len(p1) - 1, len(p1) + len(p2) - 1])
            second = engine._runner.forward([(a, len(p1), 11), (b, len(p2), 12)], [], [0, 1])
    finally:
        slots.free(a)
        slots.free(b)
    return [first, second]


async def run_engine(folder: Path, **kw: object) -> dict:
    """Start an engine, probe its logits, generate the test prompts batched together, stop it."""
    engine = build_engine(settings(folder, **kw))
    await engine.start()
    try:
        logits = probe_logits(engine)
        got = await asyncio.gather(*(generate(engine, request(i, ids)) for i, ids in enumerate(prompts())))
        state = engine._runner.state if hasattr(engine._runner, "state") else None
        return {
            "logits": logits,
            "tokens": [tokens(c) for c in got],
            "weight_bytes": state.weight_bytes if state is not None else None,
            "pids": engine._ranks.pids if engine._ranks is not None else [],
        }
    finally:
        await engine.stop()


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gpt-oss with its experts stored as the released checkpoints store them (MXFP4 blocks + scales)."""
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("tiny-gpt-oss-mxfp4"), mxfp4=True)


@pytest.fixture(scope="module")
def one_rank(llama: Path, gpt_oss: Path, gpt_oss_mxfp4: Path) -> dict:
    return {
        "llama": asyncio.run(run_engine(llama)),
        "gpt_oss": asyncio.run(run_engine(gpt_oss)),
        "gpt_oss_mxfp4": asyncio.run(run_engine(gpt_oss_mxfp4, quantization="mxfp4")),
    }


def one_rank_sharded_bytes(folder: Path, attention: bool = True, mxfp4: bool = False) -> int:
    from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, load_gpt_oss_weights
    from dynamo_lite.engines.reference.loader import load_weights, model_config
    from dynamo_lite.engines.reference.ranks import sharded_nbytes
    from dynamo_lite.model_files import resolve_model

    cfg = model_config(resolve_model(str(folder)).config)
    if isinstance(cfg, GptOssConfig):
        weights = load_gpt_oss_weights(folder, cfg, torch.float32, torch.device("cpu"), mxfp4=mxfp4)
    else:
        weights = load_weights(folder, cfg, torch.float32, torch.device("cpu"))
    return sharded_nbytes(weights, attention=attention)


CASES = [
    pytest.param("llama", {"tp": 2}, id="llama-tp2"),
    pytest.param("llama", {"tp": 2, "dp": True}, id="llama-attention-dp2"),
    pytest.param("gpt_oss", {"tp": 2, "ep": 2}, id="gpt-oss-tp2-ep2"),
    pytest.param("gpt_oss", {"tp": 2, "ep": 1}, id="gpt-oss-tp2-ep1"),
    pytest.param("gpt_oss", {"tp": 2, "ep": 2, "dp": True}, id="gpt-oss-attention-dp2-ep2"),
    # MXFP4 experts kept packed (the CPU reference path): whole experts per rank, or 32 columns of each.
    pytest.param("gpt_oss_mxfp4", {"tp": 2, "ep": 2, "quantization": "mxfp4"}, id="gpt-oss-mxfp4-tp2-ep2"),
    pytest.param("gpt_oss_mxfp4", {"tp": 2, "ep": 1, "quantization": "mxfp4"}, id="gpt-oss-mxfp4-tp2-ep1"),
    # The seed's 4 + 4 (its prefill and decode YAMLs): 4 query heads over 4 ranks, the 2 KV heads replicated.
    pytest.param("gpt_oss", {"tp": 4, "ep": 4}, id="gpt-oss-tp4-ep4", marks=pytest.mark.slow),
    pytest.param(
        "gpt_oss", {"tp": 4, "ep": 4, "dp": True}, id="gpt-oss-attention-dp4-ep4", marks=pytest.mark.slow
    ),
    pytest.param("llama", {"tp": 4}, id="llama-tp4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("model", "kw"), CASES)
def test_ranks_match_one(
    model: str, kw: dict, one_rank: dict, llama: Path, gpt_oss: Path, gpt_oss_mxfp4: Path
) -> None:
    folder = {"llama": llama, "gpt_oss": gpt_oss, "gpt_oss_mxfp4": gpt_oss_mxfp4}[model]
    ranked = asyncio.run(run_engine(folder, **kw))
    base = one_rank[model]
    for got, want in zip(ranked["logits"], base["logits"], strict=True):
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-5
    assert ranked["tokens"] == base["tokens"]
    assert (
        all(len(t) == NEW_TOKENS for t in ranked["tokens"]) and len({tuple(t) for t in ranked["tokens"]}) > 1
    )
    # Every rank holds 1/N of the sharded weights (attention-DP ranks: of the FFN; attention is replicated).
    # Exactly, except KV heads replicated over ranks (TP4 of 2 KV heads: each rank keeps 1, not 1/2).
    n = kw["tp"]
    full = one_rank_sharded_bytes(folder, not kw.get("dp", False), kw.get("quantization") == "mxfp4")
    if (model, n, kw.get("dp", False)) == ("gpt_oss", 4, False):
        assert all(full // n <= b <= full // n * 1.2 for b in ranked["weight_bytes"])
    else:
        assert ranked["weight_bytes"] == [full // n] * n
    assert ranked["pids"] and all(not Path(f"/proc/{pid}").exists() for pid in ranked["pids"])


def rank_bytes(engine) -> tuple[list[int], list[int]] | None:  # noqa: ANN001
    """``(copied directly, relayed over the data group)`` KV handoff bytes per rank, or None for one rank."""
    state = getattr(engine._runner, "state", None)
    return None if state is None else (state.kv_bytes_by_rank, state.kv_relayed_by_rank)


HANDOFFS = [
    pytest.param({"tp": 2}, {"tp": 2}, True, id="tp2-to-tp2"),
    pytest.param({"tp": 2}, {"tp": 1}, True, id="tp2-to-tp1"),
    pytest.param({"tp": 1}, {"tp": 2}, True, id="tp1-to-tp2"),
    pytest.param({"tp": 2, "ep": 2}, {"tp": 2, "ep": 2, "dp": True}, True, id="tp2-to-attention-dp2"),
    # No shared memory (holds in private memory, pulls over TCP): rank 0 relays the parts over the data
    # group, the path device memory (a CUDA hold or a CUDA IPC pull) takes.
    pytest.param({"tp": 2}, {"tp": 2, "ep": 2, "dp": True}, False, id="relayed-tp2-to-attention-dp2"),
    # The seed's pair: 4 query heads over 4 ranks, the 2 KV heads replicated (ranks 0 and 2 write them).
    pytest.param(
        {"tp": 4, "ep": 4},
        {"tp": 4, "ep": 4, "dp": True},
        True,
        id="tp4-to-attention-dp4",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("prefill_kw", "decode_kw", "shm"), HANDOFFS)
def test_kv_handoff_between_layouts(
    prefill_kw: dict, decode_kw: dict, shm: bool, one_rank: dict, gpt_oss: Path
) -> None:
    async def run() -> tuple[list[list[int]], object, dict]:
        def engine(mode: str, kw: dict):  # noqa: ANN202
            s = settings(gpt_oss, mode, **kw)
            return build_engine(dataclasses.replace(s, extra={**s.extra, "kv_use_shm": shm}))

        prefill, decode = engine("prefill", prefill_kw), engine("decode", decode_kw)
        await prefill.start()
        await decode.start()
        try:

            async def one(i: int, ids: list[int]) -> list[int]:
                first = await generate(prefill, request(i, ids, phase=Phase.PREFILL))
                desc = first[0].kv
                assert desc is not None
                rest = await generate(
                    decode, request(i, ids, phase=Phase.DECODE, kv=desc, generated_ids=first[0].token_ids)
                )
                return [*first[0].token_ids, *tokens(rest)]

            out = list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts()))))
            held = prefill.exporter.held_bytes
            return (
                out,
                decode.stats(),
                {"prefill": rank_bytes(prefill), "decode": rank_bytes(decode), "held": held},
            )
        finally:
            await prefill.stop()
            await decode.stop()

    got, stats, moved = asyncio.run(run())
    assert got == one_rank["gpt_oss"]["tokens"]
    assert stats.kv_transfers == len(PROMPT_LENGTHS) and stats.kv_recomputes == 0
    assert moved["held"] == 0  # every prefill hold freed once pulled
    total = stats.kv_transfer_bytes  # every sequence's KV, all heads
    print(f"KV handoff bytes per rank (direct, relayed) of {total}: prefill {moved['prefill']}, decode "
          f"{moved['decode']}")  # fmt: skip
    # Shared memory: each rank copies its own KV heads (half of them, the tiny gpt-oss having 2 KV heads) or,
    # attention DP, the owning rank all of its sequences' heads; nothing is relayed through rank 0.
    if prefill_kw["tp"] == 2:
        direct, relayed = moved["prefill"]
        if shm:
            assert direct == [total // 2] * 2 and relayed == [0, 0]
        else:  # rank 0 writes its half and gathers the other's
            assert direct == [total // 2, 0] and relayed == [total // 2] * 2
    if prefill_kw["tp"] == 4:  # a KV head on two ranks is written by the first
        assert moved["prefill"] == ([total // 2, 0, total // 2, 0], [0] * 4)
    if decode_kw["tp"] > 1:
        direct, relayed = moved["decode"]
        n = decode_kw["tp"]
        if not decode_kw.get("dp"):
            assert direct == [total // 2] * 2 and relayed == [0, 0]
        elif shm:  # each sequence's owner, all heads: the 4 sequences spread over the ranks
            assert sum(direct) == total and all(direct) and relayed == [0] * n
        else:  # rank 0 sends the other rank's sequences whole
            assert 0 < relayed[0] == relayed[1] < total and direct[0] + relayed[1] == total and direct[1] == 0


def test_heads_that_do_not_divide_are_refused() -> None:
    smollm2 = LlamaConfig.from_dict(
        {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
         "num_hidden_layers": 30, "vocab_size": 49152}
    )  # fmt: skip
    with pytest.raises(ParallelError, match="9 query heads and 3 KV heads: 2 tensor-parallel ranks"):
        check_divides(smollm2, ParallelPlan(2))
    check_divides(smollm2, ParallelPlan(3))  # 3 ranks: 3 query heads and one KV head each
    check_divides(smollm2, ParallelPlan(2, attention_dp=True))  # whole heads per rank; the MLP divides


def test_seed_tp4_ep4_shards_of_the_120b_shape() -> None:
    from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig
    from dynamo_lite.gpt_oss.tiny import gpt_oss_config

    cfg = GptOssConfig.from_dict(gpt_oss_config())  # 64 query / 8 KV heads, 128 experts
    shards = [shard_for(cfg, ParallelPlan(4, 4, rank=r)) for r in range(4)]
    assert [s.q_heads for s in shards] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.experts for s in shards] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert all(s.ffn_cols == (0, 2880) and s.first_of_ffn for s in shards)
    # Fewer KV heads than ranks: each rank keeps the one its query heads read.
    tiny = dataclasses.replace(cfg, num_heads=4, num_kv_heads=2)
    assert [shard_for(tiny, ParallelPlan(4, 4, rank=r)).kv_heads for r in range(4)] == [
        (0, 1),
        (0, 1),
        (1, 2),
        (1, 2),
    ]
    with pytest.raises(ParallelError, match="must divide the tensor parallel size"):
        check_divides(cfg, ParallelPlan(4, 3))


def test_engine_refuses_a_model_whose_heads_do_not_divide(llama: Path) -> None:
    with pytest.raises(ConfigError, match="query heads"):
        build_engine(settings(llama, tp=3))


def test_worker_refuses_heads_that_do_not_divide_before_asking_any_service(llama: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    run = subprocess.run(
        [sys.executable, "-m", "dynamo_lite.worker", "--engine", "torch", "--model-path", str(llama),
         "--tensor-parallel-size", "3"],
        capture_output=True, text=True, timeout=120, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "8 query heads and 4 KV heads: 3 tensor-parallel ranks" in run.stderr

"""Weight-only int8 and int4 linears (``quantization: int8 | int4``): the quantization itself, the small-batch
kernel and the large-batch path computing the same quantized model, the config's refusals, and the real SmolLM2
staying close to fp32 (teacher-forced next-token agreement and KL divergence) and still answering."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from reference_testing import THREADS, chat, collect, needs_smollm2, request, tokens

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference.config import ConfigError, from_settings
from dynamo_lite.engines.reference.linear import (
    INT4_GROUP,
    INT4_MAX_ROWS,
    INT8_MAX_ROWS,
    dequantize_int4,
    int4_supported,
    int8_supported,
    make_linear,
    quantize_int4,
    quantize_int8,
)

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="torch lacks the CPU int8 weight-only matmul")
needs_int4 = pytest.mark.skipif(not int4_supported(), reason="torch lacks the CPU int4 weight-only matmul")


def test_quantize_int8_is_per_channel_and_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different magnitude
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (64,)
    assert q.abs().max() <= 127
    err = (q.float() * scales.float()[:, None] - w).abs()
    assert (err <= scales.float()[:, None] * 0.5 + 1e-7).all()  # every row uses its own scale
    assert (q.abs().amax(dim=1) >= 126).all()  # and its full range


def test_quantize_int4_is_per_group_and_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 4 * INT4_GROUP) * torch.logspace(-3, 0, 4).repeat_interleave(
        INT4_GROUP
    )  # groups differ
    q, scales_zeros = quantize_int4(w)
    assert q.dtype == torch.int32 and 0 <= int(q.min()) and int(q.max()) <= 15
    assert scales_zeros.shape == (4, 16, 2) and scales_zeros.dtype == torch.bfloat16
    step = scales_zeros[..., 0].t().float().repeat_interleave(INT4_GROUP, dim=1)  # [N, K]
    assert ((dequantize_int4(q, scales_zeros) - w).abs() <= step * 0.5 + 1e-6).all()
    # Weights already on a 4-bit grid per group (what a Q4_1 GGUF dequantizes to) land on the same grid: the
    # same 4-bit codes, values off only by the bf16 rounding of scale and zero point.
    idx = torch.randint(0, 16, (16, 4, INT4_GROUP))
    idx[..., 0], idx[..., 1] = 0, 15  # every group spans its whole range
    grid = (torch.randn(16, 4, 1) * 0.1 + idx * 0.01).view(16, -1)
    q, scales_zeros = quantize_int4(grid)
    assert torch.equal(q, idx.view(16, -1).to(torch.int32))
    assert (dequantize_int4(q, scales_zeros) - grid).abs().max() < 0.1 * 0.01
    with pytest.raises(ValueError, match="divisible"):
        quantize_int4(torch.randn(4, INT4_GROUP + 1))


@pytest.mark.parametrize(
    ("quantization", "max_rows"),
    [
        pytest.param("int8", INT8_MAX_ROWS, marks=needs_int8),
        pytest.param("int4", INT4_MAX_ROWS, marks=needs_int4),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_batch_kernel_and_wide_path_compute_the_same_model(
    quantization: str, max_rows: int, with_bias: bool
) -> None:
    torch.manual_seed(1)
    w = (torch.randn(80, 128) * 0.05).to(torch.bfloat16)
    bias = torch.randn(80) * 0.1 if with_bias else None
    linear = make_linear(w, bias, quantization)
    if quantization == "int8":
        q, scales = quantize_int8(w)
        dequantized = q.float() * scales.float()[:, None]
    else:
        dequantized = dequantize_int4(*quantize_int4(w))
    x = torch.randn(max_rows + 4, 128).to(torch.bfloat16)
    with torch.inference_mode():
        few = linear(x[:max_rows])  # the int8 / int4 kernel
        many = linear(x)  # the bf16 kernel over the dequantized weight
    expected = F.linear(x.float(), dequantized, bias)
    scale = expected.abs().max()
    assert few.dtype == many.dtype == torch.bfloat16
    assert (few.float() - expected[:max_rows]).abs().max() < 0.02 * scale
    assert (many.float() - expected).abs().max() < 0.02 * scale
    assert (few.float() - many[:max_rows].float()).abs().max() < 0.02 * scale


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize(
    ("dtype", "device", "message"), [("float32", "cpu", "bfloat16"), ("bfloat16", "cuda", "cpu")]
)
def test_quantization_needs_cpu_and_bfloat16(
    quantization: str, dtype: str, device: str, message: str
) -> None:
    settings = EngineSettings(
        dtype=dtype, device=device, extra={"quantization": quantization}, extra_source="t.yaml"
    )
    with pytest.raises(ConfigError, match=message):
        from_settings(settings)
    with pytest.raises(ConfigError, match="quantization"):
        from_settings(EngineSettings(extra={"quantization": "int3"}, extra_source="t.yaml"))
    ok = from_settings(EngineSettings(dtype="bfloat16", extra={"quantization": quantization.upper()}))
    assert ok.quantization == quantization
    # The worker flag, and the YAML winning over it.
    from dynamo_lite.worker.__main__ import parse_args

    flags = parse_args(
        ["--mode", "decode", "--engine", "torch", "--dtype", "bfloat16", "--quantization", quantization]
    )
    assert from_settings(flags.engine_settings).quantization == quantization
    flags.engine_settings.extra = {"quantization": "none"}
    assert from_settings(flags.engine_settings).quantization == "none"


@needs_smollm2
@pytest.mark.parametrize(
    "quantization", [pytest.param("int8", marks=needs_int8), pytest.param("int4", marks=needs_int4)]
)
def test_smollm2_quantized_stays_close_to_fp32(quantization: str) -> None:
    """Teacher-forced over an answer: next-token argmax agreement with fp32 and the mean KL divergence. Measured
    on 2026-11-27: int8 0.975 / 0.006, int4 1.000 / 0.003 (its layers are the GGUF's own 4-bit grid), bf16
    alone 0.95 / 0.001."""
    from tokenizers import Tokenizer

    from dynamo_lite.engines.reference.kv_cache import KvCache
    from dynamo_lite.engines.reference.loader import LlamaConfig, load_weights
    from dynamo_lite.engines.reference.model import LlamaModel, build_step
    from dynamo_lite.model_files import ensure_weights, resolve_model

    files = ensure_weights(resolve_model())
    cfg = LlamaConfig.from_folder(files.folder)
    tok = Tokenizer.from_file(str(files.tokenizer_json))
    answer = (
        "A CPU cache is a small, fast memory close to the processor that keeps copies of recently used data, so "
        "that the next access does not have to go all the way to main memory, which is much slower."
    )
    ids = tok.encode(chat("Explain what a CPU cache is.") + answer, add_special_tokens=False).ids
    cpu = torch.device("cpu")
    torch.set_num_threads(THREADS)

    def logits(dtype: torch.dtype, quant: str) -> torch.Tensor:
        model = LlamaModel(cfg, load_weights(files.folder, cfg, dtype, cpu), 512, quantization=quant)
        cache = KvCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1, 512, dtype, cpu)
        # One token at a time, so every step takes the small-batch int kernel, as single-stream decode does.
        out = []
        with torch.inference_mode():
            for pos, token in enumerate(ids):
                if pos < 40:
                    step = build_step([], [(0, pos, [token])], [0], cpu)
                else:
                    step = build_step([(0, pos, token)], [], [0], cpu)
                out.append(model.forward(step, cache)[0])
        return torch.stack(out[40:])

    ref, got = logits(torch.float32, "none"), logits(torch.bfloat16, quantization)
    agreement = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert agreement >= 0.9, agreement
    assert kl < 0.02, kl


@needs_smollm2
@needs_int4
@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_smollm2_with_int4_weights_answers_alone_and_batched() -> None:
    from tokenizers import Tokenizer

    from dynamo_lite.engines.reference import build_engine

    settings = EngineSettings(
        role="agg", dtype="bfloat16", threads=THREADS, max_batch_size=12, max_num_tokens=256, max_seq_len=512,
        extra={"quantization": "int4"}, extra_source="test",
    )  # fmt: skip
    engine = build_engine(settings)
    await engine.start()
    try:
        tok = Tokenizer.from_file(str(engine.model_files.tokenizer_json))
        ids = tok.encode(chat("What is the capital of Japan?"), add_special_tokens=False).ids
        alone = tok.decode(tokens(await collect(engine, request(ids, "alone", max_tokens=12))))
        assert "Tokyo" in alone, alone
        # Twelve at once: decode steps of more than INT4_MAX_ROWS rows take the bf16 kernel, same answer.
        batch = await asyncio.gather(
            *(collect(engine, request(ids, f"b{i}", max_tokens=16)) for i in range(12))
        )
        for chunks in batch:
            assert tok.decode(tokens(chunks)) == alone
    finally:
        await engine.stop()

"""Weight-only int8 linears (``quantization: int8``): the quantization itself, the two kernels computing the
same quantized model, the config's refusals, and the real SmolLM2 still answering correctly."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from reference_testing import THREADS, chat, collect, needs_smollm2, request, tokens

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference.config import ConfigError, from_settings
from dynamo_lite.engines.reference.linear import INT8_MAX_ROWS, int8_supported, make_linear, quantize_int8

needs_int8 = pytest.mark.skipif(not int8_supported(), reason="torch lacks the CPU int8 weight-only matmul")


def test_quantize_int8_is_per_channel_and_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different magnitude
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (64,)
    assert q.abs().max() <= 127
    err = (q.float() * scales.float()[:, None] - w).abs()
    assert (err <= scales.float()[:, None] * 0.5 + 1e-7).all()  # every row uses its own scale
    assert (q.abs().amax(dim=1) >= 126).all()  # and its full range


@needs_int8
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_kernel_and_wide_path_compute_the_same_model(with_bias: bool) -> None:
    torch.manual_seed(1)
    w = torch.randn(80, 64) * 0.05
    bias = torch.randn(80) * 0.1 if with_bias else None
    linear = make_linear(w.to(torch.bfloat16), bias, "int8")
    q, scales = quantize_int8(w.to(torch.bfloat16))
    dequantized = q.float() * scales.float()[:, None]
    x = torch.randn(INT8_MAX_ROWS + 4, 64).to(torch.bfloat16)
    with torch.inference_mode():
        few = linear(x[:INT8_MAX_ROWS])  # the int8 kernel
        many = linear(x)  # the bf16 kernel over the dequantized weight
    expected = F.linear(x.float(), dequantized, bias)
    scale = expected.abs().max()
    assert few.dtype == many.dtype == torch.bfloat16
    assert (few.float() - expected[:INT8_MAX_ROWS]).abs().max() < 0.02 * scale
    assert (many.float() - expected).abs().max() < 0.02 * scale
    assert (few.float() - many[:INT8_MAX_ROWS].float()).abs().max() < 0.02 * scale


@pytest.mark.parametrize(
    ("dtype", "device", "message"),
    [("float32", "cpu", "bfloat16"), ("bfloat16", "cuda", "cpu")],
)
def test_int8_needs_cpu_and_bfloat16(dtype: str, device: str, message: str) -> None:
    settings = EngineSettings(
        dtype=dtype, device=device, extra={"quantization": "int8"}, extra_source="t.yaml"
    )
    with pytest.raises(ConfigError, match=message):
        from_settings(settings)
    with pytest.raises(ConfigError, match="quantization"):
        from_settings(EngineSettings(extra={"quantization": "int4"}, extra_source="t.yaml"))
    assert (
        from_settings(EngineSettings(dtype="bfloat16", extra={"quantization": "INT8"})).quantization == "int8"
    )


@needs_smollm2
@needs_int8
@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_smollm2_with_int8_weights_still_answers() -> None:
    from tokenizers import Tokenizer

    from dynamo_lite.engines.reference import build_engine

    settings = EngineSettings(
        mode="agg", dtype="bfloat16", threads=THREADS, max_batch_size=8, max_num_tokens=256, max_seq_len=512,
        extra={"quantization": "int8"}, extra_source="test",
    )  # fmt: skip
    engine = build_engine(settings)
    await engine.start()
    try:
        tok = Tokenizer.from_file(str(engine.model_files.tokenizer_json))
        ids = tok.encode(chat("What is the capital of France?"), add_special_tokens=False).ids
        alone = tokens(await collect(engine, request(ids, "alone", max_tokens=12)))
        assert "Paris" in tok.decode(alone, skip_special_tokens=True)
        # Eight at once: their decode steps have more rows than INT8_MAX_ROWS (the bf16 kernel) and answer too.
        batch = await asyncio.gather(
            *(collect(engine, request(ids, f"b{i}", max_tokens=12)) for i in range(8))
        )
        for chunks in batch:
            assert "Paris" in tok.decode(tokens(chunks), skip_special_tokens=True)
    finally:
        await engine.stop()

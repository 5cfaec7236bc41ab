"""MXFP4 experts (the released gpt-oss checkpoints' format): our dequantization against transformers' own, bit for
bit, on synthetic blocks covering every byte and every exponent; and a whole MXFP4 checkpoint read by our loader
and by transformers' ``GptOssForCausalLM``."""

from __future__ import annotations

import json

import pytest
import torch

from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, load_gpt_oss_weights
from dynamo_lite.engines.reference.mxfp4 import dequantize_mxfp4

transformers = pytest.importorskip("transformers")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def synthetic(
    seed: int, experts: int = 3, rows: int = 96, groups: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks and scales, the first 256 of each set to every possible byte (extreme exponents give
    zeros, subnormals and infinities)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 256, (experts, rows, groups), generator=gen).to(torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_dequantization_equals_transformers_bit_for_bit(dtype: torch.dtype, seed: int) -> None:
    blocks, scales = synthetic(seed)
    theirs = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [experts, in, out]
    ours = dequantize_mxfp4(blocks, scales, dtype)  # [experts, out, in]
    assert ours.dtype == dtype and ours.shape == (3, 96, 128)
    same_bits = ours.transpose(1, 2).contiguous().view(INT_VIEW[dtype]) == theirs.view(INT_VIEW[dtype])
    assert bool(same_bits.all())
    assert bool(torch.isinf(ours).any())  # the extreme exponents were exercised


def test_refuses_blocks_that_do_not_fit_their_scales() -> None:
    blocks, scales = synthetic(0)
    with pytest.raises(ValueError, match="do not fit"):
        dequantize_mxfp4(blocks, scales[:, :, :2], torch.float32)


def test_mxfp4_checkpoint_reads_as_transformers_reads_it(tmp_path) -> None:  # noqa: ANN001
    from dynamo_lite.gpt_oss.tiny import TINY_SHAPE, gpt_oss_config
    from dynamo_lite.gpt_oss.weights import write_random_weights

    config = gpt_oss_config(**TINY_SHAPE)
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_random_weights(tmp_path, config, seed=3, mxfp4=True)
    cfg = GptOssConfig.from_folder(tmp_path)
    assert cfg.mxfp4
    ours = load_gpt_oss_weights(tmp_path, cfg, torch.float32, torch.device("cpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    for i, layer in enumerate(hf.model.layers):
        experts = layer.mlp.experts
        assert torch.equal(ours.layers[i].gate_up, experts.gate_up_proj.data)
        assert torch.equal(ours.layers[i].down, experts.down_proj.data)
        assert torch.equal(ours.layers[i].gate_up_bias, experts.gate_up_proj_bias.data)
    assert float(ours.layers[0].gate_up.std()) > 0.01  # real values, not an all-zero decode

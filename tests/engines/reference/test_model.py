"""The llama forward pass against transformers on tiny random models of each supported family: Llama (with
attention bias and llama3 rope scaling), Mistral, Qwen2 (q/k/v bias). Chunked prefill, batched decode with
different lengths and non-contiguous slots must all give transformers' logits. CUDA runs where present."""

from __future__ import annotations

import pytest
import torch

from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.loader import LlamaConfig, UnsupportedModel, load_weights
from dynamo_lite.engines.reference.model import LlamaModel, build_step, rms_norm_reduced

transformers = pytest.importorskip("transformers")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
)  # fmt: skip


def tiny_model(kind: str, folder):  # noqa: ANN001
    torch.manual_seed(0)
    if kind == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
        cfg = transformers.LlamaConfig(
            **COMMON, attention_bias=True, rope_parameters=rope, tie_word_embeddings=False
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random biases (transformers initialises them to zero, which would hide a bug)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def tiny(request, tmp_path_factory):  # noqa: ANN001
    folder = tmp_path_factory.mktemp(request.param)
    return tiny_model(request.param, folder), folder


def ours(folder, device: str, slots: int = 4) -> tuple[LlamaModel, KvCache]:  # noqa: ANN001
    cfg = LlamaConfig.from_folder(folder)
    dev = torch.device(device)
    model = LlamaModel(cfg, load_weights(folder, cfg, torch.float32, dev), max_seq_len=64)
    return model, KvCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, slots, 64, torch.float32, dev)


def reference_logits(hf, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_and_decode_match_transformers(tiny, device: str) -> None:
    hf, folder = tiny
    model, cache = ours(folder, device)
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = reference_logits(hf, ids)
    dev = torch.device(device)
    got = []
    with torch.inference_mode():
        # prefill 0..11 and 12..19 as two chunks (the second attends to the cached first), then decode 20..29
        for start, end in ((0, 12), (12, 20)):
            step = build_step([], [(2, start, ids[start:end])], list(range(end - start)), dev)
            got.append(model.forward(step, cache).cpu())
        for pos in range(20, 30):
            got.append(model.forward(build_step([(2, pos, ids[pos])], [], [0], dev), cache).cpu())
    torch.testing.assert_close(torch.cat(got), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_with_gaps_matches_transformers(tiny, device: str) -> None:
    """Two sequences of different lengths decode in slots 0 and 3 (slots 1-2 idle) while a third prefills."""
    hf, folder = tiny
    model, cache = ours(folder, device)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(2)
    seqs = {
        0: torch.randint(0, 128, (9,), generator=gen).tolist(),
        3: torch.randint(0, 128, (17,), generator=gen).tolist(),
    }
    newcomer = torch.randint(0, 128, (6,), generator=gen).tolist()
    with torch.inference_mode():
        for slot, ids in seqs.items():  # everything but the last token is already in the cache
            model.forward(build_step([], [(slot, 0, ids[:-1])], [0], dev), cache)
        decode = [(slot, len(ids) - 1, ids[-1]) for slot, ids in seqs.items()]
        logits = model.forward(build_step(decode, [(1, 0, newcomer)], [0, 1, 2 + 5], dev), cache).cpu()
    torch.testing.assert_close(logits[0], reference_logits(hf, seqs[0])[-1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], reference_logits(hf, seqs[3])[-1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2], reference_logits(hf, newcomer)[-1], atol=2e-4, rtol=1e-4)


def test_bf16_stays_close_to_fp32(tiny) -> None:
    hf, folder = tiny
    cfg = LlamaConfig.from_folder(folder)
    model = LlamaModel(cfg, load_weights(folder, cfg, torch.bfloat16, torch.device("cpu")), max_seq_len=64)
    cache = KvCache(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 1, 64, torch.bfloat16, torch.device("cpu")
    )
    ids = list(range(5, 25))
    with torch.inference_mode():
        got = model.forward(build_step([], [(0, 0, ids)], list(range(20)), torch.device("cpu")), cache)
    expected = reference_logits(hf, ids)
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_rms_norm_equals_transformers(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(37, 576) * 3).to(dtype)
    weight = (torch.rand(576) + 0.5).to(dtype)
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(576, eps=1e-5).to(dtype)
    norm.weight.data.copy_(weight)
    with torch.inference_mode():
        got, expected = rms_norm_reduced(x, weight, 1e-5), norm(x)
    # The mean square goes through the fp32 norm (a square root, then squared): one ulp apart now and then.
    torch.testing.assert_close(got, expected)
    assert (got != expected).float().mean() < 1e-3


def test_unsupported_architectures_are_refused() -> None:
    base = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
    }
    with pytest.raises(UnsupportedModel, match="gpt2"):
        LlamaConfig.from_dict({**base, "model_type": "gpt2"})
    with pytest.raises(UnsupportedModel, match="yarn"):
        LlamaConfig.from_dict(
            {**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4}}
        )


def test_kv_cache_slots_and_copies() -> None:
    cache = KvCache(2, 3, 4, max_slots=3, max_seq_len=8, dtype=torch.float32, device=torch.device("cpu"))
    assert cache.data.abs().sum() == 0  # fresh positions read as zeros, never NaN
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1)
    cache.free(a)
    assert cache.allocate() == 0  # lowest slot first keeps the batch packed
    src = torch.randn(2, 2, 3, 5, 4)
    cache.write(1, src.to(torch.bfloat16))
    out = torch.empty(2, 2, 3, 5, 4, dtype=torch.bfloat16)
    torch.testing.assert_close(cache.read(1, 5, out), src.to(torch.bfloat16))
    with pytest.raises(ValueError):
        cache.free(2)

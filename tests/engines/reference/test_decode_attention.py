"""Decode attention per slot and length, and the decode-only step CUDA graphs capture, against transformers.

The Triton kernel runs on a GPU, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1`` with triton
installed); elsewhere it is skipped and the torch reference carries the same checks.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dynamo_lite.engines.reference import decode_attention as da
from dynamo_lite.engines.reference.cuda_graphs import buckets
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.loader import LlamaConfig, load_weights
from dynamo_lite.engines.reference.model import LlamaModel, build_step

transformers = pytest.importorskip("transformers")

CONFIG = dict(
    vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # noqa: ANN001
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, tie_word_embeddings=False))
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return hf.eval(), folder


def _ours(folder, decode_fn) -> tuple[LlamaModel, KvCache]:  # noqa: ANN001
    cfg = LlamaConfig.from_folder(folder)
    cpu = torch.device("cpu")
    model = LlamaModel(
        cfg, load_weights(folder, cfg, torch.float32, cpu), max_seq_len=64, decode_attention=decode_fn
    )
    return model, KvCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 5, 64, torch.float32, cpu)


def _hf_last(hf, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def _sequences() -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(3)
    return {
        slot: torch.randint(0, 128, (n,), generator=gen).tolist() for slot, n in ((4, 23), (1, 5), (2, 40))
    }


def test_decode_forward_matches_transformers_for_ragged_scattered_rows(tiny) -> None:  # noqa: ANN001
    hf, folder = tiny
    model, cache = _ours(folder, da.decode_attention_torch)
    seqs = _sequences()
    with torch.inference_mode():
        for slot, ids in seqs.items():
            model.forward(build_step([], [(slot, 0, ids[:-1])], [0], model.device), cache)
        rows = list(seqs.items())  # not sorted by slot: decode_forward keeps the given order
        logits = model.decode_forward(
            torch.tensor([ids[-1] for _, ids in rows]),
            torch.tensor([len(ids) - 1 for _, ids in rows]),
            torch.tensor([slot for slot, _ in rows]),
            cache,
        )
    for row, (_, ids) in enumerate(rows):
        torch.testing.assert_close(logits[row], _hf_last(hf, ids), atol=2e-4, rtol=1e-4)


def test_mixed_step_with_decode_attention_matches_transformers(tiny) -> None:  # noqa: ANN001
    hf, folder = tiny
    model, cache = _ours(folder, da.decode_attention_torch)
    seqs = _sequences()
    newcomer = [5, 6, 7, 8, 9, 10, 11]
    with torch.inference_mode():
        for slot, ids in seqs.items():
            model.forward(build_step([], [(slot, 0, ids[:-1])], [0], model.device), cache)
        decode = [(slot, len(ids) - 1, ids[-1]) for slot, ids in seqs.items()]
        logits = model.forward(build_step(decode, [(0, 0, newcomer)], [0, 1, 2, 3 + 6], model.device), cache)
    for row, slot in enumerate(sorted(seqs)):  # build_step orders decode rows by slot
        torch.testing.assert_close(logits[row], _hf_last(hf, seqs[slot]), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits[3], _hf_last(hf, newcomer), atol=2e-4, rtol=1e-4)


def test_reference_matches_plain_attention_per_row() -> None:
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(4, 2, 50, 16, generator=gen)
    v = torch.randn(4, 2, 50, 16, generator=gen)
    q = torch.randn(3, 6, 16, generator=gen)
    slots, lens = torch.tensor([3, 0, 1]), torch.tensor([50, 1, 17])
    got = da.decode_attention_torch(q, k, v, slots, lens, 0.25)
    for i in range(3):
        kk = k[slots[i], :, : lens[i]].repeat_interleave(3, dim=0)  # 6 query heads over 2 kv heads
        vv = v[slots[i], :, : lens[i]].repeat_interleave(3, dim=0)
        w = torch.softmax(q[i, :, None, :] @ kk.transpose(-1, -2) * 0.25, dim=-1)
        torch.testing.assert_close(got[i], (w @ vv).reshape(-1), atol=1e-5, rtol=1e-5)


triton_here = da.HAVE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not triton_here, reason="needs triton and a GPU (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(9, 3), (32, 8), (4, 4)])
def test_triton_kernel_matches_the_reference(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    error = da.self_check(dtype, heads, kv_heads, 64, device)
    assert error < (1e-5 if dtype == torch.float32 else 2e-2)


def test_graph_buckets_cover_every_batch_size() -> None:
    for top in (1, 3, 16, 17, 96, 130):
        sizes = buckets(top)
        assert sizes == sorted(set(sizes)) and sizes[0] == 1 and sizes[-1] == top
        assert all(next(s for s in sizes if s >= n) - n < max(8, n // 4 + 1) for n in range(1, top + 1))


def test_triton_is_optional() -> None:
    assert da.HAVE_TRITON == (importlib.util.find_spec("triton") is not None)

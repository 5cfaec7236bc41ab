"""The gpt-oss forward pass against transformers' ``GptOssForCausalLM`` on the tiny random model: whole prompts,
chunked prefill across the sliding window, decode past the ring's wrap, several sequences decoding in one step;
YaRN and the config against transformers'; and checks that the test data really exercises the window and the
sinks (a model without them gives other logits)."""

from __future__ import annotations

import copy

import pytest
import torch
from gpt_oss_testing import WINDOW, tiny_folder

from dynamo_lite.engines.reference.gpt_oss_loader import GptOssConfig, load_gpt_oss_weights, yarn_rope
from dynamo_lite.engines.reference.gpt_oss_model import GptOssModel
from dynamo_lite.engines.reference.kv_cache import KvCache
from dynamo_lite.engines.reference.model import build_step

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")
TOL = dict(atol=2e-5, rtol=1e-5)  # fp32 over a few layers; bit-exact where the shapes equal transformers'


@pytest.fixture(scope="module")
def folder(tmp_path_factory):  # noqa: ANN001
    return tiny_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def hf(folder):  # noqa: ANN001
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(folder):  # noqa: ANN001
    cfg = GptOssConfig.from_folder(folder)
    return GptOssModel(cfg, load_gpt_oss_weights(folder, cfg, torch.float32, CPU), max_seq_len=128)


def new_cache(model: GptOssModel, slots: int = 4) -> KvCache:
    cfg = model.config
    return KvCache(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, slots, 128, torch.float32, CPU, cfg.layer_windows
    )


def ids_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 199_998, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(hf, ids: list[int]) -> torch.Tensor:  # noqa: ANN001
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def test_config_reads_the_120b_and_20b_shapes() -> None:
    cfg = GptOssConfig.from_dict(transformers.GptOssConfig().to_dict())
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        36,
        2880,
        64,
        8,
        64,
    )
    assert (cfg.num_experts, cfg.experts_per_token, cfg.sliding_window) == (128, 4, 128)
    assert cfg.layer_windows[:4] == (128, 0, 128, 0) and len(cfg.layer_windows) == 36
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_theta == 150000.0
    small = GptOssConfig.from_dict(
        transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    )
    assert (small.num_layers, small.num_experts, sum(1 for w in small.layer_windows if w)) == (24, 32, 12)


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_equals_transformers(truncate: bool) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.GptOssConfig()
    hf_cfg.rope_parameters = {**hf_cfg.rope_parameters, "truncate": truncate}
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    ours_freq, ours_factor = yarn_rope(GptOssConfig.from_dict(hf_cfg.to_dict()))
    assert torch.equal(ours_freq, inv_freq) and ours_factor == factor


def test_whole_prompt_longer_than_the_window(hf, ours) -> None:  # noqa: ANN001
    ids = ids_of(3 * WINDOW + 5, seed=1)
    expected = hf_logits(hf, ids)
    got = ours.forward(build_step([], [(0, 0, ids)], list(range(len(ids))), CPU), new_cache(ours))
    torch.testing.assert_close(got, expected, **TOL)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_chunked_prefill_and_decode_across_the_window(hf, ours) -> None:  # noqa: ANN001
    """Chunks that start inside, at and past the window's reach, then decode steps that wrap the ring."""
    ids = ids_of(60, seed=2)
    expected = hf_logits(hf, ids)
    cache = new_cache(ours)
    rows, start = [], 0
    for n in (7, WINDOW, 3, WINDOW + 9):  # ends at 7, 23, 26, 51
        out = ours.forward(build_step([], [(2, start, ids[start : start + n])], list(range(n)), CPU), cache)
        rows.append(out)
        start += n
    for p in range(start, len(ids)):
        rows.append(ours.forward(build_step([(2, p, ids[p])], [], [0], CPU), cache))
    torch.testing.assert_close(torch.cat(rows), expected, **TOL)


def test_sequences_of_different_lengths_decode_in_one_step(hf, ours) -> None:  # noqa: ANN001
    """One step: three decode rows (one still inside the window, two past it; non-adjacent slots) and a
    prefill chunk continuing a fourth sequence."""
    seqs = {0: ids_of(9, 3), 1: ids_of(40, 4), 3: ids_of(33, 5)}
    cont = ids_of(30, 6)
    cache = new_cache(ours)
    for slot, ids in seqs.items():
        ours.forward(build_step([], [(slot, 0, ids[:-1])], [len(ids) - 2], CPU), cache)
    ours.forward(build_step([], [(2, 0, cont[:20])], [19], CPU), cache)
    decode = [(slot, len(ids) - 1, ids[-1]) for slot, ids in seqs.items()]
    batch = build_step(decode, [(2, 20, cont[20:])], [0, 1, 2, 3 + 9], CPU)
    got = ours.forward(batch, cache)
    for row, ids in enumerate(seqs.values()):
        torch.testing.assert_close(got[row], hf_logits(hf, ids)[-1], **TOL)
    torch.testing.assert_close(got[3], hf_logits(hf, cont)[-1], **TOL)


def test_the_window_and_the_sinks_change_the_logits(hf) -> None:  # noqa: ANN001
    """Sensitivity of the tests above: transformers' model without its window, or without its sinks, gives
    clearly other logits on a prompt longer than the window (so an engine ignoring either would fail them)."""
    ids = ids_of(3 * WINDOW, seed=7)
    expected = hf_logits(hf, ids)[-1]
    full = copy.deepcopy(hf)
    for layer in full.model.layers:
        layer.self_attn.sliding_window = None
    full.config.layer_types = ["full_attention"] * len(full.model.layers)
    assert (hf_logits(full, ids)[-1] - expected).abs().max() > 0.1
    sinkless = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in sinkless.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert (hf_logits(sinkless, ids)[-1] - expected).abs().max() > 0.1


def test_ring_cache_keeps_the_last_window_positions() -> None:
    cache = KvCache(2, 1, 4, 2, 64, torch.float32, CPU, (8, 0))
    assert cache.windowed_layers == [0] and cache.full_layers == [1] and cache.window == 8
    assert cache.layers[0][0].shape == (2, 1, 8, 4) and cache.layers[1][0].shape == (2, 1, 64, 4)
    slots, positions = torch.tensor([1] * 20), torch.arange(20)
    rows = cache.store_index(slots, positions, window=8)
    assert sorted(set((rows % 8).tolist())) == list(range(8))  # 20 positions land on the 8 ring entries
    parts = cache.slot_parts(1, 20)
    assert [tuple(p.shape) for p in parts] == [(1, 2, 1, 20, 4), (1, 2, 1, 8, 4)]
    assert [tuple(p.shape) for p in cache.slot_parts(1, 5)] == [(1, 2, 1, 5, 4), (1, 2, 1, 5, 4)]
    with pytest.raises(ValueError, match="one sliding window"):
        KvCache(2, 1, 4, 2, 64, torch.float32, CPU, (8, 16))


def test_the_three_expert_paths_compute_the_same(ours) -> None:  # noqa: ANN001
    """grouped_mm (CPU and bf16 GPUs), dense (other GPU dtypes, and large decode batches) and the loop agree."""
    import functools

    from dynamo_lite.engines.reference import moe

    cfg, lw = ours.config, ours.weights.layers[1]
    h = torch.randn(37, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    weights, ids = moe.route(h, lw.router, lw.router_bias, cfg.experts_per_token)
    experts = (lw.gate_up, lw.gate_up_bias, lw.down, lw.down_bias)
    args = (weights, ids, *experts, cfg.swiglu_limit, cfg.swiglu_alpha)
    loop = functools.partial(moe.experts, grouped_mm=moe._grouped_mm_loop)(h, *args)
    torch.testing.assert_close(moe.experts_dense(h, *args), loop, atol=1e-5, rtol=1e-5)
    plan = moe.pick_experts(torch.float32, CPU)
    assert plan.graph_safe == (plan.name == "grouped_mm")
    torch.testing.assert_close(plan.fn(h, *args), loop, atol=1e-5, rtol=1e-5)
    assert len(set(ids.flatten().tolist())) == cfg.num_experts  # every expert had rows


def test_decode_forward_equals_a_decode_step_of_forward(ours) -> None:  # noqa: ANN001
    """The decode-only step CUDA graphs capture (each residual add with the norm after it, K/V stored by the rope
    call) gives the general step's logits and cache bit for bit; rows past the window wrap the ring."""
    seqs = {0: ids_of(9, 11), 3: ids_of(2 * WINDOW + 3, 12), 1: ids_of(WINDOW, 13)}
    caches = [new_cache(ours), new_cache(ours)]
    for cache in caches:
        for slot, ids in seqs.items():
            ours.forward(build_step([], [(slot, 0, ids[:-1])], [len(ids) - 2], CPU), cache)
    decode = sorted((slot, len(ids) - 1, ids[-1]) for slot, ids in seqs.items())
    with torch.inference_mode():
        general = ours.forward(build_step(decode, [], list(range(len(decode))), CPU), caches[0])
        step = ours.decode_forward(
            torch.tensor([tok for _, _, tok in decode]),
            torch.tensor([pos for _, pos, _ in decode]),
            torch.tensor([slot for slot, _, _ in decode]),
            caches[1],
        )
    assert torch.equal(step, general)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].groups, caches[1].groups, strict=True))

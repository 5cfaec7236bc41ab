"""The GPU prefill benchmark's CPU-side logic (``benchmarks/gpu/prefill_attention.py``): its FLOP count and a
smoke run of both parts at the tiny shape on CPU, so the script runs the first time it meets a GPU."""

from __future__ import annotations

import json

from benchmarks.gpu import prefill_attention as bench


def test_flops_per_token_counts_active_parameters_and_visible_keys() -> None:
    assert bench.visible_keys(4, 0) == 1 + 2 + 3 + 4
    assert bench.visible_keys(5, 2) == 1 + 2 + 2 + 2 + 2
    cfg = bench.config_of("20b", tiny=False)
    f = bench.flops_per_token(cfg, 1000)
    # gpt-oss-20b without embedding/unembedding: ~3.0 B active parameters a token (3.6 B with them).
    assert 2.9e9 < f["active_params"] < 3.1e9
    assert f["total"] == f["dense"] + f["attention"] and 0 < f["attention"] < 0.05 * f["dense"]
    assert (
        bench.flops_per_token(bench.config_of("120b", tiny=False), 1000)["active_params"] > f["active_params"]
    )


def test_both_parts_run_at_the_tiny_shape_on_cpu(tmp_path) -> None:  # noqa: ANN001
    small = ["--tiny", "--device", "cpu", "--prompts", "2", "--prompt-len", "20", "--iters", "1"]
    assert bench.main(["kernel", *small, "--json", str(tmp_path / "k.json")]) == 0
    kernel = json.loads((tmp_path / "k.json").read_text())
    assert kernel["per_layer"]["full"]["eager_ms"] > 0 and "tiny" in kernel["per_model"]
    assert bench.main(["model", *small, "--step-tokens", "40", "--json", str(tmp_path / "m.json")]) == 0
    model = json.loads((tmp_path / "m.json").read_text())
    assert model["prefill"]["eager"]["tokens_per_s"] > 0 and "attention_ms" in model["parts_one_step"]

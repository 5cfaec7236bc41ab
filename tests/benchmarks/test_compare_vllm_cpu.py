"""benchmarks.compare_vllm_cpu's own logic: the servers' command lines, the alternation, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.compare_vllm_cpu import RunResult, order, parse_args, server_spec, table


def test_the_systems_alternate_and_every_other_round_is_reversed() -> None:
    systems = ["lite", "vllm", "lite-bf16", "vllm-2t"]
    assert order(systems, 0) == systems
    assert order(systems, 1) == systems[::-1]


def test_server_command_lines_compare_like_for_like() -> None:
    lite = server_spec("lite", 8000, None, None)
    assert "--dtype" not in lite.argv  # the defaults, as a new user runs them
    bf16 = server_spec("lite-bf16", 8000, None, None)
    assert bf16.argv[-4:] == ["--dtype", "bfloat16", "--quantization", "none"]
    vllm = server_spec("vllm", 8001, Path("/venv/bin/python"), Path("/m"))
    assert vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert vllm.argv[vllm.argv.index("--dtype") + 1] == "bfloat16"
    assert "PYTHONPATH" in vllm.drop_env  # our checkout must not shadow vLLM's packages
    two = server_spec("vllm-2t", 8001, Path("/venv/bin/python"), Path("/m"))
    assert two.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert two.env["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")


def test_the_table_gives_medians_ranges_and_the_load() -> None:
    runs = [
        RunResult("lite", 0, {"long_ttft_p50_ms": 500.0, "c8_tok_s": 100.0}, [1.0, 2.0]),
        RunResult("lite", 1, {"long_ttft_p50_ms": 700.0, "c8_tok_s": 120.0}, [3.0]),
        RunResult("vllm", 0, {"long_ttft_p50_ms": 900.0}, [1.5]),
    ]
    text = table(runs, ["lite", "vllm", "vllm-2t"])
    assert "| lite | - | 110.0 [100.0–120.0] | - | 600.0 [500.0–700.0] | 1.0–3.0 |" in text
    assert "| vllm | - | - | - | 900.0 | 1.5–1.5 |" in text
    assert "vllm-2t" not in text  # not run, no row


def test_unknown_systems_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--systems", "lite,tgi"])
    assert "unknown systems" in capsys.readouterr().err

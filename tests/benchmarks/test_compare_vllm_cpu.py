"""benchmarks.compare_vllm_cpu's own logic: the servers' command lines, the alternation, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.compare_vllm_cpu import (
    ISSUE_TABLE,
    RunResult,
    order,
    parse_args,
    server_spec,
    table,
    verdicts,
)


def test_the_systems_alternate_and_every_other_round_is_reversed() -> None:
    systems = ["lite", "vllm", "lite-bf16", "vllm-2t"]
    assert order(systems, 0) == systems
    assert order(systems, 1) == systems[::-1]


def test_server_command_lines_compare_like_for_like() -> None:
    lite = server_spec("lite", 8000, None, None)
    assert "--dtype" not in lite.argv  # the defaults, as a new user runs them
    bf16 = server_spec("lite-bf16", 8000, None, None)
    assert bf16.argv[-4:] == ["--dtype", "bfloat16", "--quantization", "none"]
    vllm = server_spec("vllm", 8001, (Path("/venv/bin/python"), Path("/m")), None)
    assert vllm.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert vllm.argv[vllm.argv.index("--dtype") + 1] == "bfloat16"
    assert "PYTHONPATH" in vllm.drop_env  # our checkout must not shadow vLLM's packages
    two = server_spec("vllm-2t", 8001, (Path("/venv/bin/python"), Path("/m")), None)
    assert two.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert two.env["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")
    ours = server_spec("lite-llamacpp", 8002, None, None)
    assert ours.argv[-2:] == ["--engine", "llamacpp"]
    theirs = server_spec("llama-server", 8003, None, Path("/bin/llama-server"))
    assert theirs.argv[0] == "/bin/llama-server"
    assert theirs.argv[theirs.argv.index("-m") + 1].endswith(".gguf")  # the same GGUF as --engine llamacpp
    assert theirs.argv[theirs.argv.index("--host") + 1] == "127.0.0.1"
    assert int(theirs.argv[theirs.argv.index("-np") + 1]) >= 8  # c=8 decodes together, not queued


def test_the_default_is_the_issue_table() -> None:
    assert parse_args([]).systems == list(ISSUE_TABLE)
    assert {"lite", "lite-bf16", "vllm", "lite-llamacpp", "llama-server"} == set(ISSUE_TABLE)


def test_the_acceptance_is_checked_like_for_like_per_round_and_over_medians() -> None:
    runs = [
        RunResult("lite-bf16", 0, {"long_ttft_p50_ms": 500.0, "c8_tok_s": 210.0}),
        RunResult("vllm", 0, {"long_ttft_p50_ms": 800.0, "c8_tok_s": 200.0}),
        RunResult("lite-bf16", 1, {"long_ttft_p50_ms": 900.0, "c8_tok_s": 190.0}),
        RunResult("vllm", 1, {"long_ttft_p50_ms": 700.0, "c8_tok_s": 230.0}),
        RunResult("lite-llamacpp", 0, {"c1_itl_p50_ms": 8.0}),  # llama-server not run: no line
    ]
    lines = verdicts(runs)
    assert len(lines) == 2
    ttft, c8 = lines
    assert ttft.startswith("~1000-token TTFT, bf16 vs vLLM: lite-bf16 700.0 vs vllm 750.0")
    assert "-> met; ours at least level in 1 of 2 rounds" in ttft  # lower is better
    assert "lite-bf16 200.0 vs vllm 215.0" in c8 and "-> NOT met" in c8  # higher is better


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

"""``dtype: auto`` by CPU capability: each kind of CPU gets a dtype it computes natively, an explicit dtype it
emulates a warning, and the weight-only kernels' activations follow the chosen dtype. The CPUs are injected, so
these run the same on any test machine."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.reference.config import from_settings
from dynamo_lite.engines.reference.cpu_capability import (
    CpuCapability,
    _cpuinfo_flags,
    choose_dtype,
    detect_cpu,
)

# /proc/cpuinfo flags (the relevant ones) of the CPUs our machines come with, and of two in between.
EPYC_AVX2 = CpuCapability.of("AVX2", "avx2", "fma", "f16c")  # Zen 2/3 cloud VMs: this project's CI
XEON_AMX = CpuCapability.of(  # Sapphire Rapids
    "AVX512", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip
ZEN4 = CpuCapability.of("AVX512", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16")
CASCADE_LAKE = CpuCapability.of("AVX512", "avx2", "fma", "f16c", "avx512f", "avx512_vnni")
CPUS = {"epyc_avx2": EPYC_AVX2, "xeon_amx": XEON_AMX, "zen4": ZEN4, "cascade_lake": CASCADE_LAKE}


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [("epyc_avx2", "float32"), ("xeon_amx", "bfloat16"), ("zen4", "bfloat16"), ("cascade_lake", "float32")],
)
def test_auto_picks_a_dtype_the_cpu_runs_natively(cpu: str, expected: str) -> None:
    choice = choose_dtype("auto", "cpu", CPUS[cpu])
    assert choice.dtype == expected and not choice.warning
    assert CPUS[cpu].native(choice.dtype)


def test_explicit_bf16_on_an_avx2_cpu_runs_but_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        cfg = from_settings(EngineSettings(dtype="bfloat16"), cpu=EPYC_AVX2)
    assert cfg.dtype == "bfloat16"  # what was asked for still runs
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "bfloat16 is emulated" in warnings[0] and "auto picks float32" in warnings[0]
    assert "no avx512f avx512_bf16 amx_bf16" in warnings[0]  # names what the CPU lacks


@pytest.mark.parametrize(
    ("cpu", "dtype"), [("xeon_amx", "bfloat16"), ("xeon_amx", "float16"), ("zen4", "bfloat16")]
)
def test_explicit_native_dtypes_do_not_warn(cpu: str, dtype: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert from_settings(EngineSettings(dtype=dtype), cpu=CPUS[cpu]).dtype == dtype
        assert from_settings(EngineSettings(dtype="float32"), cpu=EPYC_AVX2).dtype == "float32"
    assert not caplog.records, caplog.text


def test_fp16_without_avx512_fp16_warns() -> None:
    assert "float16 is emulated" in choose_dtype("float16", "cpu", ZEN4).warning


def test_the_default_is_auto_and_the_yaml_can_ask_for_it() -> None:
    assert EngineSettings().dtype == "auto"
    assert from_settings(EngineSettings(), cpu=EPYC_AVX2).dtype == "float32"
    assert from_settings(EngineSettings(), cpu=XEON_AMX).dtype == "bfloat16"
    pinned = EngineSettings(dtype="bfloat16", extra={"dtype": "auto"}, extra_source="t.yaml")
    assert from_settings(pinned, cpu=EPYC_AVX2).dtype == "float32"


@pytest.mark.parametrize(("cpu", "activations"), [("epyc_avx2", "float32"), ("xeon_amx", "bfloat16")])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_weight_only_kernels_take_activations_the_cpu_runs_natively(
    cpu: str, activations: str, quantization: str
) -> None:
    cfg = from_settings(EngineSettings(quantization=quantization), cpu=CPUS[cpu])
    assert (cfg.dtype, cfg.quantization) == (activations, quantization)


@pytest.mark.parametrize(("cuda_bf16", "expected"), [(True, "bfloat16"), (False, "float32")])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it(cuda_bf16: bool, expected: str) -> None:
    assert choose_dtype("auto", "cuda:0", EPYC_AVX2, cuda_bf16=cuda_bf16).dtype == expected
    assert choose_dtype("float16", "cuda", EPYC_AVX2, cuda_bf16=cuda_bf16).dtype == "float16"


def test_cpuinfo_flags_are_read_from_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_bf16_extra\n"
        "processor\t: 1\nflags\t\t: ignored after the first\n"
    )
    assert _cpuinfo_flags(cpuinfo) == [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
    ]
    assert _cpuinfo_flags(tmp_path / "missing") == []


def test_this_machine_is_described_consistently() -> None:
    cpu = detect_cpu()
    assert cpu.isa == torch.backends.cpu.get_cpu_capability()
    assert cpu.describe().startswith(cpu.isa)
    assert cpu.native(choose_dtype("auto", "cpu", cpu).dtype)
    if not torch.cpu._is_amx_tile_supported():  # tiles the OS didn't enable are no AMX
        assert not cpu.amx

"""What this CPU computes natively, and the compute dtype the torch engine picks from it (``dtype: auto``).

bfloat16 matmuls are native only with AVX512-BF16 (dot-product instructions: Cooper Lake, Zen 4 and later) or
AMX (tile instructions: Sapphire Rapids and later Xeons); everywhere else oneDNN and ATen emulate them by
widening to fp32 around every operation. Measured on a 2-core AVX2-only EPYC (SmolLM2, 2 threads): a
1000-token prompt took 27-28 s in bf16 against 3-5 s in fp32. float16 is native only with AVX512-FP16 or
AMX-FP16. fp32 is native everywhere. So ``auto`` is:

- CPU: bfloat16 where it is native (AMX or AVX512-BF16), else float32;
- CUDA: bfloat16 where the GPU has it (Ampere and later), else float32.

An explicit dtype the CPU emulates still runs (the user may want bf16's memory footprint), with one warning.
``CpuCapability`` is a plain value so tests can inject any CPU: ``detect_cpu()`` is the only place that looks at
the real one.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The /proc/cpuinfo flags that decide a kernel; the rest of the (long) list says nothing to us.
RELEVANT_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)
# torch's own probes (CPUID and the OS's permission, e.g. AMX needs the kernel to enable its tile state):
# where torch can answer, its answer wins over /proc/cpuinfo.
_TORCH_PROBES = {
    "avx2": "_is_avx2_supported",
    "avx512f": "_is_avx512_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}


@dataclass(frozen=True, slots=True)
class CpuCapability:
    """A CPU as the engine sees it: ``isa`` is torch's vectorization level for its own kernels
    (``torch.backends.cpu.get_cpu_capability()``: ``"DEFAULT"``, ``"AVX2"``, ``"AVX512"``, ...), ``flags`` the
    ``/proc/cpuinfo`` names of what the CPU runs natively (``RELEVANT_FLAGS``)."""

    isa: str
    flags: frozenset[str]

    @classmethod
    def of(cls, isa: str, *flags: str) -> CpuCapability:
        return cls(isa, frozenset(flags))

    @property
    def amx(self) -> bool:
        return {"amx_tile", "amx_bf16"} <= self.flags

    @property
    def bf16_native(self) -> bool:
        return self.amx or "avx512_bf16" in self.flags

    @property
    def fp16_native(self) -> bool:
        return "avx512_fp16" in self.flags or {"amx_tile", "amx_fp16"} <= self.flags

    def native(self, dtype: str) -> bool:
        """Whether matmuls in ``dtype`` ("float32" | "bfloat16" | "float16") run natively."""
        if dtype == "bfloat16":
            return self.bf16_native
        if dtype == "float16":
            return self.fp16_native
        return True

    def describe(self) -> str:
        """One line for logs and benchmark output, e.g. ``AVX2 [avx2 fma f16c; no avx512f avx512_bf16 amx_bf16]``."""
        have = [f for f in RELEVANT_FLAGS if f in self.flags]
        lacking = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f not in self.flags]
        return f"{self.isa} [{' '.join(have) or '-'}{'; no ' + ' '.join(lacking) if lacking else ''}]"


@functools.cache
def detect_cpu() -> CpuCapability:
    """This machine's CPU (read once per process)."""
    import torch

    flags = set(_cpuinfo_flags())
    for name, probe in _TORCH_PROBES.items():
        fn = getattr(torch.cpu, probe, None)
        if fn is None:
            continue
        try:
            supported = bool(fn())
        except Exception:  # a probe this build lacks or that fails: /proc/cpuinfo stands
            continue
        if supported:
            flags.add(name)
        else:
            flags.discard(name)
            if name == "amx_tile":  # no usable tiles: no AMX of any kind
                flags -= {"amx_bf16", "amx_int8", "amx_fp16"}
    return CpuCapability(torch.backends.cpu.get_cpu_capability(), frozenset(flags))


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> list[str]:
    try:
        text = path.read_text()
    except OSError:  # not Linux: torch's probes alone
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.partition(":")[2].split())
            return [f for f in RELEVANT_FLAGS if f in present]
    return []


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """The dtype the engine computes in, why, and the warning an emulated explicit choice deserves."""

    dtype: str
    reason: str
    warning: str = ""


def choose_dtype(
    requested: str, device: str, cpu: CpuCapability | None = None, cuda_bf16: bool | None = None
) -> DtypeChoice:
    """Resolve ``requested`` ("auto" or a dtype name) for ``device``. ``cpu`` / ``cuda_bf16`` describe the
    hardware (None: detected here)."""
    if device.split(":")[0] == "cuda":
        if requested != "auto":
            return DtypeChoice(requested, "requested")
        bf16 = _cuda_bf16_supported(device) if cuda_bf16 is None else cuda_bf16
        if bf16:
            return DtypeChoice("bfloat16", "auto: the GPU computes bf16 natively")
        return DtypeChoice("float32", "auto: the GPU has no bf16")
    cpu = cpu or detect_cpu()
    if requested == "auto":
        if cpu.bf16_native:
            kind = "AMX" if cpu.amx else "AVX512-BF16"
            return DtypeChoice("bfloat16", f"auto: bf16 is native on this CPU ({kind})")
        return DtypeChoice(
            "float32", f"auto: bf16 would be emulated on this CPU ({cpu.isa}, no AVX512-BF16/AMX)"
        )
    if cpu.native(requested):
        return DtypeChoice(requested, "requested")
    short = "bf16" if requested == "bfloat16" else "fp16"
    needs = "AVX512-BF16 or AMX" if requested == "bfloat16" else "AVX512-FP16 or AMX-FP16"
    return DtypeChoice(
        requested,
        "requested",
        f"dtype {requested} is emulated on this CPU ({cpu.describe()}; native {short} needs {needs}): "
        f"prefill runs several times slower than float32; dtype auto picks float32 here",
    )


def _cuda_bf16_supported(device: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        return True  # the engine refuses to start without CUDA anyway; bf16 is what it would pick
    index = torch.device(device).index
    with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
        return bool(torch.cuda.is_bf16_supported())

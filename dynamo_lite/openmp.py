"""How OpenMP threads wait between parallel regions, per engine; must run before torch is imported.

torch engine: a decode step is hundreds of short parallel regions. Sleeping at once after each
(``OMP_WAIT_POLICY=PASSIVE``) pays a futex wake-up per region: single-stream decode was 25-30 % slower on 2 cores
(SmolLM2, int8: 29-30 vs 22.6-23.3 ms/token). libgomp's default spins ~300k iterations (milliseconds) after
every region, which stole the core from the event loop and the other worker. A bounded spin of ~10k iterations
(well under a millisecond) keeps the workers awake within a step and lets them sleep between steps.

llamacpp engine: ggml's graph runs as one parallel region per ``llama_decode`` whose per-op barriers are OpenMP
barriers, so the spin count sets how long a ggml thread spins at each of them before it sleeps. torch's and
ggml's libgomp are one runtime in a process (the same soname), so the torch engine's bound would apply to ggml
too: measured on 2 cores (``benchmarks/README.md``, ``--engine llamacpp``), bare llama.cpp with the 10k bound
decoded at 55-62 ms/token beside one busy process vs 22-24 with libgomp's default, and passive waiting was 2x
slower on a quiet box. That engine keeps libgomp's default, stated explicitly so that a later call keeps it.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"  # the torch engine's bound
LIBGOMP_DEFAULT_SPIN_COUNT = "300000"  # libgomp's own when OMP_WAIT_POLICY is unset
SPIN_COUNTS = {"llamacpp": LIBGOMP_DEFAULT_SPIN_COUNT}  # engines that differ from SPIN_COUNT


def configure_openmp(engine: str = "torch") -> None:
    """Set ``engine``'s spin unless the user chose a wait policy or spin, torch already loaded, or an earlier
    call chose (the first caller wins: the process's OpenMP runtime reads it once)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNTS.get(engine, SPIN_COUNT))

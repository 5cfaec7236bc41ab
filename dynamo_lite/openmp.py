"""How torch's OpenMP threads wait between parallel regions; must run before torch is imported.

A decode step is hundreds of short parallel regions. Sleeping at once after each (``OMP_WAIT_POLICY=PASSIVE``)
pays a futex wake-up per region: single-stream decode was 25-30 % slower on 2 cores (SmolLM2, int8: 29-30 vs
22.6-23.3 ms/token). libgomp's default spins ~300k iterations (milliseconds) after every region, which stole
the core from the event loop and the other worker. A bounded spin of ~10k iterations (well under a
millisecond) keeps the workers awake within a step and lets them sleep between steps.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def configure_openmp() -> None:
    """Set the bounded spin unless the user chose a wait policy or torch already loaded."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)

"""``configure_openmp``: each engine's spin, the first caller's choice kept, a user's choice never overridden.
Each case runs in a fresh interpreter: the setting only applies before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def spin_after(calls: str, **env: str) -> str:
    code = "import os; from dynamo_lite.openmp import configure_openmp; " + calls
    code += "; print(os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(ROOT), **env}, capture_output=True,
        text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("calls", "env", "spin"),
    [
        ("configure_openmp()", {}, "10000"),  # the torch engine's bound
        ("configure_openmp('llamacpp')", {}, "300000"),  # libgomp's default, stated
        ("configure_openmp('llamacpp'); configure_openmp()", {}, "300000"),  # the first caller wins
        ("configure_openmp()", {"GOMP_SPINCOUNT": "5"}, "5"),  # the user's
        ("configure_openmp('llamacpp')", {"OMP_WAIT_POLICY": "passive"}, "None"),  # the user's policy
        ("import torch; configure_openmp()", {}, "None"),  # too late: torch has loaded
    ],
)
def test_spin_per_engine(calls: str, env: dict[str, str], spin: str) -> None:
    assert spin_after(calls, **env) == spin

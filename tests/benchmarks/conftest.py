"""Fixtures for the load generator's tests: the repo root on sys.path (``benchmarks`` is not installed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    from dynamo_lite.model_files import resolve_model

    return resolve_model().tokenizer_json

"""``--engine trtllm`` where TensorRT-LLM is missing or broken: one clear line, before anything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from trtllm_testing import forget_tensorrt_llm

from dynamo_lite.engines import build_engine as build_named_engine
from dynamo_lite.engines.base import EngineSettings, EngineUnavailable
from dynamo_lite.engines.trtllm import build_engine

HINT = "--engine trtllm needs TensorRT-LLM: pip install 'dynamo_lite[trtllm]' (NVIDIA GPU, CUDA 12.x/13.x)"


@pytest.fixture
def no_tensorrt_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_tensorrt_llm()
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes the import fail, as when not installed


def test_missing_library_raises_one_line(no_tensorrt_llm: None) -> None:
    with pytest.raises(EngineUnavailable) as info:
        build_engine(EngineSettings(role="prefill", model_path="/does/not/matter"))
    message = str(info.value)
    assert message.startswith(HINT + " — tensorrt_llm is not importable here (ModuleNotFoundError")
    assert "\n" not in message


def test_missing_library_through_the_engine_registry(no_tensorrt_llm: None) -> None:
    with pytest.raises(EngineUnavailable, match="pip install 'dynamo_lite\\[trtllm\\]'"):
        build_named_engine("trtllm", EngineSettings())


def test_broken_install_is_unavailable_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "tensorrt_llm"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise OSError('libcuda.so.1: cannot open shared object file:\\n No such file or directory')\n"
    )
    forget_tensorrt_llm()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EngineUnavailable) as info:
        build_engine(EngineSettings())
    assert str(info.value) == (
        HINT + " — tensorrt_llm is not importable here "
        "(OSError: libcuda.so.1: cannot open shared object file: No such file or directory)"
    )
    forget_tensorrt_llm()


def test_adapter_modules_import_without_tensorrt_llm() -> None:
    # A fresh interpreter: importing the adapter must not import tensorrt_llm (it is optional).
    code = (
        "import sys; sys.modules['tensorrt_llm'] = None\n"
        "import dynamo_lite.engines.trtllm, dynamo_lite.engines.trtllm.engine\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

"""Fixtures for the TensorRT-LLM adapter's tests: the stand-in ``tensorrt_llm`` and a small model folder.

The stand-in (``standin/tensorrt_llm``, NOT TensorRT-LLM) is put on ``sys.path`` only by the ``standin``
fixture; other processes get it with ``PYTHONPATH=tests/engines/trtllm/standin``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from trtllm_testing import EOS_ID, STANDIN_PATH, VOCAB_SIZE, forget_tensorrt_llm


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """``import tensorrt_llm`` finds the stand-in for the duration of the test."""
    forget_tensorrt_llm()
    monkeypatch.syspath_prepend(str(STANDIN_PATH))
    monkeypatch.delenv("TRTLLM_STANDIN_STEP_DELAY_S", raising=False)
    monkeypatch.delenv("TRTLLM_STANDIN_EOS_AFTER", raising=False)
    import tensorrt_llm

    assert tensorrt_llm.IS_STANDIN
    yield tensorrt_llm
    forget_tensorrt_llm()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A Hugging Face-style folder: config, tokenizer, generation config (the stand-in needs no weights)."""
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"vocab_size": VOCAB_SIZE, "eos_token_id": EOS_ID, "max_position_embeddings": 4096}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder

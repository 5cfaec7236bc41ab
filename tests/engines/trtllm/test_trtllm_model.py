"""Finding the checkpoint for TensorRT-LLM: a folder, or a repo id in the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_lite.engines.trtllm.model import hf_cache_dir, hf_cache_snapshot, resolve_trtllm_model
from dynamo_lite.model_files import ModelNotFound


def fake_snapshot(cache: Path, repo_id: str, revision: str, ref: bool = True) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"vocab_size": 201088}')
    (snapshot / "tokenizer.json").write_text("{}")
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision + "\n")
    return snapshot


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hf_cache_dir() == tmp_path / "cache"


def test_repo_id_resolves_to_its_cached_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    fake_snapshot(tmp_path, "openai/gpt-oss-120b", "aaa111", ref=False)
    (tmp_path / "models--openai--gpt-oss-120b" / "snapshots" / "bbb222").mkdir()
    (tmp_path / "models--openai--gpt-oss-120b" / "refs").mkdir()
    (tmp_path / "models--openai--gpt-oss-120b" / "refs" / "main").write_text("aaa111")
    files = resolve_trtllm_model("openai/gpt-oss-120b")
    assert files.folder == tmp_path / "models--openai--gpt-oss-120b" / "snapshots" / "aaa111"
    assert files.vocab_size == 201088


def test_single_snapshot_without_ref(tmp_path: Path) -> None:
    snapshot = fake_snapshot(tmp_path, "org/model", "ccc333", ref=False)
    assert hf_cache_snapshot("org/model", tmp_path) == snapshot


def test_uncached_repo_id_says_how_to_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="hf download openai/gpt-oss-120b --local-dir"):
        resolve_trtllm_model("openai/gpt-oss-120b")


def test_local_folder_wins(tmp_path: Path) -> None:
    folder = tmp_path / "gpt-oss-120b"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    assert resolve_trtllm_model(str(folder)).folder == folder


def test_missing_folder_path_is_not_taken_for_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="neither a folder nor a .gguf file"):
        resolve_trtllm_model(str(tmp_path / "nope" / "deeper"))

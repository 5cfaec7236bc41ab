"""Where TensorRT-LLM's model is: a local Hugging Face folder, or a repo id already in the local HF cache.

TensorRT-LLM loads a Hugging Face checkpoint folder. ``--model-path`` may name that folder, or a repo id such
as ``openai/gpt-oss-120b`` that ``hf download`` has already put in the Hugging Face cache; we look the
snapshot up on disk and never download (no hub access at run time).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dynamo_lite.model_files import (
    DEFAULT_MODEL,
    DEFAULT_SERVED_NAME,
    ModelFiles,
    ModelNotFound,
    resolve_model,
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` computes it from the environment."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hf_cache_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The local snapshot folder of ``repo_id`` (the ``main`` ref, else the only snapshot), or ``None``."""
    repo = (cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    return found[0] if len(found) == 1 else None


def resolve_trtllm_model(model_path: str | None) -> ModelFiles:
    """Resolve ``--model-path`` for TensorRT-LLM: a local folder (or the built-in default), or a cached repo.

    Raises ``ModelNotFound`` with the download command when a repo id is not in the local cache.
    """
    if model_path is None or model_path in (DEFAULT_MODEL, DEFAULT_SERVED_NAME):
        return resolve_model(model_path)
    path = Path(model_path).expanduser()
    if path.exists() or not _REPO_ID.match(model_path):
        return resolve_model(path)
    snapshot = hf_cache_snapshot(model_path)
    if snapshot is None:
        raise ModelNotFound(
            f"--model-path {model_path!r} is neither a local folder nor in the Hugging Face cache "
            f"({hf_cache_dir()}); download it first: hf download {model_path} --local-dir /models/NAME "
            f"(then --model-path /models/NAME)"
        )
    return resolve_model(snapshot)

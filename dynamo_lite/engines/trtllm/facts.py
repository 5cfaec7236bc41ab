"""TensorRT-LLM's API per release line, from ``api_facts.yaml``: what each class accepts, since when.

The adapter uses it to leave out a YAML key the installed release does not have yet (with a warning), tests
use it to hold our YAMLs, the adapter's keywords and the stand-in to the real library. On a machine with
TensorRT-LLM, ``python -m dynamo_lite.engines.trtllm.facts`` compares the recorded facts with the installed
classes and prints every difference.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

FACTS_FILE = Path(__file__).with_name("api_facts.yaml")


@dataclass(frozen=True, slots=True)
class FieldFact:
    name: str
    type: str
    optional: bool = False
    since: str = "1.0"
    values: tuple[str, ...] = ()
    cls: str = ""  # the config class of a nested section


@functools.cache
def load_facts() -> dict[str, Any]:
    return yaml.safe_load(FACTS_FILE.read_text())


def releases() -> list[str]:
    return list(load_facts()["releases"])


def _key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


def release_line(version: str) -> str:
    """The recorded release line a ``tensorrt_llm.__version__`` belongs to (newer ones: the latest line;
    unparsable ones, e.g. the stand-in's: the latest too)."""
    lines = releases()
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if not match:
        return lines[-1]
    major_minor = (int(match[1]), int(match[2]))
    known = [r for r in lines if _key(r) <= major_minor]
    return known[-1] if known else lines[0]


def fields(cls: str, release: str | None = None) -> dict[str, FieldFact]:
    """The recorded fields of ``cls`` (all of them, or those a ``release`` line has)."""
    out = {}
    for name, raw in load_facts()["classes"][cls]["fields"].items():
        fact = FieldFact(
            name,
            raw["type"],
            bool(raw.get("optional", False)),
            str(raw.get("since", "1.0")),
            tuple(raw.get("values", ())),
            raw.get("class", ""),
        )
        if release is None or _key(fact.since) <= _key(release):
            out[name] = fact
    return out


def sources(cls: str) -> list[str]:
    facts = load_facts()
    return [facts["sources"][s]["where"] for s in facts["classes"][cls]["source"]]


def drop_unsupported(args: dict[str, Any], version: str) -> tuple[dict[str, Any], list[str]]:
    """``LLM(...)`` keyword arguments without the recorded fields that ``version`` does not have yet.

    Returns ``(args, warnings)``; keys we have no facts about stay (TensorRT-LLM judges them)."""
    line = release_line(version)
    warnings: list[str] = []

    def walk(values: dict[str, Any], cls: str, prefix: str) -> dict[str, Any]:
        every, here = fields(cls), fields(cls, line)
        out = {}
        for key, value in values.items():
            fact = every.get(key)
            if fact is not None and key not in here:
                warnings.append(
                    f"{prefix}{key} needs TensorRT-LLM >= {fact.since} (installed: {version}); left out"
                )
                continue
            if fact is not None and fact.cls and isinstance(value, dict):
                value = walk(value, fact.cls, f"{prefix}{key}.")
            out[key] = value
        return out

    return walk(args, "TorchLlmArgs", ""), warnings


def installed_differences() -> list[str]:
    """Recorded facts vs the installed ``tensorrt_llm``: one line per field that is missing there."""
    import dataclasses
    import importlib
    import inspect

    trtllm = importlib.import_module("tensorrt_llm")
    llmapi = importlib.import_module("tensorrt_llm.llmapi")
    version = str(getattr(trtllm, "__version__", "?"))
    line = release_line(version)
    found: dict[str, set[str]] = {}
    for cls_name in ("TorchLlmArgs", "KvCacheConfig", "CudaGraphConfig", "MoeConfig", "CacheTransceiverConfig",
                     "SamplingParams", "DisaggregatedParams"):  # fmt: skip
        cls = getattr(llmapi, cls_name, None) or getattr(trtllm, cls_name, None)
        if cls is None:
            found[cls_name] = set()
        elif hasattr(cls, "model_fields"):
            found[cls_name] = set(cls.model_fields)
        elif dataclasses.is_dataclass(cls):
            found[cls_name] = {f.name for f in dataclasses.fields(cls)}
        else:
            found[cls_name] = set(inspect.signature(cls).parameters)
    out = []
    for cls_name, names in found.items():
        for name in fields(cls_name, line):
            if name not in names:
                out.append(f"tensorrt_llm {version}: {cls_name}.{name} is recorded for {line} but missing")
    return out


if __name__ == "__main__":
    diffs = installed_differences()
    print("\n".join(diffs) if diffs else "the installed TensorRT-LLM has every recorded field")
    raise SystemExit(1 if diffs else 0)

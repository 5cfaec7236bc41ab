"""A model's weights (a tree of dataclasses, lists and tensors) as flat named tensors, and back.

The holder flattens the tree it built; a worker rebuilds the same tree around the tensors it mapped. Only the
registered weight classes are ever instantiated from a manifest (``WEIGHT_CLASSES``): the tree's shape travels
as names and lengths, not as code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from dynamo_lite.engines.reference.gpt_oss_loader import GptOssLayerWeights, GptOssWeights
from dynamo_lite.engines.reference.loader import LayerWeights, LlamaWeights
from dynamo_lite.engines.reference.moe_mxfp4 import Mxfp4Experts

WEIGHT_CLASSES: dict[str, type] = {
    cls.__name__: cls for cls in (GptOssWeights, GptOssLayerWeights, Mxfp4Experts, LlamaWeights, LayerWeights)
}


class TreeError(ValueError):
    """A manifest's tree that does not describe registered weights."""


def _join(path: str, name: str | int) -> str:
    return f"{path}.{name}" if path else str(name)


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], list[tuple[str, str, int]]]:
    """``tree`` -> ({path: tensor}, [(path, kind, length)] of its inner nodes, root first)."""
    tensors: dict[str, torch.Tensor] = {}
    nodes: list[tuple[str, str, int]] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj
        elif obj is None:
            nodes.append((path, "none", 0))
        elif isinstance(obj, list):
            nodes.append((path, "list", len(obj)))
            for i, item in enumerate(obj):
                walk(item, _join(path, i))
        elif dataclasses.is_dataclass(obj) and type(obj).__name__ in WEIGHT_CLASSES:
            nodes.append((path, type(obj).__name__, 0))
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), _join(path, f.name))
        else:
            raise TreeError(f"{path or 'weights'}: {type(obj).__name__} is not a weights node")

    walk(tree, "")
    return tensors, nodes


def unflatten(tensors: dict[str, torch.Tensor], nodes: list[tuple[str, str, int]]) -> Any:
    """The tree ``flatten`` described, around ``tensors``."""
    kinds = {path: (kind, length) for path, kind, length in nodes}

    def build(path: str) -> Any:
        if path in tensors:
            return tensors[path]
        if path not in kinds:
            raise TreeError(f"{path or 'weights'}: missing from the manifest")
        kind, length = kinds[path]
        if kind == "none":
            return None
        if kind == "list":
            return [build(_join(path, i)) for i in range(length)]
        cls = WEIGHT_CLASSES.get(kind)
        if cls is None:
            raise TreeError(f"{path or 'weights'}: {kind!r} is not a registered weights class")
        return cls(**{f.name: build(_join(path, f.name)) for f in dataclasses.fields(cls)})

    return build("")

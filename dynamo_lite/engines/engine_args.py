"""Engine arguments from ``--extra-engine-args FILE.yaml``: loading, merging, checking.

Every engine builds its arguments the same way: the worker's flags give a base mapping, then the YAML file is
merged on top of it with :func:`deep_merge`:

- a key only in the flags keeps the flag's value; a key in the YAML wins over the flag;
- a nested mapping merges key by key (``kv_cache_config: {dtype: fp8}`` in the YAML keeps the
  ``free_gpu_memory_fraction`` that a flag put into ``kv_cache_config``);
- anything else (a scalar, a list, ``null``) replaces the value below it whole.

Each engine describes the keys it knows in a *schema* (a mapping of key → expected type, a :class:`Choice`,
a nested schema, or ``ANY``) and checks the YAML with :func:`check_engine_args`: a wrong type is an error
naming the key and the file; an unknown key is a warning (the engine library may know keys we don't)::

    extra = load_engine_args_yaml("engine_configs/gpt_oss/decode.yaml")
    warnings = check_engine_args(extra, {"max_batch_size": int, "kv_cache_config": {"dtype": str}},
                                 source="decode.yaml")
    args = deep_merge({"max_batch_size": 128}, extra)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml

__all__ = [
    "ANY",
    "Choice",
    "EngineArgsError",
    "Schema",
    "check_engine_args",
    "deep_merge",
    "load_engine_args_yaml",
]


class EngineArgsError(ValueError):
    """Engine arguments that cannot be used: unreadable YAML, not a mapping, a value of the wrong type."""


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""Schema marker: the key is known, its value is not checked here (the engine library validates it)."""


class Choice:
    """Schema marker: a string out of a fixed set (compared case-insensitively unless told otherwise)."""

    __slots__ = ("values", "case_sensitive")

    def __init__(self, *values: str, case_sensitive: bool = False) -> None:
        self.values = tuple(values)
        self.case_sensitive = case_sensitive

    def __repr__(self) -> str:
        return f"Choice{self.values!r}"

    def accepts(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if self.case_sensitive:
            return value in self.values
        return value.lower() in {v.lower() for v in self.values}


Schema = Mapping[str, Any]
"""key → ``int`` | ``float`` | ``bool`` | ``str`` | ``list`` | ``dict`` | a tuple of those | :class:`Choice` |
``ANY`` | a nested ``Schema`` (the value must then be a mapping). ``null`` is accepted for every key: engine
libraries use it for "off" or "default"."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise EngineArgsError(f"line {mark.line + 1}: key {key!r} appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_engine_args_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an engine-arguments YAML file into a dict (an empty file gives ``{}``).

    Raises :class:`EngineArgsError` with the file name on a missing file, bad YAML, a duplicate key, a top
    level that is not a mapping, or a key that is not a string.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise EngineArgsError(f"--extra-engine-args {where}: file not found") from None
    except OSError as e:
        raise EngineArgsError(f"--extra-engine-args {where}: cannot read: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except EngineArgsError as e:
        raise EngineArgsError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise EngineArgsError(f"{where}: invalid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EngineArgsError(
            f"{where}: must be a mapping of engine argument names to values, got {_type_name(data)}"
        )
    _check_string_keys(data, where, "")
    return data


def _check_string_keys(data: Mapping, where: str, prefix: str) -> None:
    for key, value in data.items():
        if not isinstance(key, str):
            raise EngineArgsError(f"{where}: key {prefix}{key!r} is not a string")
        if isinstance(value, Mapping):
            _check_string_keys(value, where, f"{prefix}{key}.")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``; nested mappings merge key by key, anything else replaces.

    Returns a new dict; neither argument is modified (nested mappings are copied, not shared).
    """
    merged: dict[str, Any] = {k: _copy(v) for k, v in base.items()}
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = _copy(value)
    return merged


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def check_engine_args(args: Mapping[str, Any], schema: Schema, *, source: str = "") -> list[str]:
    """Check ``args`` against ``schema``.

    Raises :class:`EngineArgsError` listing every value of the wrong type (``source: key.sub: expected ...``);
    returns one warning line per unknown key.
    """
    errors: list[str] = []
    warnings: list[str] = []
    _check(args, schema, "", errors, warnings)
    where = f"{source}: " if source else ""
    if errors:
        raise EngineArgsError(where + "; ".join(errors))
    return [f"{where}{w}" for w in warnings]


def _check(
    args: Mapping[str, Any], schema: Schema, prefix: str, errors: list[str], warnings: list[str]
) -> None:
    for key, value in args.items():
        name = f"{prefix}{key}"
        if key not in schema:
            warnings.append(f"unknown key {name!r} (passed to the engine as is)")
            continue
        spec = schema[key]
        if value is None or spec is ANY:
            continue
        if isinstance(spec, Mapping):
            if not isinstance(value, Mapping):
                errors.append(f"{name}: expected a mapping, got {_type_name(value)} {_short(value)}")
            else:
                _check(value, spec, name + ".", errors, warnings)
            continue
        if isinstance(spec, Choice):
            if not spec.accepts(value):
                errors.append(f"{name}: expected one of {', '.join(spec.values)}, got {_short(value)}")
            continue
        kinds = spec if isinstance(spec, tuple) else (spec,)
        if not any(_is_instance(value, kind) for kind in kinds):
            errors.append(
                f"{name}: expected {' or '.join(_expected(k) for k in kinds)}, got "
                f"{_type_name(value)} {_short(value)}"
            )


def _is_instance(value: object, kind: type) -> bool:
    # YAML's true/false are bools, and bool is an int subclass: keep them apart.
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is dict:
        return isinstance(value, Mapping)
    return isinstance(value, kind)


_EXPECTED = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _expected(kind: type) -> str:
    return _EXPECTED.get(kind, kind.__name__)


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return f"({text[:40]}...)" if len(text) > 43 else f"({text})"

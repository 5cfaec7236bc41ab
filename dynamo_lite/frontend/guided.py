"""Structured output requests → one ``GuidedSpec`` on the wire, checked before any engine sees it.

Where a constraint may come from (at most one per request):

- ``response_format``: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"}}`` (chat and completions, OpenAI's shape); ``text.format`` on the Responses API;
- Dynamo's ``guided_json`` (a schema, as an object or JSON text) / ``guided_regex`` / ``guided_choice``, at the
  top level or under ``nvext``.

The spec carries the grammar's source (schema text, regex, choices); each engine compiles it with its own
backend. Here it is compiled once with xgrammar (in a worker thread: importing xgrammar pulls in torch) so that
an invalid schema or regex is a 400 naming the field, not a failure on a worker. A frontend without xgrammar
checks only the JSON and the regex syntax; the engine's compile still refuses what does not compile (400).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from typing import Any

from dynamo_lite.frontend.errors import OpenAIError, bad_request
from dynamo_lite.protocol import GuidedKind, GuidedSpec

MAX_SPEC_CHARS = 64 * 1024  # a schema/regex longer than this is refused (compiling is not free)
_HAVE_XGRAMMAR = importlib.util.find_spec("xgrammar") is not None


def guided_spec(req: Any) -> tuple[GuidedSpec, str] | None:
    """The request's structured-output constraint and the field it came from, or None; 400 when malformed or
    when several are given."""
    found: list[tuple[GuidedSpec, str]] = []
    rf = _declared(req, "response_format")
    if rf is not None:
        spec = _from_response_format(rf, "response_format")
        if spec is not None:
            found.append((spec, "response_format"))
    text = _declared(req, "text")
    if isinstance(text, dict) and isinstance(text.get("format"), dict):
        fmt = dict(text["format"])
        if fmt.get("type") == "json_schema":  # the Responses API flattens json_schema into format
            fmt = {"type": "json_schema", "json_schema": fmt}
        spec = _from_response_format(fmt, "text.format")
        if spec is not None:
            found.append((spec, "text.format"))
    nv = _declared(req, "nvext")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        value = _declared(req, name)
        if value is None and nv is not None:
            value = _declared(nv, name)
        if value is not None:
            found.append((_from_guided(name, value), name))
    if len(found) > 1:
        names = ", ".join(param for _, param in found)
        raise bad_request(
            f"at most one structured-output constraint per request, got {names}", param=found[1][1]
        )
    return found[0] if found else None


def _declared(model: Any, name: str) -> Any:
    """A field the request's model declares (an undeclared extra field of that name is not a constraint)."""
    return getattr(model, name) if name in type(model).model_fields else None


def _from_response_format(rf: Any, param: str) -> GuidedSpec | None:
    if not isinstance(rf, dict):
        raise bad_request(f"{param} must be an object", param=param)
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec(GuidedKind.JSON_OBJECT)
    if kind != "json_schema":
        raise bad_request(
            f"{param} type {kind!r} is not supported (text, json_object, json_schema)", param=param
        )
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad_request(f"{param} json_schema must be an object with a 'schema'", param=param)
    schema = js.get("schema")
    if schema is None:  # a name without a schema: any JSON object
        return GuidedSpec(GuidedKind.JSON_OBJECT)
    if not isinstance(schema, dict):
        raise bad_request(f"{param} json_schema.schema must be a JSON schema object", param=param)
    return GuidedSpec(GuidedKind.JSON_SCHEMA, _schema_text(schema, param))


def _from_guided(name: str, value: Any) -> GuidedSpec:
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad_request(f"guided_json is not valid JSON: {e}", param=name) from e
        if not isinstance(value, dict):
            raise bad_request("guided_json must be a JSON schema object", param=name)
        return GuidedSpec(GuidedKind.JSON_SCHEMA, _schema_text(value, name))
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise bad_request("guided_regex must be a non-empty string", param=name)
        _check_size(value, name)
        return GuidedSpec(GuidedKind.REGEX, value)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request("guided_choice must be a non-empty list of non-empty strings", param=name)
        _check_size("".join(value), name)
        return GuidedSpec(GuidedKind.CHOICE, choices=list(value))
    raise bad_request(f"{name} is not supported (use guided_json, guided_regex or guided_choice)", param=name)


def _schema_text(schema: dict, param: str) -> str:
    text = json.dumps(schema, separators=(",", ":"), sort_keys=True)  # one spelling per schema: cache hits
    _check_size(text, param)
    return text


def _check_size(text: str, param: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise bad_request(f"{param} is longer than {MAX_SPEC_CHARS} characters", param=param)


async def check_spec(spec: GuidedSpec, param: str) -> None:
    """400 (naming ``param``) unless ``spec`` compiles; runs in a worker thread."""
    try:
        await asyncio.to_thread(_compile_check, spec)
    except OpenAIError:
        raise
    except Exception as e:
        raise bad_request(f"{param}: invalid {_what(spec)}: {_first_line(e)}", param=param) from e


def _compile_check(spec: GuidedSpec) -> None:
    if not _HAVE_XGRAMMAR:
        if spec.kind is GuidedKind.REGEX:
            re.compile(spec.value)
        return
    import xgrammar as xgr

    if spec.kind is GuidedKind.JSON_SCHEMA:
        xgr.Grammar.from_json_schema(spec.value, any_whitespace=False)
    elif spec.kind is GuidedKind.REGEX:
        xgr.Grammar.from_regex(spec.value)


def _what(spec: GuidedSpec) -> str:
    return {GuidedKind.REGEX: "regular expression", GuidedKind.CHOICE: "choices"}.get(
        spec.kind, "JSON schema"
    )


def _first_line(e: Exception) -> str:
    """xgrammar's errors start with a timestamp and source location: keep what the client can act on."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[0-9:]+\] \S+: ", "", text)

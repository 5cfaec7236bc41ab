"""Structured-output fields at the frontend: each source (response_format, Dynamo's guided_* at the top level or
under nvext, the Responses API's text.format) becomes one ``GuidedSpec`` on the wire; what does not compile is a
400 naming its field, before any backend sees the request."""

from __future__ import annotations

import json

import httpx
import pytest

from dynamo_lite.protocol import GenerateRequest, GuidedKind, GuidedSpec, decode, encode

from .conftest import MODEL, FakeBackend
from .test_errors import assert_error

pytest.importorskip("xgrammar")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
SCHEMA_TEXT = json.dumps(SCHEMA, separators=(",", ":"), sort_keys=True)


@pytest.mark.parametrize(
    ("url", "fields", "expected"),
    [
        (CHAT, {"response_format": {"type": "json_object"}}, GuidedSpec(GuidedKind.JSON_OBJECT)),
        (
            CHAT,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA, "strict": True},
                }
            },
            GuidedSpec(GuidedKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        (
            COMPLETIONS,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
            GuidedSpec(GuidedKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        (CHAT, {"response_format": {"type": "text"}}, None),
        (CHAT, {"guided_json": SCHEMA}, GuidedSpec(GuidedKind.JSON_SCHEMA, SCHEMA_TEXT)),
        (
            COMPLETIONS,
            {"nvext": {"guided_json": json.dumps(SCHEMA)}},
            GuidedSpec(GuidedKind.JSON_SCHEMA, SCHEMA_TEXT),
        ),
        (CHAT, {"nvext": {"guided_regex": "[a-z]+"}}, GuidedSpec(GuidedKind.REGEX, "[a-z]+")),
        (COMPLETIONS, {"guided_choice": ["yes", "no"]}, GuidedSpec(GuidedKind.CHOICE, choices=["yes", "no"])),
    ],
)
async def test_each_source_becomes_one_spec_on_the_wire(
    http: httpx.AsyncClient, backend: FakeBackend, url: str, fields: dict, expected: GuidedSpec | None
) -> None:
    body = {"model": MODEL, **({"messages": HI} if url == CHAT else {"prompt": "hi"}), **fields}
    r = await http.post(url, json=body)
    assert r.status_code == 200, r.text
    [req] = backend.requests
    assert req.sampling.guided == expected
    assert decode(encode(req), GenerateRequest).sampling.guided == expected  # it survives the wire


async def test_responses_text_format_json_schema(http: httpx.AsyncClient, backend: FakeBackend) -> None:
    fmt = {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}
    r = await http.post("/v1/responses", json={"model": MODEL, "input": "hi", "text": {"format": fmt}})
    assert r.status_code == 200, r.text
    assert backend.requests[0].sampling.guided == GuidedSpec(GuidedKind.JSON_SCHEMA, SCHEMA_TEXT)


@pytest.mark.parametrize(
    ("url", "fields", "param"),
    [
        (
            CHAT,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        (
            CHAT,
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"properties": 5}},
                }
            },
            "response_format",
        ),
        (
            COMPLETIONS,
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": "x"}}},
            "response_format",
        ),
        (CHAT, {"response_format": {"type": "json_schema"}}, "response_format"),
        (CHAT, {"response_format": {"type": "grammar"}}, "response_format"),
        (CHAT, {"guided_json": "{not json"}, "guided_json"),
        (CHAT, {"nvext": {"guided_regex": "(ab"}}, "guided_regex"),
        (COMPLETIONS, {"guided_choice": []}, "guided_choice"),
        (CHAT, {"guided_grammar": "root ::= 'a'"}, "guided_grammar"),
        (CHAT, {"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ],
)
async def test_invalid_constraints_are_400_naming_the_field(
    http: httpx.AsyncClient, backend: FakeBackend, url: str, fields: dict, param: str
) -> None:
    body = {"model": MODEL, **({"messages": HI} if url == CHAT else {"prompt": "hi"}), **fields}
    assert_error(await http.post(url, json=body), 400, param=param)
    assert backend.requests == []

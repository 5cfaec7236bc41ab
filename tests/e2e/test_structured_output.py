"""Issue 17 acceptance (structured outputs): JSON-schema-guided completions sampled from SmolLM2 at temperature 1
all parse and validate, streamed and not, with prefill and decode on separate torch workers over etcd + NATS
(the prefill samples the first token under the grammar; the decode worker replays it into its own matcher)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.e2e.test_torch_disagg import MODEL, metric_values, stack  # noqa: F401 (stack: the fixture)

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")
pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

SAMPLES = 20
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "country": {"enum": ["FR", "DE", "US", "JP"]},
            },
            "required": ["city", "country"],
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "address", "tags"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON: name, address (city, country) and tags."}]
# The longest output the schema allows is ~110 tokens (strings of 16 escaped characters): nothing is cut off.
MAX_TOKENS = 160


def test_json_schema_samples_validate_disaggregated_streamed_and_not(stack) -> None:  # noqa: F811
    launch, _, _ = stack
    url, _, decode = launch()

    async def run() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)

        async def whole(seed: int) -> tuple[str, str]:
            r = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                temperature=1.0, seed=seed, max_tokens=MAX_TOKENS,
            )  # fmt: skip
            return r.choices[0].message.content or "", r.choices[0].finish_reason

        async def streamed(seed: int) -> tuple[str, str]:
            stream = await client.chat.completions.create(
                model=MODEL, messages=MESSAGES, response_format=RESPONSE_FORMAT,
                temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, stream=True,
            )  # fmt: skip
            parts, finish = [], ""
            async for chunk in stream:
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
            return "".join(parts), finish

        seeds = range(SAMPLES)
        return (
            await asyncio.gather(*(whole(s) for s in seeds)),
            await asyncio.gather(*(streamed(s) for s in seeds)),
        )

    whole, streamed = asyncio.run(run())
    for text, finish in [*whole, *streamed]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in whole}) > 1  # sampled, not one greedy answer
    # Every request went prefill → decode with the KV handed over (none computed again on the decode side).
    assert sum(metric_values(decode.port, "dynamo_lite_worker_kv_transfers_total")) == 2 * SAMPLES

    # Completions take response_format too; an invalid schema is refused before any worker sees it.
    with httpx.Client(base_url=url, timeout=120) as http:
        r = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "A person as JSON:", "response_format": RESPONSE_FORMAT,
                  "temperature": 1.0, "seed": 7, "max_tokens": MAX_TOKENS},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)
        bad = {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}},
        }
        r = http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "response_format": bad}
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text

"""``POST /tokenize`` and ``POST /detokenize``: vLLM's shapes, the very ids the generating routes send."""

from __future__ import annotations

import httpx
import openai
from tokenizers import Tokenizer

from dynamo_lite.protocol import ModelCard
from tests.frontend.conftest import MODEL, FakeBackend

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


async def test_tokenize_a_prompt_as_completions_encodes_it(
    http: httpx.AsyncClient, tokenizer: Tokenizer, card: ModelCard
) -> None:
    r = await http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200, r.text
    ids = tokenizer.encode("Hello world", add_special_tokens=True).ids
    assert r.json() == {
        "count": len(ids),
        "max_model_len": card.context_length,
        "tokens": ids,
        "token_strs": None,
    }
    r = await http.post(
        "/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}
    )
    assert r.json()["token_strs"] == [tokenizer.id_to_token(i) for i in ids]


async def test_tokenize_a_chat_gives_the_ids_the_chat_route_sends(
    http: httpx.AsyncClient, client: openai.AsyncOpenAI, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    backend.say(tokenizer, "ok")
    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    sent = backend.requests[-1].token_ids
    r = await http.post(
        "/tokenize", json={"model": MODEL, "messages": MESSAGES, "add_generation_prompt": True}
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == sent and r.json()["count"] == len(sent)
    without = await http.post(
        "/tokenize", json={"model": MODEL, "messages": MESSAGES, "add_generation_prompt": False}
    )
    assert len(without.json()["tokens"]) < len(sent)

    back = await http.post("/detokenize", json={"model": MODEL, "tokens": sent})
    assert back.status_code == 200, back.text
    assert back.json()["prompt"] == tokenizer.decode(sent, skip_special_tokens=False)
    assert "Hello there" in back.json()["prompt"] and "<|im_start|>" in back.json()["prompt"]


async def test_tokenize_errors_name_the_field(http: httpx.AsyncClient) -> None:
    for path, body, status, param in (
        ("/tokenize", {"model": MODEL, "prompt": "x", "zzz": 1}, 400, "zzz"),
        ("/tokenize", {"model": MODEL, "prompt": 5}, 400, "prompt"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"model": MODEL, "tokens": [1, -1]}, 400, "tokens"),
        ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
    ):
        r = await http.post(path, json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param, r.text

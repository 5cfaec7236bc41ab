"""Issue 17 acceptance, logprobs: through HTTP with the official openai client, the torch engine (SmolLM2,
fp32, greedy) returns ``logprobs`` / ``top_logprobs`` equal to ``log_softmax`` of transformers' logits for the
same prompt (1e-4), aggregated and disaggregated (the first token's from the prefill worker); chat answers in
OpenAI's shape, streamed per chunk, the same streamed or not and in either deployment."""

from __future__ import annotations

import functools
import uuid

import httpx
import openai
import pytest

from tests.conftest import Proc, Services, start_frontend, start_worker, wait_until

pytest.importorskip("torch")
pytest.importorskip("transformers")

MODEL = "SmolLM2-135M-Instruct"
ARGS = ("--engine", "torch", "--threads", "1", "--dtype", "float32", "--max-batch-size", "4")
TOP = 5
MAX_NEW = 10
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.timeout(600)


def model_files():
    from dynamo_lite.model_files import ModelNotFound, ensure_weights, resolve_model

    try:
        return ensure_weights(resolve_model())
    except ModelNotFound as e:
        pytest.skip(str(e))


@pytest.fixture
def deployments(services: Services):
    """An aggregated deployment and a disaggregated one (own namespaces and frontends): their base URLs."""
    model_files()
    procs: list[Proc] = []
    urls = {}
    try:
        for kind, modes in (("agg", ("agg",)), ("disagg", ("prefill", "decode"))):
            ns = f"t{uuid.uuid4().hex[:8]}"
            for mode in modes:
                procs.append(start_worker(services, ns, mode, *ARGS, ready_timeout=180))
            frontend = start_frontend(services, ns)
            procs.append(frontend)
            url = f"http://127.0.0.1:{frontend.port}"
            wait_until(lambda u=url: MODEL in httpx.get(u + "/v1/models", timeout=2).text, 30, what="model")
            urls[kind] = url
        yield urls
    finally:
        for p in reversed(procs):  # gracefully: a killed worker's shared-memory tracker would outlive it
            p.stop()


@functools.cache
def hf_model(folder):  # noqa: ANN001, ANN201
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def hf_logprobs(folder, ids: list[int], generated: list[int]):  # noqa: ANN001
    """``log_softmax`` of transformers' logits at every position but the last of ``ids + generated``."""
    import torch

    with torch.inference_mode():
        logits = hf_model(folder)(torch.tensor([ids + generated])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def test_logprobs_equal_transformers_aggregated_and_disaggregated(deployments) -> None:
    import torch
    from tokenizers import Tokenizer

    files = model_files()
    tok = Tokenizer.from_file(str(files.tokenizer_json))
    prompt = tok.encode("<|im_start|>user\nName three rivers.<|im_end|>\n<|im_start|>assistant\n").ids
    chats = {}
    for kind, url in deployments.items():
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        # Completions (legacy shape), on token ids: compared with transformers on the same ids.
        r = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_NEW,
            temperature=0,
            logprobs=TOP,
            extra_body={"ignore_eos": True},
        )
        lp = r.choices[0].logprobs
        assert r.usage.completion_tokens == MAX_NEW == len(lp.tokens) == len(lp.token_logprobs)
        # greedy: each chosen token is the most likely one; its ids, by the top alternatives' texts
        generated = [tok.token_to_id(_piece(tok, t)) for t in lp.tokens]
        reference = hf_logprobs(files.folder, prompt, generated)[len(prompt) - 1 :]
        chosen = reference.gather(1, torch.tensor(generated)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lp.token_logprobs), chosen, atol=1e-4, rtol=0), kind
        values, ids = torch.topk(reference, TOP, dim=-1)
        for i, top in enumerate(lp.top_logprobs):
            assert sorted(top.values(), reverse=True) == pytest.approx(values[i].tolist(), abs=1e-4), kind
            assert set(top) == {tok.decode([t]) for t in ids[i].tolist()}
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert "".join(lp.tokens) == r.choices[0].text

        # echo: the prompt's text and its tokens' logprobs (from the prefill worker when disaggregated).
        e = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=2, temperature=0, logprobs=TOP, echo=True
        )
        elp = e.choices[0].logprobs
        scores = hf_logprobs(files.folder, prompt, [])
        assert e.choices[0].text.startswith(tok.decode(prompt, skip_special_tokens=False))
        assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
        want = scores.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(elp.token_logprobs[1 : len(prompt)]), want, atol=1e-4, rtol=0), (
            kind
        )
        assert elp.token_logprobs[len(prompt)] == pytest.approx(lp.token_logprobs[0], abs=1e-4)

        # Chat: OpenAI's shape, whole and streamed per chunk, equal.
        whole = client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=MAX_NEW, temperature=0, logprobs=True, top_logprobs=TOP
        )
        content = whole.choices[0].logprobs.content
        assert len(content) == whole.usage.completion_tokens
        for entry in content:
            assert len(entry.top_logprobs) == TOP
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
            assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        streamed = []
        for chunk in client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=MAX_NEW,
            temperature=0,
            logprobs=True,
            top_logprobs=TOP,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].logprobs is not None:
                streamed.extend(chunk.choices[0].logprobs.content)
        assert [e.token for e in streamed] == [e.token for e in content]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
        chats[kind] = content

        # n=3 with a seed: three choices, reproducible, usage counting all of them (one logprob per token).
        def three(client=client):  # noqa: ANN001, ANN202
            return client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=8, temperature=1.0, n=3, seed=11, logprobs=True
            )

        first, again = three(), three()
        assert [c.index for c in first.choices] == [0, 1, 2]
        assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
        assert all(c.logprobs.content for c in first.choices)
        assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
        # Not asked: null, as before.
        plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
        assert plain.choices[0].logprobs is None
    agg, disagg = chats["agg"], chats["disagg"]
    assert [e.token for e in agg] == [e.token for e in disagg]
    assert [e.logprob for e in agg] == pytest.approx([e.logprob for e in disagg], abs=1e-4)


def _piece(tok, text: str) -> str:  # noqa: ANN001
    """The vocabulary entry whose decoded text is ``text`` (byte-level: spaces are 'Ġ', newlines 'Ċ')."""
    from dynamo_lite.frontend.logprobs import _BYTE_DECODER

    encoder = {b: c for c, b in _BYTE_DECODER.items()}
    return "".join(encoder[b] for b in text.encode())

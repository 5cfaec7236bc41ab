"""Logprobs of the torch reference engine on SmolLM2 (fp32, greedy): the chosen token's and the top
alternatives' equal ``log_softmax`` of transformers' logits for the same tokens, aggregated and across the
prefill → decode handoff (the first token's come from the prefill engine)."""

from __future__ import annotations

import pytest
import pytest_asyncio
from reference_testing import THREADS, chat, collect, needs_smollm2, request, started_engines, tokens

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.protocol import GenerateChunk, GenerateRequest, Phase, TokenLogprobs

pytestmark = [needs_smollm2, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

TOP = 5
MAX_NEW = 8


def settings(mode: str) -> EngineSettings:
    return EngineSettings(
        role=mode, dtype="float32", threads=THREADS, max_batch_size=2, max_num_tokens=256, max_seq_len=512,
        extra_source="test",
    )  # fmt: skip


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    from tokenizers import Tokenizer

    from dynamo_lite.model_files import resolve_model

    tok = Tokenizer.from_file(str(resolve_model().tokenizer_json))
    return tok.encode(chat("What is the capital of France?"), add_special_tokens=False).ids


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines():
    async with started_engines(settings) as built:
        yield built


def hf_logprobs(folder, ids: list[int], generated: list[int]):  # noqa: ANN001
    """``log_softmax`` of transformers' logits at each generated position ``[len(generated), vocab]``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        logits = model(torch.tensor([ids + generated])).logits[0].float()
    return torch.log_softmax(logits[len(ids) - 1 : len(ids) + len(generated) - 1], dim=-1)


def merged(chunks: list[GenerateChunk]) -> TokenLogprobs:
    out = TokenLogprobs()
    for c in chunks:
        if c.token_ids:
            assert c.logprobs is not None and len(c.logprobs.logprobs) == len(c.token_ids)
            out.extend(c.logprobs)
    return out


def assert_matches(reference, generated: list[int], lp: TokenLogprobs) -> None:  # noqa: ANN001
    import torch

    assert len(lp.logprobs) == len(generated) == reference.shape[0]
    chosen = reference.gather(1, torch.tensor(generated)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.logprobs), chosen, atol=1e-4, rtol=0)
    values, ids = torch.topk(reference, TOP, dim=-1)
    assert lp.top_ids == ids.tolist()
    assert torch.allclose(torch.tensor(lp.top_logprobs), values, atol=1e-4, rtol=0)
    # greedy: the chosen token is the most likely one
    assert [row[0] for row in lp.top_ids] == generated


async def test_aggregated_logprobs_equal_transformers(engines, prompt) -> None:
    chunks = await collect(engines["agg"], request(prompt, max_tokens=MAX_NEW, logprobs=TOP))
    generated = tokens(chunks)
    reference = hf_logprobs(engines["agg"].model_files.folder, prompt, generated)
    assert_matches(reference, generated, merged(chunks))


async def test_disaggregated_logprobs_equal_transformers(engines, prompt) -> None:
    ask = request(prompt, "d", max_tokens=MAX_NEW, logprobs=TOP)
    first = await collect(engines["prefill"], GenerateRequest("d", "m", prompt, ask.sampling, Phase.PREFILL))
    assert len(first) == 1 and first[0].kv is not None and first[0].logprobs is not None
    rest = await collect(
        engines["decode"],
        GenerateRequest(
            "d", "m", prompt, ask.sampling, Phase.DECODE, kv=first[0].kv, generated_ids=first[0].token_ids
        ),
    )
    generated = tokens(first) + tokens(rest)
    reference = hf_logprobs(engines["agg"].model_files.folder, prompt, generated)
    assert_matches(reference, generated, merged(first + rest))


async def test_logprobs_zero_gives_the_chosen_token_only_and_none_when_not_asked(engines, prompt) -> None:
    chunks = await collect(engines["agg"], request(prompt, max_tokens=3, logprobs=0))
    lp = merged(chunks)
    assert len(lp.logprobs) == 3 and lp.top_ids == [[], [], []]
    plain = await collect(engines["agg"], request(prompt, max_tokens=3))
    assert all(c.logprobs is None for c in plain) and tokens(plain) == tokens(chunks)


def hf_generate(folder, ids: list[int], max_new: int, **kwargs: object) -> list[int]:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, **kwargs)
    return out[0, len(ids) :].tolist()


async def test_repetition_penalty_and_logit_bias_steer_greedy_output_as_transformers_does(
    engines, prompt
) -> None:
    folder = engines["agg"].model_files.folder
    plain = tokens(await collect(engines["agg"], request(prompt, max_tokens=12)))
    penalized = tokens(await collect(engines["agg"], request(prompt, max_tokens=12, repetition_penalty=1.5)))
    assert penalized == hf_generate(folder, prompt, 12, repetition_penalty=1.5)
    banned = plain[1]  # forbid the plain answer's second token
    biased = tokens(
        await collect(engines["agg"], request(prompt, max_tokens=12, logit_bias={banned: -100.0}))
    )
    assert banned not in biased
    assert biased == hf_generate(folder, prompt, 12, sequence_bias={(banned,): -100.0})


def hf_prompt_logprobs(folder, ids: list[int]):  # noqa: ANN001
    """``log_softmax`` at prompt positions 0..n-2 (scoring tokens 1..n-1)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def assert_prompt_matches(reference, ids: list[int], lp: TokenLogprobs) -> None:  # noqa: ANN001
    import torch

    chosen = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.logprobs), chosen, atol=1e-4, rtol=0)
    values, top = torch.topk(reference, 2, dim=-1)
    assert lp.top_ids == top.tolist()
    assert torch.allclose(torch.tensor(lp.top_logprobs), values, atol=1e-4, rtol=0)


async def test_prompt_logprobs_equal_transformers_over_chunks_and_the_handoff(engines, prompt) -> None:
    long = prompt * 6  # ~200 tokens: prefilled in chunks (max_num_tokens 256 shared with the other rows)
    reference = hf_prompt_logprobs(engines["agg"].model_files.folder, long)
    for _ in range(2):  # the second time its prefix is cached: a scored prompt is computed whole anyway
        chunks = await collect(engines["agg"], request(long, max_tokens=2, prompt_logprobs=2))
        assert chunks[0].prompt_logprobs is not None
        assert all(c.prompt_logprobs is None for c in chunks[1:])
        assert_prompt_matches(reference, long, chunks[0].prompt_logprobs)
    ask = request(long, "p", max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    first = await collect(engines["prefill"], GenerateRequest("p", "m", long, ask.sampling, Phase.PREFILL))
    assert first[0].kv is not None and first[0].prompt_logprobs is not None
    assert_prompt_matches(reference, long, first[0].prompt_logprobs)

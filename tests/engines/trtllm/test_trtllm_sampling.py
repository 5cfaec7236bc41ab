"""``SamplingOptions`` → TensorRT-LLM ``SamplingParams`` keyword arguments."""

from __future__ import annotations

from types import ModuleType

import pytest

from dynamo_lite.engines.base import EngineError
from dynamo_lite.engines.trtllm.sampling import sampling_kwargs
from dynamo_lite.protocol import GuidedKind, GuidedSpec, SamplingOptions


def test_greedy_is_top_k_1_without_temperature() -> None:
    kw = sampling_kwargs(SamplingOptions(temperature=0.0, top_p=0.5, top_k=40), max_tokens=5)
    assert kw == {"max_tokens": 5, "detokenize": False, "ignore_eos": False, "top_k": 1}


def test_sampling_options_map_and_offs_are_left_out() -> None:
    kw = sampling_kwargs(SamplingOptions(temperature=0.7, top_p=1.0, top_k=0), max_tokens=9)
    assert kw == {"max_tokens": 9, "detokenize": False, "ignore_eos": False, "temperature": 0.7}
    kw = sampling_kwargs(SamplingOptions(temperature=0.7, top_p=0.9, top_k=50, seed=3), max_tokens=9)
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["seed"]) == (0.7, 0.9, 50, 3)


def test_stop_conditions() -> None:
    options = SamplingOptions(min_tokens=500, ignore_eos=True, stop_token_ids=[200002, 199999])
    kw = sampling_kwargs(options, max_tokens=2000)
    assert (kw["min_tokens"], kw["ignore_eos"], kw["stop_token_ids"]) == (500, True, [200002, 199999])
    assert sampling_kwargs(options, max_tokens=1)["min_tokens"] == 1  # never above max_tokens (prefill)
    assert "min_tokens" not in sampling_kwargs(SamplingOptions(), max_tokens=3)
    assert "stop_token_ids" not in sampling_kwargs(SamplingOptions(), max_tokens=3)


def test_penalties_and_min_p_pass_through() -> None:
    options = SamplingOptions(
        presence_penalty=0.5, frequency_penalty=-0.2, repetition_penalty=1.1, min_p=0.05
    )
    kw = sampling_kwargs(options, max_tokens=4)
    assert (kw["presence_penalty"], kw["frequency_penalty"], kw["repetition_penalty"]) == (0.5, -0.2, 1.1)
    assert kw["min_p"] == 0.05
    plain = sampling_kwargs(SamplingOptions(), max_tokens=4)
    assert not {"presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"} & set(plain)


@pytest.mark.parametrize(("asked", "passed"), [(None, None), (0, 1), (1, 1), (5, 5), (20, 20)])
def test_logprobs_pass_through_as_at_least_one(asked: int | None, passed: int | None) -> None:
    """0 (the chosen token only) is asked as 1: releases before TorchSampler read logprobs=0 as off."""
    kw = sampling_kwargs(SamplingOptions(logprobs=asked, prompt_logprobs=asked), max_tokens=4)
    assert kw.get("logprobs") == passed
    assert kw.get("prompt_logprobs") == passed


def test_logit_bias_is_refused_saying_why() -> None:
    with pytest.raises(EngineError, match="SamplingParams has no logit_bias") as e:
        sampling_kwargs(SamplingOptions(logit_bias={1: 2.0}), max_tokens=4)
    assert (e.value.status, e.value.code) == (400, "invalid_request")


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(),
        SamplingOptions(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
        SamplingOptions(temperature=0.0),
        SamplingOptions(temperature=1.3, top_p=0.2, top_k=5, seed=1, min_tokens=2, stop_token_ids=[3]),
        SamplingOptions(min_p=0.1, logprobs=0, prompt_logprobs=3),
    ],
)
def test_kwargs_are_accepted_by_sampling_params(standin: ModuleType, options: SamplingOptions) -> None:
    params = standin.SamplingParams(**sampling_kwargs(options, max_tokens=4))
    assert params.max_tokens == 4
    assert params.detokenize is False


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type":"object"}'), {"json": '{"type":"object"}'}),
        (GuidedSpec(GuidedKind.JSON_OBJECT), {"json_object": True}),
        (GuidedSpec(GuidedKind.REGEX, "[a-z]+"), {"regex": "[a-z]+"}),
        (GuidedSpec(GuidedKind.CHOICE, choices=["a.b", "c"]), {"regex": r"(a\.b|c)"}),
    ],
)
def test_guided_specs_map_to_guided_decoding_params(
    standin: ModuleType, spec: GuidedSpec, expected: dict
) -> None:
    kw = sampling_kwargs(SamplingOptions(guided=spec), max_tokens=4)
    assert kw["guided_decoding"] == expected
    standin.llmapi.GuidedDecodingParams(**kw["guided_decoding"])  # one guide: accepted

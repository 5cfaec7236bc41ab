"""Penalties, logit_bias and min_p of the reference sampler, processor by processor against transformers'
logits processors (and OpenAI's documented formula for presence/frequency) on the same logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from dynamo_lite.engines.reference.logits_processors import (
    apply_penalties,
    min_p_filter,
    pick_logprobs,
    raw_logprobs,
)
from dynamo_lite.engines.reference.sampling import Sampler, SamplingError, sample_batch, validate
from dynamo_lite.protocol import SamplingOptions

transformers = pytest.importorskip("transformers")

VOCAB = 50
CPU = torch.device("cpu")


@dataclass
class Row:
    tokens: list[int]
    prompt_len: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


def batch(seed: int = 0, rows: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


HISTORIES = [([1, 2, 3, 2], 2), ([5, 5, 5, 7, 1], 3), ([9, 10], 1)]


def rows(**opts: object) -> list[Row]:
    return [Row(list(t), n, SamplingOptions(**opts)) for t, n in HISTORIES]


def test_repetition_penalty_equals_transformers_over_prompt_and_output() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = batch()
    ours = logits.clone()
    apply_penalties(ours, rows(repetition_penalty=1.3))
    for i, (ids, _) in enumerate(HISTORIES):
        theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([ids]), logits[i : i + 1].clone())
        assert torch.allclose(ours[i], theirs[0])
    assert not torch.equal(ours, logits)


def test_presence_and_frequency_follow_openai_over_generated_tokens_only() -> None:
    logits = batch(1)
    ours = logits.clone()
    apply_penalties(ours, rows(presence_penalty=0.5, frequency_penalty=0.25))
    for i, (ids, prompt_len) in enumerate(HISTORIES):
        # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over the output
        counts = torch.bincount(torch.tensor(ids[prompt_len:]), minlength=VOCAB).float()
        expected = logits[i] - counts * 0.25 - (counts > 0).float() * 0.5
        assert torch.allclose(ours[i], expected)
    assert torch.equal(ours[0, 1], logits[0, 1])  # a prompt token alone is not penalized


def test_logit_bias_equals_sequence_bias_processor() -> None:
    from transformers import SequenceBiasLogitsProcessor

    logits = batch(2)
    bias = {3: 5.0, 7: -100.0, 12: 0.5}
    ours = logits.clone()
    apply_penalties(ours, rows(logit_bias=bias))
    processor = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})
    for i, (ids, _) in enumerate(HISTORIES):
        theirs = processor(torch.tensor([ids]), logits[i : i + 1].clone())
        assert torch.allclose(ours[i], theirs[0])


def test_only_rows_that_ask_are_changed() -> None:
    logits = batch(3)
    ours = logits.clone()
    mixed = rows()
    mixed[1].sampling = SamplingOptions(repetition_penalty=2.0, frequency_penalty=1.0)
    apply_penalties(ours, mixed)
    assert torch.equal(ours[0], logits[0]) and torch.equal(ours[2], logits[2])
    assert not torch.equal(ours[1], logits[1])


def test_min_p_equals_transformers_min_p_warper() -> None:
    from transformers import MinPLogitsWarper

    logits = batch(4)
    for min_p in (0.05, 0.3, 0.9):
        ours = min_p_filter(logits.clone(), min_p)
        theirs = MinPLogitsWarper(min_p)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        assert torch.allclose(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_min_p_restricts_what_a_sampler_draws() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])  # probabilities ~[.05 .40 .15 .03 .36]
    sampler = Sampler(SamplingOptions(temperature=1.0, min_p=0.5, seed=1), CPU)
    assert {sampler.sample(logits) for _ in range(200)} == {1, 4}


def test_penalties_change_a_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, 0.0]])
    seq = [Row([1, 1], 1, SamplingOptions(temperature=0.0, frequency_penalty=0.5))]
    apply_penalties(logits, seq)
    assert sample_batch(logits, [Sampler(seq[0].sampling, CPU)], [None]) == [2]


def test_logprobs_are_of_the_raw_logits_whatever_the_penalties() -> None:
    logits = batch(5)
    seqs = rows(logprobs=3, repetition_penalty=1.5, logit_bias={0: 50.0})
    raw = raw_logprobs(logits, seqs)
    apply_penalties(logits, seqs)
    out = pick_logprobs(raw, seqs, [0, 0, 0])
    expected = torch.log_softmax(batch(5), dim=-1)
    for i, lp in enumerate(out):
        assert lp is not None
        assert lp.logprobs == pytest.approx([float(expected[i, 0])], abs=1e-6)
        assert lp.top_ids[0] == torch.topk(expected[i], 3).indices.tolist()


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(logprobs=21),
        SamplingOptions(logprobs=-1),
        SamplingOptions(presence_penalty=2.5),
        SamplingOptions(frequency_penalty=-3.0),
        SamplingOptions(repetition_penalty=0.0),
        SamplingOptions(min_p=1.5),
        SamplingOptions(logit_bias={VOCAB: 1.0}),
    ],
)
def test_out_of_range_options_are_refused(opts: SamplingOptions) -> None:
    with pytest.raises(SamplingError):
        validate(opts, VOCAB)

"""Per-request sampling: greedy, temperature, top-k, top-p, seeds, suppressed tokens."""

from __future__ import annotations

import pytest
import torch

from dynamo_lite.engines.reference.sampling import BLOCK, Sampler, SamplingError, draw, sample_batch, validate
from dynamo_lite.protocol import SamplingOptions

CPU = torch.device("cpu")


def logits() -> torch.Tensor:
    return torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])


def draws(opts: SamplingOptions, n: int = 200) -> list[int]:
    sampler = Sampler(opts, CPU)
    return [sampler.sample(logits()) for _ in range(n)]


def test_greedy_and_top_k_one_pick_the_argmax() -> None:
    assert set(draws(SamplingOptions(temperature=0.0), 5)) == {1}
    assert set(draws(SamplingOptions(temperature=5.0, top_k=1), 20)) == {1}


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    assert set(draws(SamplingOptions(temperature=1.0, top_k=2, seed=1))) == {1, 4}
    # probabilities ~[.05 .40 .15 .03 .36]: 1 and 4 reach 0.7 (0.77), token 2 is needed for 0.8
    assert set(draws(SamplingOptions(temperature=1.0, top_p=0.7, seed=1))) == {1, 4}
    assert set(draws(SamplingOptions(temperature=1.0, top_p=0.8, seed=1))) == {1, 2, 4}
    assert set(draws(SamplingOptions(temperature=1.0, top_p=1.0, seed=1))) == {0, 1, 2, 3, 4}


def test_seed_reproduces_and_differs() -> None:
    a = draws(SamplingOptions(temperature=1.0, seed=42), 50)
    assert a == draws(SamplingOptions(temperature=1.0, seed=42), 50)
    assert a != draws(SamplingOptions(temperature=1.0, seed=43), 50)


def test_batch_mixes_greedy_and_sampled_rows_and_suppresses() -> None:
    batch = torch.stack([logits(), logits(), logits()])
    greedy = Sampler(SamplingOptions(temperature=0.0), CPU)
    sampled = Sampler(SamplingOptions(temperature=1.0, top_k=1), CPU)  # top_k=1 is greedy too
    hot = Sampler(SamplingOptions(temperature=0.7, top_k=3, seed=3), CPU)
    out = sample_batch(batch, [greedy, sampled, hot], [[1], None, None])
    assert out[0] == 4 and out[1] == 1 and out[2] in {1, 2, 4}


def test_draw_follows_the_probabilities_across_blocks_and_never_picks_a_zero() -> None:
    # Mass at both sides of block boundaries and in the tail block (600 entries: 2 whole blocks + 88).
    n = 2 * BLOCK + 88
    support = {0: 0.1, BLOCK - 1: 0.2, BLOCK: 0.3, 2 * BLOCK: 0.15, n - 1: 0.25}
    probs = torch.zeros(n)
    for i, p in support.items():
        probs[i] = p
    gen = torch.Generator().manual_seed(5)
    picked = draw((probs * 3).expand(20_000, n), [gen] * 20_000)  # any positive total
    assert set(picked) <= set(support)
    for i, p in support.items():
        assert abs(picked.count(i) / len(picked) - p) < 0.015


def test_temperature_rows_draw_the_same_alone_and_in_a_batch() -> None:
    torch.manual_seed(0)
    rows = torch.randn(4, 1000) * 2

    def samplers() -> list[Sampler]:
        return [
            Sampler(SamplingOptions(temperature=1.0, seed=11), CPU),
            Sampler(SamplingOptions(temperature=0.0), CPU),
            Sampler(SamplingOptions(temperature=0.6, seed=12), CPU),
            Sampler(SamplingOptions(temperature=1.0, top_k=50, seed=13), CPU),
        ]

    batched, alone = samplers(), samplers()
    for _ in range(20):
        together = sample_batch(rows.clone(), batched, [None] * 4)
        assert together == [s.sample(rows[i].clone()) for i, s in enumerate(alone)]


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(temperature=-0.1),
        SamplingOptions(top_p=0.0),
        SamplingOptions(top_p=1.5),
        SamplingOptions(top_k=-1),
        SamplingOptions(max_tokens=0),
        SamplingOptions(stop_token_ids=[50000]),
    ],
)
def test_invalid_options_are_refused(opts: SamplingOptions) -> None:
    with pytest.raises(SamplingError):
        validate(opts, vocab_size=49152)

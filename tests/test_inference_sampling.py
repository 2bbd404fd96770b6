"""The sampler (pipeline/inference/sampling.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.inference.sampling import (InvalidParam, SamplingParams, apply_repetition_penalty, draw, mask_padding,
                                         min_p_filter, probabilities, process_logits, sample, top_k_filter,
                                         top_p_filter)
from test_inference_engine import one_thread  # noqa: F401 (an autouse fixture)


def sample_one(logits: torch.Tensor, params: SamplingParams, history: list[int], generator: torch.Generator) -> int:
    return sample(logits[None], [params], [history], [generator])[0]


def random_logits(n: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_deterministic_and_the_argmax():
    logits = random_logits()
    params = SamplingParams(temperature=0.0)
    draws = {sample_one(logits, params, [], torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {int(logits.argmax())}


def test_no_filters_is_plain_sampling():
    """top_p 1.0, top_k 0, min_p 0: 20,000 draws from softmax(logits / T), each id's count within
    5 standard deviations of its expectation, and draws that repeat with the seed."""
    logits = random_logits(20)
    params = SamplingParams(temperature=2.0, top_k=0, top_p=1.0)
    expected, n = (logits / 2.0).softmax(-1), 20_000
    g = torch.Generator().manual_seed(3)
    draws = torch.tensor([sample_one(logits, params, [], g) for _ in range(n)])
    counts = torch.bincount(draws, minlength=20).float()
    assert ((counts - n * expected).abs() <= 5 * (n * expected * (1 - expected)).sqrt() + 1).all()
    again = torch.Generator().manual_seed(3)
    assert [sample_one(logits, params, [], again) for _ in range(100)] == draws[:100].tolist()


def test_a_batch_draws_what_each_row_draws_alone():
    """Rows of mixed settings (greedy, filtered, penalised, two sharing settings) sampled in one
    call give the tokens each gets alone with the same seed: a row's draw is its own."""
    logits = torch.stack([random_logits(seed=s) for s in range(5)])
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=20),
              SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=1.2, top_p=0.9, min_p=0.01),
              SamplingParams(temperature=1.0, repetition_penalty=1.3)]
    histories = [[1, 2], [3], [4, 5], [], [int(logits[4].argmax()), 7]]
    for seed in range(20):
        batch = sample(logits, params, histories, [torch.Generator().manual_seed(seed + i) for i in range(5)])
        alone = [sample_one(logits[i], params[i], histories[i], torch.Generator().manual_seed(seed + i)) for i in range(5)]
        assert batch == alone


def test_a_zero_probability_id_is_never_drawn():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {draw(probs[None], [g])[0] for _ in range(2000)} == {1, 3}


def test_filters_and_padding():
    logits = mask_padding(torch.tensor([0.0, 3.0, 2.9, 1.0, 9.0]), 4)  # id 4 is padding (vocab_size 4)
    g = torch.Generator().manual_seed(0)

    def draws(**params) -> list[int]:
        return sorted({sample_one(logits, SamplingParams(**params), [], g) for _ in range(200)})
    assert draws(temperature=0.0) == [1]  # greedy
    assert draws(temperature=1.0, top_k=2) == [1, 2]
    assert draws(temperature=1.0, top_p=0.3) == [1]  # top-p: id 1 alone has ~0.47
    assert draws(temperature=1.0) == [0, 1, 2, 3]  # never 4


def test_draws_follow_the_distribution_of_probabilities():
    """8,000 draws at temperature 0.8, top-k 20, top-p 0.9 against `probabilities` (the
    distribution speculative decoding compares): each id's count within 5 standard deviations,
    and no id outside the kept set."""
    logits = random_logits(64, seed=5)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    expected = probabilities(logits, params, [])
    n, g = 8000, torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_one(logits, params, [], g) for _ in range(n)])
    counts = torch.bincount(draws, minlength=64).float()
    assert (counts[expected == 0] == 0).all()
    sd = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sd + 1).all(), (counts, n * expected)


def test_temperature_raises_entropy():
    def entropy(logits: torch.Tensor) -> float:
        p = logits.softmax(dim=-1)
        return float(-(p * p.log()).sum())
    logits = random_logits()
    h = [entropy(process_logits(logits, SamplingParams(temperature=t), [])) for t in (0.25, 0.5, 1.0, 1.5, 2.0)]
    assert h == sorted(h) and len(set(h)) == len(h), h


@pytest.mark.parametrize("k", [1, 5, 50, 99])
def test_top_k_keeps_exactly_k(k):
    logits = random_logits()
    kept = torch.isfinite(top_k_filter(logits, k))
    assert int(kept.sum()) == k
    assert logits[kept].min() >= logits[~kept].max()  # the k largest


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]  # 0.5 + 0.3 reach 0.8
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [True, False, False, False]  # the top stays


def test_min_p_scales_with_the_top_probability():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(min_p_filter(logits, 0.5)).tolist() == [True, True, False, False]  # >= 0.25


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive / 2, negative x 2, unseen unchanged
    assert apply_repetition_penalty(logits, [0], 1.0) is logits


def test_presence_and_frequency_penalties_are_openais_on_the_output_only():
    """logit[j] -= count_j x frequency + (count_j > 0) x presence, counted over the generated
    tokens (not the prompt); -inf stays -inf, float32's largest stays finite."""
    logits = torch.tensor([2.0, -1.0, 0.5, -float("inf"), 3.0])
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(logits, params, history=[4, 4, 0, 1, 1, 1, 3], output=[0, 1, 1, 1, 3])
    assert out.tolist() == [2.0 - 0.25 - 0.5, -1.0 - 0.75 - 0.5, 0.5, -float("inf"), 3.0]  # 4 is in the prompt only
    assert process_logits(logits, params, history=[0, 1]).tolist() == logits.tolist()  # nothing generated yet
    huge = process_logits(torch.tensor([float("inf"), 0.0]), SamplingParams(temperature=0, presence_penalty=-2.0),
                          history=[0], output=[0])
    assert huge.isfinite().all()
    favoured = SamplingParams(temperature=0, presence_penalty=-2.0)  # negative: repeat what was said
    assert sample_one(torch.tensor([1.0, 0.0]), favoured, [1], None) == 0
    assert sample(torch.tensor([[1.0, 0.0]]), [favoured], [[1]], [None], [[1]]) == [1]


def test_sampling_params_name_the_bad_field_checked_as_float32_holds_it():
    for field, value in [("top_p", 0.0), ("top_p", 1e-300), ("temperature", 2.5), ("temperature", float("nan")),
                         ("temperature", 10**400), ("min_p", 1.5), ("repetition_penalty", 1e-300),
                         ("repetition_penalty", 1e39), ("max_tokens", -1), ("top_k", -2), ("seed", 2**63),
                         ("presence_penalty", 2.01), ("frequency_penalty", -float("inf")), ("logprobs", 21),
                         ("prompt_logprobs", -1)]:
        with pytest.raises(InvalidParam, match=f"{field}=") as e:
            SamplingParams(**{field: value})
        assert e.value.param == field
    SamplingParams(top_p=1e-45, repetition_penalty=1e-45, temperature=2.0, seed=-2**63)  # tiny but not 0 in float32


EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1e-30, 1.0, -1.0, 30.0, -30.0, 1e30, -1e30, 3.4e38, -3.4e38,
            float("inf"), -float("inf"), float("nan")]


@settings(max_examples=300, deadline=None)
@given(logits=st.lists(st.sampled_from(EXTREMES) | st.floats(-100, 100), min_size=100, max_size=100),
       temperature=st.sampled_from([0.0, 1e-45, 1e-6, 1e-5, 0.3, 1.0, 2.0]),
       top_p=st.sampled_from([1.4e-45, 1e-30, 0.5, 0.999, 1.0]),
       top_k=st.sampled_from([-1, 0, 1, 7, 99, 100, 10**30]),
       min_p=st.sampled_from([0.0, 1e-45, 0.5, 1.0]),
       penalty=st.sampled_from([1.4e-45, 1e-38, 0.5, 1.0, 2.0, 1e38, 3.4e38]),
       history=st.lists(st.integers(0, 99), max_size=40), seed=st.integers(0, 2**32))
def test_sampling_never_makes_nan_nor_draws_a_dead_token(logits, temperature, top_p, top_k, min_p, penalty,
                                                          history, seed):
    """Any logits (NaN, +-inf, float32's extremes) on a padded vocabulary (100 ids in a 128-wide
    row, as `mask_padding` masks them), any valid extreme settings: the distribution is finite and
    sums to 1, the draw is a token whose logit was a number (never padding, -inf or NaN); a row
    with no such token raises ValueError instead of drawing from NaN."""
    row = torch.tensor(logits + [-float("inf")] * 28)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=penalty)
    alive = ~(row.isnan() | (row == -float("inf")))
    if not alive.any():
        with pytest.raises(ValueError, match="no token has a finite logit"):
            sample_one(row, params, history, torch.Generator().manual_seed(seed))
        return
    p = probabilities(row, params, history)
    assert p.isfinite().all() and (p >= 0).all() and abs(float(p.sum()) - 1) < 1e-4
    assert (p[~alive] == 0).all()
    token = sample_one(row, params, history, torch.Generator().manual_seed(seed))
    assert 0 <= token < 100 and alive[token]


def test_seeded_request_is_reproducible():
    logits = random_logits()
    params = SamplingParams(temperature=1.0, seed=7)
    fallback = torch.Generator().manual_seed(0)
    g1, g2 = params.generator(fallback), params.generator(fallback)
    assert [sample_one(logits, params, [], g1) for _ in range(20)] == [sample_one(logits, params, [], g2) for _ in range(20)]

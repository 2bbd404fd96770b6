"""Sampling functions and decoding strategies (pipeline/inference/sampling.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.inference.engine import forward_full
from pipeline.inference.sampling import (InvalidParam, SamplingParams, apply_repetition_penalty, beam_search,
                                         contrastive_search, entropy, min_p_filter, probabilities, process_logits,
                                         sample, sample_token, top_k_filter, top_p_filter)
from test_inference_engine import nano, one_thread  # noqa: F401 (one_thread: an autouse fixture)


def random_logits(n: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_deterministic_and_the_argmax():
    logits = random_logits()
    params = SamplingParams(temperature=0.0)
    draws = {sample(logits, params, [], torch.Generator().manual_seed(s)) for s in range(20)}
    assert draws == {int(logits.argmax())}


def test_no_filters_is_plain_multinomial():
    """top_p 1.0, top_k 0, min_p 0: the same draws as torch.multinomial on softmax(logits / T)."""
    logits = random_logits()
    params = SamplingParams(temperature=2.0, top_k=0, top_p=1.0)
    ours, plain = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample(logits, params, [], ours) for _ in range(300)]
    b = [int(torch.multinomial((logits / 2.0).softmax(-1), 1, generator=plain)) for _ in range(300)]
    assert a == b
    assert len(set(a)) > 10  # really sampling


def test_sample_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 9.0]] * 200)  # id 4 is padding (vocab_size 4)
    g = torch.Generator().manual_seed(0)
    assert sample_token(logits, 4, 0.0, None, 1.0, g).unique().tolist() == [1]  # greedy
    assert sample_token(logits, 4, 1.0, 2, 1.0, g).unique().tolist() == [1, 2]  # top-k 2
    assert sample_token(logits, 4, 1.0, None, 0.3, g).unique().tolist() == [1]  # top-p: id 1 alone has ~0.47
    assert sample_token(logits, 4, 1.0, None, 1.0, g).unique().tolist() == [0, 1, 2, 3]  # never 4


def test_batched_sample_token_draws_from_the_same_distribution_as_sample():
    """sample_token (batched, sorted draw) and the per-request transforms give one distribution:
    8,000 rows at temperature 0.8, top-k 20, top-p 0.9 against `probabilities` (each id's count
    within 5 standard deviations, and no id outside the kept set)."""
    logits = random_logits(64, seed=5)
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    expected = probabilities(logits, params, [])
    n = 8000
    draws = sample_token(logits.expand(n, -1), 64, 0.8, 20, 0.9, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=64).float()
    assert (counts[expected == 0] == 0).all()
    sd = (n * expected * (1 - expected)).sqrt()
    assert ((counts - n * expected).abs() <= 5 * sd + 1).all(), (counts, n * expected)


def test_temperature_raises_entropy():
    logits = random_logits()
    h = [float(entropy(process_logits(logits, SamplingParams(temperature=t), []))) for t in (0.25, 0.5, 1.0, 1.5, 2.0)]
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


def test_sampling_params_name_the_bad_field_checked_as_float32_holds_it():
    for field, value in [("top_p", 0.0), ("top_p", 1e-300), ("temperature", 2.5), ("temperature", float("nan")),
                         ("temperature", 10**400), ("min_p", 1.5), ("repetition_penalty", 1e-300),
                         ("repetition_penalty", 1e39), ("max_tokens", -1), ("top_k", -2), ("seed", 2**63)]:
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
    row, as logits_of masks them), any valid extreme settings: the distribution is finite and
    sums to 1, the draw is a token whose logit was a number (never padding, -inf or NaN); a row
    with no such token raises ValueError instead of drawing from NaN."""
    row = torch.tensor(logits + [-float("inf")] * 28)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=penalty)
    alive = ~(row.isnan() | (row == -float("inf")))
    if not alive.any():
        with pytest.raises(ValueError, match="no token has a finite logit"):
            sample(row, params, history, torch.Generator().manual_seed(seed))
        return
    p = probabilities(row, params, history)
    assert p.isfinite().all() and (p >= 0).all() and abs(float(p.sum()) - 1) < 1e-4
    assert (p[~alive] == 0).all()
    token = sample(row, params, history, torch.Generator().manual_seed(seed))
    assert 0 <= token < 100 and alive[token]


def test_seeded_request_is_reproducible():
    logits = random_logits()
    params = SamplingParams(temperature=1.0, seed=7)
    fallback = torch.Generator().manual_seed(0)
    g1, g2 = params.generator(fallback), params.generator(fallback)
    assert [sample(logits, params, [], g1) for _ in range(20)] == [sample(logits, params, [], g2) for _ in range(20)]


@pytest.mark.parametrize("rope", [False, True])
def test_beam_width_1_is_greedy(rope):
    model = nano(rope=rope)
    prompt = [3, 1, 4, 1, 5]
    greedy = model.generate(torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    assert beam_search(forward_full(model), prompt, beam_width=1, max_tokens=12) == greedy
    assert contrastive_search(forward_full(model), prompt, top_k=4, alpha=0.0, max_tokens=12) == greedy


def test_wider_beam_finds_a_sequence_at_least_as_likely():
    model = nano()
    prompt, forward = [3, 1, 4, 1, 5], forward_full(model)

    def logprob(completion: list[int]) -> float:
        logits = forward(torch.tensor([prompt + completion]))[0][0].log_softmax(-1)
        return float(sum(logits[len(prompt) - 1 + i, t] for i, t in enumerate(completion)))

    one, four = (beam_search(forward, prompt, beam_width=w, max_tokens=6) for w in (1, 4))
    assert logprob(four) >= logprob(one) - 1e-5


def test_contrastive_search_penalises_repeating_the_context():
    """With a strong degeneration penalty the output differs from greedy's and stays a top-k token."""
    model = nano()
    prompt = [3, 1, 4, 1, 5]
    forward = forward_full(model)
    greedy = contrastive_search(forward, prompt, top_k=4, alpha=0.0, max_tokens=8)
    out = contrastive_search(forward, prompt, top_k=4, alpha=0.9, max_tokens=8)
    assert out != greedy
    first_top = forward(torch.tensor([prompt]))[0][0, -1].topk(4).indices.tolist()
    assert out[0] in first_top

"""The engine (pipeline/inference/engine.py): continuous batching over the paged KV cache,
prefix caching, preemption, and speculative decoding, against plain `GPT.generate`."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from pipeline.inference import Engine, SamplingParams
from pipeline.inference.blocks import BlockManager, block_hashes
from pipeline.inference.engine import forward_full
from pipeline.inference.sampling import InvalidParam
from pipeline.model.gpt import GPT, GPTConfig

PROMPTS = [[1, 2, 3], [5] * 20, list(range(7, 25)), [42], list(range(100, 137)), [9, 9, 8, 8, 7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread. On a shared 2-core machine a second OpenMP thread
    spin-waits for a busy core and makes every call ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nano(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_size("nano", **{"vocab_size": 257, "seq_len": 64, **overrides})).eval()


def alone(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """GPT.generate greedy, one prompt at a time, no cache."""
    return [model.generate(torch.tensor([p]), n)[0, len(p):].tolist() for p in prompts]


def assert_all_blocks_free(engine: Engine) -> None:
    b = engine.blocks
    assert b.num_free == b.num_blocks and sum(b.ref) == 0, f"{b.num_free} of {b.num_blocks} blocks free"
    assert not engine.running and not engine.waiting and not engine.requests


@pytest.mark.parametrize("rope", [False, True])
def test_mixed_batch_equals_generate_alone(rope):
    model = nano(rope=rope)
    engine = Engine(model, max_batch_size=4, block_size=4)  # 6 prompts, 4 at a time: requests join mid-run
    assert engine.generate(PROMPTS, GREEDY) == alone(model, PROMPTS, 12)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("options", [
    dict(paged=False),  # the contiguous cache
    dict(block_size=4, prefix_caching=False),
    dict(block_size=4, chunked_prefill=True, max_num_batched_tokens=8),
    dict(block_size=4, scheduling="static", max_num_batched_tokens=64),  # the 6 prompts hold 84 tokens
    dict(block_size=4, num_blocks=16),  # too few blocks for all at once: preemption by recompute
])
def test_cache_layouts_and_policies_give_the_same_greedy_output(options):
    model = nano()
    reference = Engine(model, max_batch_size=6, block_size=4).generate(PROMPTS, GREEDY)
    engine = Engine(model, max_batch_size=6, **options)
    assert engine.generate(PROMPTS, GREEDY) == reference
    if "num_blocks" in options:
        assert engine.stats.preemptions > 0
    if options.get("scheduling") == "static":  # one batch of all six, prefilled together, none joining later
        assert engine.stats.steps == 1 + 11
    assert_all_blocks_free(engine)


def test_prefix_cache_shares_blocks_and_changes_nothing():
    model = nano()
    system = list(range(30, 54))  # 24 tokens = 6 full blocks of 4, shared by every prompt
    prompts = [system + [i, i + 1] for i in range(60, 66)]
    uncached = Engine(model, max_batch_size=3, block_size=4, prefix_caching=False).generate(prompts, GREEDY)
    engine = Engine(model, max_batch_size=3, block_size=4)
    # the first request computes the shared blocks; the other five find all 6 in the cache
    assert engine.generate(prompts[:1], GREEDY) + engine.generate(prompts[1:], GREEDY) == uncached
    assert engine.stats.prefix_blocks_hit == 5 * 6
    assert engine.stats.prompt_tokens_computed == 26 + 5 * 2
    assert_all_blocks_free(engine)
    assert len(engine.blocks.cached) >= 6  # kept (evictable) for the next request


def test_block_manager_reference_counts_and_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a: list[int] = []
    bm.grow(a, 5)
    assert len(a) == 3 and bm.num_free == 1
    assert bm.register(tokens, a, num_computed=5, num_registered=0) == 2  # two full blocks
    b: list[int] = []
    assert bm.match_prefix(tokens, b) == 4 and b == a[:2] and bm.ref[a[0]] == 2
    bm.free_table(a)
    assert bm.num_free == 2 and bm.ref[b[0]] == 1  # shared blocks still held by b
    bm.free_table(b)
    assert bm.num_free == 4 and len(bm.evictable) == 2  # free, but still cached
    c: list[int] = []
    bm.grow(c, 8)  # takes the truly free blocks first, then evicts the cached ones
    assert bm.num_free == 0 and not bm.cached
    assert block_hashes([1, 2, 3, 4], 2) != block_hashes([3, 4, 1, 2], 2)[::-1]  # chained: position matters


def test_blocks_return_to_the_free_list_after_cancel():
    model = nano()
    engine = Engine(model, max_batch_size=2, block_size=4)
    ids = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=30)) for p in PROMPTS]
    for _ in range(3):
        engine.step()
    assert engine.blocks.num_free < engine.blocks.num_blocks
    assert engine.abort(ids[0]) and engine.abort(ids[-1])  # one running, one still waiting
    assert not engine.abort(ids[0])
    while engine.has_work():
        engine.step()
    assert_all_blocks_free(engine)


def test_stop_tokens_finish_and_ignore_eos_does_not():
    model = nano()
    first = alone(model, [PROMPTS[2]], 12)[0]
    stop = first[4]
    engine = Engine(model, max_batch_size=2, stop_token_ids=[stop])
    out = engine.generate([PROMPTS[2]], GREEDY)[0]
    assert out == first[:first.index(stop) + 1]
    full = engine.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    assert full == first


def test_ignore_eos_ignores_eos_only():
    """The engine's stop tokens (EOS) are ignored; the request's own stop_token_ids still stop it."""
    model = nano()
    first = alone(model, [PROMPTS[2]], 12)[0]
    engine = Engine(model, max_batch_size=2, stop_token_ids=[first[2]])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[first[6]])
    assert engine.generate([PROMPTS[2]], params)[0] == first[:first.index(first[6]) + 1]


def test_context_limit_and_bad_prompts():
    model = nano(seq_len=32)
    engine = Engine(model, max_batch_size=2)
    out = engine.generate([list(range(1, 29))], SamplingParams(temperature=0.0, max_tokens=50))[0]
    assert len(out) == 4  # stops when the context is full
    with pytest.raises(ValueError, match="prompt: 33 tokens"):
        engine.add_request(list(range(33)), GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request([1, 300], GREEDY)
    with pytest.raises(ValueError, match="prompt: empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(InvalidParam, match="stop_token_ids: token ids \\[257\\]") as e:
        engine.add_request([1], SamplingParams(stop_token_ids=[3, 257]))
    assert e.value.param == "stop_token_ids"


@pytest.mark.parametrize("draft", [False, True])
def test_a_request_whose_sampling_raises_fails_alone(monkeypatch, draft):
    """One request's sampling (or its draft's) raises: that request finishes with "error" and
    the message; the others run to the same tokens as without it; every block comes back.
    A forward pass that raises fails its step's requests, and the next requests run."""
    import pipeline.inference.engine as engine_module
    poisoned = 666  # the seed that marks the request to fail

    def failing(real):
        def wrapped(logits, params, *args, **kwargs):
            if params.seed == poisoned:
                raise RuntimeError("injected sampling failure")
            return real(logits, params, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(engine_module, "probabilities" if draft else "sample",
                        failing(engine_module.probabilities if draft else engine_module.sample))
    model = nano()
    engine = Engine(model, max_batch_size=4, block_size=4, draft_model=nano(1) if draft else None)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
    bad = engine.add_request(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=12, seed=poisoned))
    out: dict[int, list[int]] = {i: [] for i in ids}
    finished = {}
    while engine.has_work():
        for o in engine.step():
            out.get(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = o
    assert [out[i] for i in ids] == alone(model, PROMPTS[:3], 12)
    assert finished[bad].finish_reason == "error" and "injected sampling failure" in finished[bad].error
    assert all(finished[i].finish_reason == "length" for i in ids)
    assert_all_blocks_free(engine)

    calls = 0
    real_forward = engine._forward

    def forward_fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected forward failure")
        return real_forward(*args)

    monkeypatch.setattr(engine, "_forward", forward_fails_once)
    first = engine.add_request(PROMPTS[0], GREEDY)
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(first, "error")]
    assert engine.generate([PROMPTS[1]], GREEDY) == alone(model, [PROMPTS[1]], 12)
    assert_all_blocks_free(engine)


def test_seeded_sampling_does_not_depend_on_the_batch():
    """Each request draws from its own generator: its tokens are the same alone or in a batch."""
    model = nano()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234)
    together = Engine(model, max_batch_size=6).generate(PROMPTS, params)
    one = Engine(model, max_batch_size=6).generate([PROMPTS[3]], params)[0]
    assert together[3] == one
    assert together[3] != together[0] or PROMPTS[3] == PROMPTS[0]


# --- speculative decoding --------------------------------------------------------------------

@pytest.mark.parametrize("draft_seed", [0, 1])  # the target itself as draft (all accepted), another model
def test_greedy_speculative_equals_greedy_target(draft_seed):
    model, draft = nano(0), nano(draft_seed)
    engine = Engine(model, max_batch_size=4, block_size=4, draft_model=draft, num_speculative_tokens=3)
    assert engine.generate(PROMPTS, GREEDY) == alone(model, PROMPTS, 12)
    rate = engine.kv_stats()["acceptance_rate"]
    assert rate == 1.0 if draft_seed == 0 else rate < 1.0
    assert_all_blocks_free(engine)


def peaked(seed: int) -> GPT:
    """A nano model over 8 tokens whose next-token distributions are far from uniform (a large
    final LayerNorm gain), so target and draft disagree a lot."""
    model = nano(seed, vocab_size=8, seq_len=16)
    with torch.no_grad():
        model.ln_f.weight.mul_(10.0)
    return model


def exact_distributions(model: GPT, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t1, t2) as an (8, 8) table and P(t3) (8,), computed from the model's probabilities."""
    forward, V = forward_full(model), model.config.vocab_size
    p1 = forward(torch.tensor([prompt]))[0][0, -1, :V].softmax(-1)
    p2 = forward(torch.tensor([prompt + [a] for a in range(V)]))[0][:, -1, :V].softmax(-1)
    pairs = list(itertools.product(range(V), repeat=2))
    p3 = forward(torch.tensor([prompt + list(ab) for ab in pairs]))[0][:, -1, :V].softmax(-1)
    joint = p1[:, None] * p2
    return joint, (joint.flatten()[:, None] * p3).sum(0)


def test_sampled_speculative_decoding_keeps_the_target_distribution():
    """t1 comes from the prefill; t2 and t3 from one round of 2 draft tokens and a verification.
    Their empirical distribution over 2,000 requests fits the target's exact one, and the test
    has the power to reject the draft's distribution (what accepting every draft would give)."""
    target, draft = peaked(0), peaked(1)
    prompt, n = [1, 2, 3], 2000
    engine = Engine(target, max_batch_size=64, block_size=2, draft_model=draft, num_speculative_tokens=2, seed=5)
    outs = engine.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3))
    assert all(len(o) == 3 for o in outs)
    assert 0.1 < engine.kv_stats()["acceptance_rate"] < 0.9  # the rule is exercised both ways

    joint, t3 = exact_distributions(target, prompt)
    q_joint, _ = exact_distributions(draft, prompt)
    draft_t2 = (joint.sum(1)[:, None] * q_joint / q_joint.sum(1, keepdim=True))  # t1 from target, t2 from draft

    def p_value(counts: Counter, expected: torch.Tensor) -> float:
        expected = expected.flatten() * n
        keep = expected >= 5  # chi-square needs expected counts >= 5; the rest pooled
        obs = torch.tensor([counts.get(i, 0) for i in range(expected.numel())], dtype=torch.float64)
        f_obs, f_exp = obs[keep], expected[keep].double()
        if not keep.all():
            f_obs, f_exp = torch.cat([f_obs, obs[~keep].sum().view(1)]), torch.cat([f_exp, expected[~keep].sum().view(1)])
        f_obs, f_exp = f_obs.numpy(), f_exp.numpy()
        f_exp *= f_obs.sum() / f_exp.sum()
        return float(chisquare(f_obs, f_exp).pvalue)

    pair_counts = Counter(o[0] * 8 + o[1] for o in outs)
    assert p_value(pair_counts, joint) > 1e-3
    assert p_value(Counter(o[2] for o in outs), t3) > 1e-3
    assert p_value(pair_counts, draft_t2) < 1e-6  # the test can tell the distributions apart
    assert_all_blocks_free(engine)

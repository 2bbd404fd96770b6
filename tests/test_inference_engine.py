"""The engine (pipeline/inference/): continuous batching over the paged KV cache, prefix caching,
preemption, and speculative decoding, against greedy decoding by full forwards of the model."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from pipeline.inference import Engine, SamplingParams
from pipeline.inference.blocks import BlockManager, block_hashes
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


@torch.no_grad()
def alone(model: GPT, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy, one prompt at a time, each token the argmax of a full forward (no cache) over the
    sequence so far, padding ids excluded."""
    out = []
    for prompt in prompts:
        idx = torch.tensor([prompt])
        for _ in range(n):
            next_id = model(idx)[0, -1, :model.config.vocab_size].argmax().view(1, 1)
            idx = torch.cat([idx, next_id], dim=1)
        out.append(idx[0, len(prompt):].tolist())
    return out


def ids(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def assert_all_blocks_free(engine: Engine) -> None:
    b = engine.blocks
    assert b.num_free == b.num_blocks and sum(b.ref) == 0, f"{b.num_free} of {b.num_blocks} blocks free"
    assert not engine.has_work() and not engine.requests


@pytest.mark.parametrize("rope", [False, True])
def test_mixed_batch_equals_generate_alone(rope):
    model = nano(rope=rope)
    engine = Engine(model, max_batch_size=4, block_size=4)  # 6 prompts, 4 at a time: requests join mid-run
    assert ids(engine.generate(PROMPTS, GREEDY)) == alone(model, PROMPTS, 12)
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
    reference = ids(Engine(model, max_batch_size=6, block_size=4).generate(PROMPTS, GREEDY))
    engine = Engine(model, max_batch_size=6, **options)
    assert ids(engine.generate(PROMPTS, GREEDY)) == reference
    if "num_blocks" in options:
        assert engine.stats.preemptions > 0
    if options.get("scheduling") == "static":  # one batch of all six, prefilled together, none joining later
        assert engine.stats.steps == 1 + 11
    assert_all_blocks_free(engine)


def test_prefix_cache_shares_blocks_and_changes_nothing():
    model = nano()
    system = list(range(30, 54))  # 24 tokens = 6 full blocks of 4, shared by every prompt
    prompts = [system + [i, i + 1] for i in range(60, 66)]
    uncached = ids(Engine(model, max_batch_size=3, block_size=4, prefix_caching=False).generate(prompts, GREEDY))
    engine = Engine(model, max_batch_size=3, block_size=4)
    # the first request computes the shared blocks; the other five find all 6 in the cache
    assert ids(engine.generate(prompts[:1], GREEDY)) + ids(engine.generate(prompts[1:], GREEDY)) == uncached
    assert engine.stats.prefix_blocks_hit == 5 * 6
    assert engine.stats.prompt_tokens_computed == 26 + 5 * 2
    assert_all_blocks_free(engine)
    assert len(engine.blocks.cached) >= 6  # kept (evictable) for the next request


def test_requests_admitted_together_share_their_prefix_in_the_same_step():
    """Six copies of each of two prompts (GRPO's groups) sent at once: the first of each computes
    its full blocks, the rest of its group take them in the same step, and the output is the
    uncached one."""
    model = nano()
    prompts = [list(range(30, 48)), list(range(80, 99))]  # 4 full blocks of 4 (+ 2 and + 3 tokens)
    group = [p for p in prompts for _ in range(6)]
    engine = Engine(model, max_batch_size=12, block_size=4)
    out = ids(engine.generate(group, GREEDY))
    assert out == [o for o in alone(model, prompts, 12) for _ in range(6)]
    assert engine.stats.prefix_blocks_hit == 2 * 5 * 4
    assert engine.stats.prompt_tokens_computed == 18 + 19 + 5 * 2 + 5 * 3
    assert_all_blocks_free(engine)


def test_padding_ids_are_never_drawn():
    """Rig the model so the padding ids (65..127) have the highest logits: greedy and sampled
    tokens are still real ids."""
    model = nano(vocab_size=65)
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)  # final hidden state: all ones
        model.wte.weight.zero_()
        model.wte.weight[65:] = 1.0  # padding logits 32, real ones 0
    engine = Engine(model, max_batch_size=2)
    for params in (GREEDY, SamplingParams(temperature=1.0, max_tokens=12, seed=0)):
        assert all(t < 65 for c in engine.generate([[0], [1, 2]], params) for t in c.token_ids)


def test_tiny_top_p_is_greedy_and_seeds_repeat():
    model = nano()
    greedy = ids(Engine(model, max_batch_size=6).generate(PROMPTS, GREEDY))
    nucleus = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=12, seed=1)
    assert ids(Engine(model, max_batch_size=6).generate(PROMPTS, nucleus)) == greedy  # the top token alone reaches any tiny p
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12)
    a, b = (ids(Engine(model, max_batch_size=6, seed=2).generate(PROMPTS, params)) for _ in range(2))
    assert a == b and a != greedy


def test_block_manager_reference_counts_and_eviction():
    bm = BlockManager(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a: list[int] = []
    bm.grow(a, 5)
    assert len(a) == 3 and bm.num_free == 1
    assert bm.register(tokens, a, num_tokens=5, num_registered=0) == 2  # two full blocks
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
    out = ids(engine.generate([PROMPTS[2]], GREEDY))[0]
    assert out == first[:first.index(stop) + 1]
    full = ids(engine.generate([PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)))[0]
    assert full == first


def test_ignore_eos_ignores_eos_only():
    """The engine's stop tokens (EOS) are ignored; the request's own stop_token_ids still stop it."""
    model = nano()
    first = alone(model, [PROMPTS[2]], 12)[0]
    engine = Engine(model, max_batch_size=2, stop_token_ids=[first[2]])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[first[6]])
    assert ids(engine.generate([PROMPTS[2]], params))[0] == first[:first.index(first[6]) + 1]


def test_context_limit_and_bad_prompts():
    model = nano(seq_len=32)
    engine = Engine(model, max_batch_size=2)
    out = ids(engine.generate([list(range(1, 29))], SamplingParams(temperature=0.0, max_tokens=50)))[0]
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


def test_max_model_len_bounds_requests_and_sizes_the_pool():
    """An engine for short work: requests stop at max_model_len tokens (prompt and output), longer
    prompts are refused, and `for_prompts` sizes the pool to its batch of such requests."""
    model = nano()
    engine = Engine(model, max_batch_size=2, block_size=4, max_model_len=20)
    assert engine.blocks.num_blocks == 2 * 5
    out = engine.generate([list(range(1, 17))], SamplingParams(temperature=0.0, max_tokens=50))[0]
    assert out.finish_reason == "length" and out.token_ids == alone(model, [list(range(1, 17))], 4)[0]
    with pytest.raises(InvalidParam, match="prompt: 21 tokens, the context is 20"):
        engine.add_request(list(range(21)), GREEDY)
    with pytest.raises(ValueError, match="max_model_len=65"):
        Engine(model, max_batch_size=1, max_model_len=65)
    sized = Engine.for_prompts(model, PROMPTS, 12, max_batch_size=6, block_size=4)
    assert sized.seq_len == 37 + 12 and sized.blocks.num_blocks == 6 * 13
    assert ids(sized.generate(PROMPTS, GREEDY)) == alone(model, PROMPTS, 12)


@pytest.mark.parametrize("draft", [False, True])
def test_a_request_whose_sampling_raises_fails_alone(monkeypatch, draft):
    """One request's sampling (or its draft's) raises: that request finishes with "error" and
    the message; the others run to the same tokens as without it; every block comes back.
    A forward pass that raises fails its step's requests, and the next requests run."""
    import pipeline.inference.engine as engine_module
    import pipeline.inference.speculative as speculative_module
    poisoned = 666  # the seed that marks the request to fail

    def failing(real):
        def wrapped(logits, params, *args, **kwargs):
            if any(p.seed == poisoned for p in ([params] if draft else params)):
                raise RuntimeError("injected sampling failure")
            return real(logits, params, *args, **kwargs)
        return wrapped

    if draft:
        monkeypatch.setattr(speculative_module, "probabilities", failing(speculative_module.probabilities))
    else:
        monkeypatch.setattr(engine_module, "sample", failing(engine_module.sample))
    model = nano()
    engine = Engine(model, max_batch_size=4, block_size=4, draft_model=nano(1) if draft else None)
    good = [engine.add_request(p, GREEDY) for p in PROMPTS[:3]]
    bad = engine.add_request(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=12, seed=poisoned))
    out: dict[int, list[int]] = {i: [] for i in good}
    finished = {}
    while engine.has_work():
        for o in engine.step():
            out.get(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = o
    assert [out[i] for i in good] == alone(model, PROMPTS[:3], 12)
    assert finished[bad].finish_reason == "error" and "injected sampling failure" in finished[bad].error
    assert all(finished[i].finish_reason == "length" for i in good)
    assert_all_blocks_free(engine)

    calls = 0
    real_run = engine.runner.run

    def run_fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected forward failure")
        return real_run(*args)

    # the failed step's prompt blocks were never written: they must not stay in the prefix cache
    monkeypatch.setattr(engine.runner, "run", run_fails_once)
    prompt = list(range(60, 80))  # 4 full blocks, new to the cache
    first = engine.add_request(prompt, GREEDY)
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(first, "error")]
    hits = engine.stats.prefix_blocks_hit
    assert ids(engine.generate([prompt], GREEDY)) == alone(model, [prompt], 12)
    assert engine.stats.prefix_blocks_hit == hits
    assert_all_blocks_free(engine)


def test_seeded_sampling_does_not_depend_on_the_batch():
    """Each request draws from its own generator: its tokens are the same alone or in a batch."""
    model = nano()
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234)
    together = ids(Engine(model, max_batch_size=6).generate(PROMPTS, params))
    one = ids(Engine(model, max_batch_size=6).generate([PROMPTS[3]], params))[0]
    assert together[3] == one
    assert together[3] != together[0] or PROMPTS[3] == PROMPTS[0]


# --- speculative decoding --------------------------------------------------------------------

@pytest.mark.parametrize("draft_seed", [0, 1])  # the target itself as draft (all accepted), another model
def test_greedy_speculative_equals_greedy_target(draft_seed):
    model, draft = nano(0), nano(draft_seed)
    engine = Engine(model, max_batch_size=4, block_size=4, draft_model=draft, num_speculative_tokens=3)
    assert ids(engine.generate(PROMPTS, GREEDY)) == alone(model, PROMPTS, 12)
    rate = engine.kv_stats()["acceptance_rate"]
    assert rate == 1.0 if draft_seed == 0 else rate < 1.0
    assert_all_blocks_free(engine)


@torch.no_grad()
@pytest.mark.parametrize("options", [{}, {"chunked_prefill": True, "max_num_batched_tokens": 8},
                                     {"num_blocks": 16, "block_size": 4}])  # chunks; a pool that preempts
def test_logprobs_and_prompt_logprobs_are_the_models(options):
    """logprobs=k and prompt_logprobs=k: each token's log-probability under one plain forward
    (real vocabulary) with the k most likely ids, the prompt's first token None, whether the
    prompt is prefilled at once, in chunks, or again after a preemption, and whether or not it
    is in the prefix cache."""
    model = nano(0)
    engine = Engine(model, max_batch_size=3, **options)
    engine.generate(PROMPTS[2:3], GREEDY)  # its blocks are cached now: prompt_logprobs must compute them anyway
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, prompt_logprobs=3)
    prompts = [PROMPTS[2], PROMPTS[4][:24], PROMPTS[1]]
    ids = [engine.add_request(p, params) for p in prompts]
    outs: dict[int, list] = {i: [] for i in ids}
    while engine.has_work():
        for o in engine.step():
            outs[o.request_id].append(o)
    for prompt, i in zip(prompts, ids):
        got = [o for o in outs[i] if o.new_token_ids]
        tokens = [t for o in got for t in o.new_token_ids]
        seq = prompt + tokens
        logp = model(torch.tensor([seq[:-1]]))[0, :, :model.config.vocab_size].log_softmax(-1)
        expected = logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
        first = [o.prompt_logprobs for o in got]
        assert first[0] is not None and all(p is None for p in first[1:])  # on the first token's output only
        prompt_lp = first[0]
        assert prompt_lp[0] is None and len(prompt_lp) == len(prompt)
        reported = prompt_lp[1:] + [lp for o in got for lp in o.new_token_logprobs]
        torch.testing.assert_close(torch.tensor([lp.logprob for lp in reported]), expected, atol=1e-5, rtol=0)
        for lp, row, k in zip(reported, logp, [3] * (len(prompt) - 1) + [2] * len(tokens)):
            assert [t for t, _ in lp.top] == row.topk(k).indices.tolist()
    if "num_blocks" in options:
        assert engine.stats.preemptions > 0
    assert_all_blocks_free(engine)


def peaked(seed: int) -> GPT:
    """A nano model over 8 tokens whose next-token distributions are far from uniform (a large
    final LayerNorm gain), so target and draft disagree a lot."""
    model = nano(seed, vocab_size=8, seq_len=16)
    with torch.no_grad():
        model.ln_f.weight.mul_(10.0)
    return model


@torch.no_grad()
def exact_distributions(model: GPT, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t1, t2) as an (8, 8) table and P(t3) (8,), computed from the model's probabilities."""
    V = model.config.vocab_size

    def next_probs(rows: list[list[int]]) -> torch.Tensor:
        return model(torch.tensor(rows))[:, -1, :V].softmax(-1)
    p1 = next_probs([prompt])[0]
    p2 = next_probs([prompt + [a] for a in range(V)])
    pairs = list(itertools.product(range(V), repeat=2))
    p3 = next_probs([prompt + list(ab) for ab in pairs])
    joint = p1[:, None] * p2
    return joint, (joint.flatten()[:, None] * p3).sum(0)


def test_sampled_speculative_decoding_keeps_the_target_distribution():
    """t1 comes from the prefill; t2 and t3 from one round of 2 draft tokens and a verification.
    Their empirical distribution over 2,000 requests fits the target's exact one, and the test
    has the power to reject the draft's distribution (what accepting every draft would give)."""
    target, draft = peaked(0), peaked(1)
    prompt, n = [1, 2, 3], 2000
    engine = Engine(target, max_batch_size=64, block_size=2, draft_model=draft, num_speculative_tokens=2, seed=5)
    outs = ids(engine.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3)))
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

"""GRPO's pure pieces: rollouts on the inference engine and their log-probs, advantages, the three loss
reductions on hand-computed tensors, gradient accumulation invariance, the format reward.

Rollouts use a real `nano`-shaped GPT over a vocabulary of 8 ids, the stop token one of them, so
random weights stop some completions and cut others at the length limit."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pipeline.inference.sampling import SamplingParams, mask_padding, sample
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.train.rl import (PolicyLoss, Rollouts, batch_logprobs, completion_logprobs,
                                 equal_reward_groups, format_reward, group_advantages, loss_mask, loss_weight,
                                 micro_batches, mixed_seed, policy_loss, sample_completions, sequences,
                                 set_old_logprobs)

VOCAB, STOP = 8, 7
PROMPTS = [[1, 2, 3], [4, 5], [6, 1, 2, 3, 4]]  # uneven lengths: sequences pad on the right


def nano() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=16, n_layer=2, n_head=2, n_embd=32)).eval()


def rollouts(model: GPT, seed: int = 0, **overrides) -> Rollouts:
    kw = dict(group_size=4, max_completion_tokens=6, temperature=1.0, top_k=None, top_p=1.0, stop_token=STOP,
              seed=(seed,))
    return sample_completions(model, PROMPTS, **{**kw, **overrides})


# --- rollouts ----------------------------------------------------------------------------------------

def naive_completions(model: GPT, group_size: int, max_completion_tokens: int, seed: int) -> list[list[int]]:
    """The same sampling without a cache, one completion at a time: each token reads the whole
    sequence again, drawn by the one sampler with the completion's own seeded generator."""
    out = []
    params = SamplingParams(temperature=1.0, max_tokens=max_completion_tokens)
    for i, prompt in enumerate(PROMPTS):
        for j in range(group_size):
            generator, row = torch.Generator().manual_seed(mixed_seed(seed, i, j)), list(prompt)
            for _ in range(max_completion_tokens):
                with torch.no_grad():
                    logits = mask_padding(model(torch.tensor([row]))[0, -1].float(), VOCAB)
                row.append(sample(logits[None], [params], [row], [generator])[0])
                if row[-1] == STOP:
                    break
            out.append(row[len(prompt):])
    return out


def test_completions_stop_at_the_stop_token_or_the_limit():
    r = rollouts(nano())
    assert r.ids.shape == r.mask.shape == (12, 6) and r.truncated.shape == (12,) and r.group_size == 4
    for row, mask, truncated in zip(r.ids.tolist(), r.mask.tolist(), r.truncated.tolist()):
        n = sum(mask)
        assert mask == [True] * n + [False] * (6 - n)  # a prefix
        assert row[n:] == [STOP] * (6 - n)  # padding
        assert STOP not in row[:n - 1]  # nothing sampled after a stop
        assert truncated == (row[n - 1] != STOP) and (n == 6 or not truncated)
    assert 0 < int(r.truncated.sum()) < 12  # this seed exercises both endings


def test_cached_rollouts_equal_sampling_without_a_cache():
    model = nano()
    r = rollouts(model, seed=3)
    cached = [row[:n] for row, n in zip(r.ids.tolist(), r.mask.sum(dim=1).tolist())]
    assert cached == naive_completions(model, 4, 6, 3)


def test_rollout_logprobs_equal_the_trainers_recomputation():
    """The log-probability the engine gives each token it sampled (paged K/V, continuous batching,
    a token at a time) equals the trainer's recomputation of the same sequences (one forward over
    each whole, right-padded sequence, `completion_logprobs`): fp32 on the CPU, within 1e-5. So
    GRPO's importance ratios start at 1."""
    model = nano()
    r = rollouts(model, seed=5)
    trainer, _ = completion_logprobs(model, *sequences(r))
    assert (r.logprobs[~r.mask] == 0).all()
    torch.testing.assert_close(r.logprobs, trainer.detach(), atol=1e-5, rtol=0)
    assert r.logprobs[r.mask].std() > 0.1  # real, varied log-probs: a wrong position or row would show


def test_rollouts_are_seeded():
    model = nano()
    a, b, c = rollouts(model, seed=1), rollouts(model, seed=1), rollouts(model, seed=2)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.ids, c.ids)


def test_a_prompt_too_long_for_the_context_is_named():
    model = nano()
    with pytest.raises(ValueError, match="prompt 0: 12 tokens"):
        sample_completions(model, [[1] * 12], 2, 6, 1.0, None, 1.0, STOP, (0,))


def test_completion_logprobs_read_each_token_where_it_is_predicted():
    """Batched over right-padded rows, equal to log_softmax of a forward over each row alone."""
    model = nano()
    r = rollouts(model)
    idx, targets, positions = sequences(r)
    logp, entropy = completion_logprobs(model, idx, targets, positions, with_entropy=True)
    assert logp.shape == entropy.shape == (12, 6)
    for i in range(12):
        prompt, n = PROMPTS[i // 4], int(r.mask[i].sum())
        completion = r.ids[i, :n].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1]
        log_probs = logits.log_softmax(dim=-1)
        expected = [log_probs[j, t].item() for j, t in enumerate(completion)]
        assert logp[i, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert logp[i, n:].abs().sum() == 0
        probs = logits[:, :VOCAB].softmax(dim=-1)
        expected_entropy = -(probs * probs.log()).sum(dim=-1)
        assert entropy[i, :n].tolist() == pytest.approx(expected_entropy.tolist(), abs=1e-5)

# --- advantages -------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4; the second all right


def test_group_scale_divides_by_the_group_std():
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # sample std of (1, 0, 0, 1)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(REWARDS, 4).tolist() == pytest.approx(expected, abs=1e-6)


def test_none_scale_only_centres():
    assert group_advantages(REWARDS, 4, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]


def test_batch_scale_divides_by_the_batch_std():
    std = statistics.stdev(REWARDS.tolist())
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert group_advantages(REWARDS, 4, scale="batch").tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_with_equal_rewards_has_zero_advantage(scale):
    # eight 0.3s: their float32 mean is 3e-8 off 0.3, which must not become an advantage
    rewards = torch.tensor([0.3] * 8 + [1.0, 0.0, 0.2, 0.0, 1.0, 1.0, 0.0, 0.3])
    adv = group_advantages(rewards, 8, scale=scale)
    assert adv[:8].tolist() == [0.0] * 8
    assert adv[8:].abs().min() > 0.1
    assert equal_reward_groups(rewards, 8) == 1
    assert equal_reward_groups(REWARDS, 4) == 1
    assert equal_reward_groups(torch.zeros(6), 2) == 3


@pytest.mark.parametrize("rewards, group_size, scale, message", [
    (torch.zeros(6), 4, "group", "divide"),
    (torch.zeros(6), 1, "group", ">= 2"),
    (torch.zeros(2, 3), 3, "group", "1-D"),
    (torch.zeros(6), 3, "std", "scale"),
])
def test_advantages_reject_bad_input(rewards, group_size, scale, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, group_size, scale=scale)


# --- the loss on hand-computed tensors --------------------------------------------------------------
# Two completions of 2 and 3 tokens (T = 3, the first padded), advantages +1 and -2, eps 0.2.
# ratio row 0: 1.5 (clipped to 1.2, A > 0), 0.9        -> objective 1.2, 0.9
# ratio row 1: 0.5 (clipped to 0.8, A < 0), 1.1, 1.3  -> objective -1.6, -2.2, -2.6 (1.3 is not
#              clipped: with A < 0 the min picks the unclipped -2.6)
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -2.0])
RATIO = [[1.5, 0.9, 1.0], [0.5, 1.1, 1.3]]
OBJECTIVE = [[1.2, 0.9], [-1.6, -2.2, -2.6]]
REF_MINUS_LOGP = [[0.1, -0.2, 0.0], [0.0, 0.3, -0.1]]


def hand_tensors(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], dtype=dtype)
    logp = (old + torch.tensor(RATIO, dtype=dtype).log()).requires_grad_()
    ref = logp.detach() + torch.tensor(REF_MINUS_LOGP, dtype=dtype)
    return logp, old, ref


@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", -(1.2 + 0.9 - 1.6 - 2.2 - 2.6) / 5),                 # sum over 5 tokens / 5
    ("grpo", -((1.2 + 0.9) / 2 + (-1.6 - 2.2 - 2.6) / 3) / 2),    # per-completion mean, then mean
    ("dr_grpo", -(1.2 + 0.9 - 1.6 - 2.2 - 2.6) / (2 * 4)),        # sum / (B x max_completion_tokens 4)
])
def test_each_loss_type_on_hand_computed_tensors(loss_type, expected):
    logp, old, _ = hand_tensors()
    loss, stats = policy_loss(logp, old, ADV, MASK, loss_type=loss_type, max_completion_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # row 0 token 0 and row 1 token 0
    assert stats["kl"] == 0.0 and stats["tokens"] == 5
    assert stats["weight"] == {"dapo": 5, "grpo": 2, "dr_grpo": 8}[loss_type]


def test_clipped_tokens_pass_no_gradient():
    """d loss / d logp = -A ratio / N on an unclipped token (dapo, N = 5), 0 on a clipped one."""
    logp, old, _ = hand_tensors()
    policy_loss(logp, old, ADV, MASK, loss_type="dapo")[0].backward()
    expected = [[0.0, -1 * 0.9 / 5, 0.0], [0.0, 2 * 1.1 / 5, 2 * 1.3 / 5]]
    assert logp.grad.tolist() == [pytest.approx(row, abs=1e-12) for row in expected]


def test_asymmetric_clip_uses_eps_high_above_one():
    logp, old, _ = hand_tensors()
    # eps_high 0.6: ratio 1.5 with A > 0 is no longer clipped; eps_low 0.2 still clips 0.5 with A < 0
    loss, stats = policy_loss(logp, old, ADV, MASK, eps_low=0.2, eps_high=0.6, loss_type="dapo")
    assert loss.item() == pytest.approx(-(1.5 + 0.9 - 1.6 - 2.2 - 2.6) / 5, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(1 / 5)


def test_kl_penalty_is_the_k3_estimator():
    logp, old, ref = hand_tensors()
    k3 = [[math.exp(d) - d - 1 for d in row] for row in REF_MINUS_LOGP]
    masked_k3 = [k3[0][0], k3[0][1], k3[1][0], k3[1][1], k3[1][2]]
    loss, stats = policy_loss(logp, old, ADV, MASK, ref_logp=ref, beta=0.1, loss_type="dapo")
    objective = [o for row in OBJECTIVE for o in row]
    assert loss.item() == pytest.approx(-sum(o - 0.1 * k for o, k in zip(objective, masked_k3)) / 5, abs=1e-12)
    assert stats["kl"] == pytest.approx(sum(masked_k3) / 5, abs=1e-12)
    # a reference without beta: the KL is reported, the loss is not penalised
    loss0, stats0 = policy_loss(logp, old, ADV, MASK, ref_logp=ref, beta=0.0, loss_type="dapo")
    assert loss0.item() == pytest.approx(-sum(objective) / 5, abs=1e-12)
    assert stats0["kl"] == stats["kl"]


def test_padding_never_leaks_into_the_loss():
    """Garbage at masked positions (an infinite ratio) leaves the loss and gradient finite and unchanged."""
    logp, old, ref = hand_tensors()
    clean, clean_stats = policy_loss(logp, old, ADV, MASK, ref_logp=ref, beta=0.1)
    old_bad, ref_bad = old.clone(), ref.clone()
    old_bad[0, 2], ref_bad[0, 2] = -float("inf"), float("inf")
    dirty, dirty_stats = policy_loss(logp, old_bad, ADV, MASK, ref_logp=ref_bad, beta=0.1)
    dirty.backward()
    assert dirty.item() == clean.item() and dirty_stats == clean_stats
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_rejects_bad_input():
    logp, old, _ = hand_tensors()
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_tokens"):
        policy_loss(logp, old, ADV, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, old, ADV, MASK, loss_type="ppo")
    with pytest.raises(ValueError, match=r"advantages \(3,\)"):
        policy_loss(logp, old, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="same"):
        policy_loss(logp, old[:, :2], ADV, MASK)


# --- gradient accumulation ----------------------------------------------------------------------------

SPLITS = (slice(0, 2), slice(2, 3), slice(3, 6))  # micro batches of 2, 1 and 3 completions


def accumulation_batch() -> tuple[torch.Tensor, ...]:
    """6 completions of uneven lengths (one fully masked: a truncated completion under
    mask_truncated), with rollout-time log-probs a little off the current ones."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 0, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    logp = (-torch.rand(6, 5, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulation_never_changes_the_gradient(loss_type):
    """One batch of 6 completions, and the same split 2 + 1 + 3 the way the training engine
    accumulates: backward of each micro batch's loss x weight, then the gradient / total weight."""
    logp, old, ref, adv, mask = accumulation_batch()
    kw = dict(beta=0.05, loss_type=loss_type, max_completion_tokens=6)
    policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)[0].backward()
    whole = logp.grad.clone()

    logp.grad = None
    total_weight = 0.0
    for rows in SPLITS:
        loss, stats = policy_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logp=ref[rows], **kw)
        (loss * stats["weight"]).backward()
        total_weight += stats["weight"]
    accumulated = logp.grad / total_weight
    assert total_weight == loss_weight(mask, loss_type, 6)
    assert torch.allclose(accumulated, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_a_mean_of_micro_batch_losses_would_change_the_gradient(loss_type):
    """The bug the weighting avoids (averaging each micro batch's normalised loss): on this
    batch it gives a different gradient, so the invariance test above can fail."""
    logp, old, ref, adv, mask = accumulation_batch()
    kw = dict(beta=0.05, loss_type=loss_type, max_completion_tokens=6)
    policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)[0].backward()
    whole = logp.grad.clone()
    logp.grad = None
    for rows in SPLITS:
        loss, _ = policy_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logp=ref[rows], **kw)
        (loss / len(SPLITS)).backward()
    assert not torch.allclose(logp.grad, whole, atol=1e-3, rtol=0)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulation_through_the_model(loss_type):
    """The same on the model's weights, through `micro_batches` and `PolicyLoss` as a step runs
    them: rollouts of 3 prompts x 4, truncated ones masked out, a KL to a reference, old
    log-probs taken once, then a policy that has moved (ratios not 1, some tokens clip). One
    micro batch of 12, or micro batches of 5 + 5 + 2 (each padded to its own length), summed the
    engine's way: backward of each loss_sum, the gradient / total weight."""
    model = nano()
    r = rollouts(model, seed=5)
    mask = loss_mask(r, mask_truncated=True)
    assert 0 < int(r.truncated.sum()) and mask.sum() < r.mask.sum()
    adv = group_advantages(torch.arange(12.0) % 3, 4)
    ref_logp = batch_logprobs(nano(), micro_batches(r, mask, adv, 12))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    old = batch_logprobs(model, micro_batches(r, mask, adv, 12))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + 1)))
    loss_fn = PolicyLoss(loss_type=loss_type, eps_low=0.1, eps_high=0.1, beta=0.1, max_completion_tokens=6)

    def grads(micro_batch: int) -> list[torch.Tensor]:
        batches = micro_batches(r, mask, adv, micro_batch, ref_logp=ref_logp)
        for b, rows in zip(batches, range(0, 12, micro_batch)):
            b["old_logp"] = old[rows:rows + micro_batch]
        model.zero_grad()
        total = 0.0
        for b in batches:
            loss_sum, weight = loss_fn(model, b)
            loss_sum.backward()
            total += weight
        assert total == loss_weight(mask, loss_type, 6)
        return [p.grad / total for p in model.parameters()]

    whole = grads(12)
    stats = loss_fn.stats()
    assert stats["clip_frac"] > 0 and stats["kl"] > 0 and stats["entropy"] > 0
    for a, b in zip(grads(5), whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert loss_fn.stats() == pytest.approx(stats, abs=1e-6)


def test_on_policy_old_logprobs_are_the_forwards_own():
    """mu = 1: old_logp None means the forward's own, detached, so ratio 1: the same loss and
    gradient as old log-probs taken by a separate forward."""
    model = nano()
    r = rollouts(model, seed=5)
    adv = group_advantages(torch.arange(12.0) % 3, 4)
    loss_fn = PolicyLoss(loss_type="dapo", eps_low=0.2, eps_high=0.2, beta=0.0, max_completion_tokens=6)
    [batch] = micro_batches(r, r.mask, adv, 12)
    loss_sum, _ = loss_fn(model, batch)
    loss_sum.backward()
    on_policy = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    set_old_logprobs(model, [batch])
    loss_sum2, _ = loss_fn(model, batch)
    loss_sum2.backward()
    assert loss_fn.stats()["clip_frac"] == 0
    torch.testing.assert_close(loss_sum, loss_sum2, atol=1e-6, rtol=0)
    for a, b in zip(on_policy, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_mask_truncated_drops_whole_completions():
    r = rollouts(nano())
    assert torch.equal(loss_mask(r, mask_truncated=False), r.mask)
    masked = loss_mask(r, mask_truncated=True)
    assert masked[r.truncated].sum() == 0 and torch.equal(masked[~r.truncated], r.mask[~r.truncated])


# --- rewards --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, ended, expected", [
    ("The answer is 42.", True, 1.0),
    ("-1,234.5", True, 1.0),
    ("The answer is 42.", False, 0.0),  # cut at the length limit
    ("I do not know.", True, 0.0),
    ("", True, 0.0),
])
def test_format_reward(text, ended, expected):
    assert format_reward(text, ended) == expected

"""GRPO's pure pieces: advantages, the three loss reductions on hand-computed tensors, gradient
accumulation invariance, the format reward."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pipeline.train.grpo import (equal_reward_groups, format_reward, group_advantages, loss_weight,
                                 policy_loss)

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

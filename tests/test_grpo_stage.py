"""The GRPO stage on the training engine: a run on a trivially learnable reward raises it, a real
arithmetic run writes its outputs and manifest, a stopped run resumes bit-identically (mu = 2 and
a KL reference included), and the config refuses what the stage does not support.

The "SFT model" is a freshly initialised `nano` GPT saved as the engine exports final.pt, with a
BPE trained on TinyStories with the chat specials: the stage cannot tell, and it trains in
seconds. Runs are in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_chat_model
from pipeline.artifacts import verify
from pipeline.config import ConfigError, section_config
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tasks import get_task
from pipeline.train import grpo
from pipeline.train.engine import lr_at, setup_run, skip_step, train_step
from pipeline.train.grpo import step_prompts, train

TASKS_CONFIG = section_config("tasks", {"arithmetic": {"train_problems": 200, "test_problems": 20}})
TEST_CONFIG = dict(prompts_per_step=4, group_size=4, max_completion_tokens=6, max_steps=4, lr=0.003,
                   warmup_steps=1, micro_batch=6, eval_every=2, eval_examples=4, checkpoint_every=2, keep=2,
                   samples=1, sample_tokens=6, accuracy_examples=6, log_every=1, peak_flops=1e12,
                   wandb_mode="disabled")
SEQ_LEN = 64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def sft_model(stories, tmp_path_factory) -> tuple[Path, Path]:
    """(final.pt, tokenizer.json): a nano GPT saved the way the engine exports it, and its tokenizer."""
    return save_chat_model(tmp_path_factory.mktemp("sft_model"), stories, SEQ_LEN, stage="sft")


def run(sft_model, out: Path, stop_at: int | None = None, **overrides) -> dict:
    cfg = section_config("grpo", {**TEST_CONFIG, **overrides})
    return train(cfg, model_path=sft_model[0], tokenizer_path=sft_model[1], out=out, tasks_config=TASKS_CONFIG,
                 stop_at=stop_at)


def step_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "reward_mean" in r]


class VowelTask:
    """Arithmetic's prompts with a reward any policy can learn: the share of the completion's
    characters that are vowels (a dense, per-token signal, unlike an exact answer)."""
    name = "vowels"

    def __init__(self, config: dict) -> None:
        self.arithmetic = get_task("arithmetic", config)
        self.config = self.arithmetic.config  # its held-out items too

    def examples(self, split: str):
        return self.arithmetic.examples(split)

    def reward(self, completion: str, answer: str) -> float:
        return sum(c in "aeiou" for c in completion) / max(len(completion), 1)


@pytest.fixture
def vowels(monkeypatch):
    """The stage's task replaced by VowelTask (a random model never answers arithmetic right, so
    every advantage would be 0 and nothing would move)."""
    monkeypatch.setattr(grpo, "get_task", lambda name, config: VowelTask(config))


def test_a_learnable_reward_goes_up(sft_model, tmp_path, vowels):
    """12 GRPO steps on the vowel reward from a random model: the mean reward of the last 4 steps
    beats the first 4's by a clear margin (a sign error or a zero gradient would not)."""
    run(sft_model, tmp_path / "grpo", max_steps=12, lr=0.03, format_weight=0.0, max_completion_tokens=8,
        group_size=8, eval_examples=0, accuracy_examples=0, checkpoint_every=100)
    rewards = [r["reward_mean"] for r in step_records(tmp_path / "grpo")]
    assert len(rewards) == 12
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards


def test_outputs_manifest_and_logged_statistics(sft_model, tmp_path):
    out = tmp_path / "grpo"
    summary = run(sft_model, out)
    assert summary["finished"] and summary["step"] == 4
    for name in ("final.pt", "metrics.jsonl", "loss.png", "rewards.png", "samples.md", "manifest.json"):
        assert (out / name).is_file(), name
    checked, problems = verify(out)
    assert problems == [] and checked == 5  # what the manifest names: the files above but itself
    manifest = json.loads((out / "manifest.json").read_text())
    assert "rewards.png" in [entry["path"] for entry in manifest["outputs"]]
    assert manifest["counts"]["grpo_steps"] == 4 and manifest["counts"]["rollouts"] == 4 * 4 * 4
    assert 0.0 <= manifest["metrics"]["arithmetic_accuracy_input"]["value"] <= 1.0
    assert manifest["metrics"]["arithmetic_accuracy"]["n"] == 6
    records = step_records(out)
    assert [r["grpo_step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        for key in ("reward_mean", "reward_std", "accuracy", "kl", "clip_frac", "entropy", "completion_tokens",
                    "zero_adv_groups", "rollout_tokens_per_s", "loss"):
            assert r[key] is not None, key
        assert 0 <= r["zero_adv_groups"] <= 4 and 0 < r["completion_tokens"] <= 6
        assert r["kl"] == 0.0 and r["clip_frac"] == 0.0  # beta 0 (no reference), mu 1 (ratio 1)
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "held_out_accuracy" in r]
    assert [r["grpo_step"] for r in evals] == [2, 4]


def test_stop_and_resume_is_bit_identical(sft_model, tmp_path, vowels):
    """mu = 2 updates per rollout batch and a KL reference, on the vowel reward (so the weights
    move and the ratio clips): stopped after GRPO step 2 and rerun,
    the final weights equal an uninterrupted run's bit for bit (rollouts are seeded per step and
    prompt, so nothing random is replayed differently)."""
    overrides = dict(num_iterations=2, beta=0.05, eval_examples=0, accuracy_examples=0, samples=0)
    run(sft_model, tmp_path / "whole", **overrides)
    stopped = run(sft_model, tmp_path / "resumed", stop_at=2, **overrides)
    assert not stopped["finished"] and stopped["step"] == 2
    assert not (tmp_path / "resumed" / "final.pt").exists()
    run(sft_model, tmp_path / "resumed", **overrides)
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert whole["step"] == resumed["step"] == 8  # optimizer updates: 4 GRPO steps x mu 2
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    records = step_records(tmp_path / "resumed")
    assert [r["grpo_step"] for r in records] == [1, 2, 3, 4]
    assert all(r["kl"] > 0 for r in records)  # the second update of each batch has left the reference
    assert any(r["clip_frac"] > 0 for r in records)  # and some ratios clip
    assert [r["reward_mean"] for r in records] == [r["reward_mean"] for r in step_records(tmp_path / "whole")]


def test_the_engine_counts_grpo_steps_and_schedules_over_updates(tmp_path, monkeypatch):
    """With mu = 3 updates per step, the engine's step moves once per three updates (so the
    config's step counts are GRPO steps, unconverted) while the learning rate follows the
    schedule over updates, warmup and length times mu."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = section_config("grpo", {"num_iterations": 3, "max_steps": 10, "warmup_steps": 2, "lr": 1.0,
                                  "wandb_mode": "disabled"})
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=257, seq_len=16))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randint(0, 257, (2, 16))
    loss = lambda m, batch: (m(batch, batch, loss_reduction="sum")[1], batch.numel())  # noqa: E731
    steps, lrs = [], []
    with setup_run("grpo", cfg, out=tmp_path, identity={}, wandb_config={}, updates_per_step=3) as run:
        for _ in range(7):
            lrs.append(run.schedule_lr())
            train_step(run, model, optimizer, [x], loss, lr=lrs[-1])
            steps.append(run.step)
        assert (run.step, run.updates) == (2, 7)
        skip_step(run)
        assert (run.step, run.updates) == (3, 10)
        run.set_step(2)
        assert (run.step, run.updates) == (2, 6)
    assert steps == [0, 0, 1, 1, 1, 2, 2]
    assert lrs == [lr_at(u, lr=1.0, warmup=6, max_steps=30, min_lr_ratio=cfg["min_lr_ratio"]) for u in range(7)]


def test_step_prompts_are_distinct_and_seeded():
    a = step_prompts(50, 8, seed=1, step=3)
    assert len(set(a)) == 8 and a == step_prompts(50, 8, seed=1, step=3)
    assert a != step_prompts(50, 8, seed=1, step=4) and a != step_prompts(50, 8, seed=2, step=3)


@pytest.mark.parametrize("config, key", [({"parallel": "ddp"}, "grpo.parallel"), ({"nproc": 2}, "grpo.nproc"),
                                         ({"group_size": 1}, "grpo.group_size"),
                                         ({"loss_type": "ppo"}, "grpo.loss_type")])
def test_config_refuses_what_the_stage_does_not_support(config, key):
    with pytest.raises(ConfigError, match=key):
        section_config("grpo", config)

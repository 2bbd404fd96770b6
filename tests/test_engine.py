"""The training engine: one optimizer step's normalisation, the run lock, config fragments.

The model is the real `nano` GPT; the losses are real masked token cross-entropies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from pipeline.config import ConfigError, load_schema, resume_safe_keys, section_config, validate_config
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS, BPETokenizer
from pipeline.train.engine import check_tokenizer, setup_run, train_step, trajectory_config
from pipeline.train.lifecycle import LOCK_NAME, RunLock, RunLocked


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def masked_loss(model, batch):
    """Sum of the token losses where the target is not -1, and how many there are (SFT's loss)."""
    x, y = batch
    return model(x, y, loss_reduction="sum")[1], (y != -1).sum()


def one_update(tmp_path, name, micro_batches):
    """The weight change of one SGD(lr=1) step through train_step, i.e. minus the gradient it used."""
    cfg = section_config("pretrain", {"grad_clip": 0, "wandb_mode": "disabled"})
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=257, seq_len=16))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with setup_run("sft", cfg, out=tmp_path / name, identity={"test": name}, wandb_config={}) as run:
        result = train_step(run, model, optimizer, micro_batches, masked_loss, lr=1.0)
    return [b - p.detach() for b, p in zip(before, model.parameters())], result


def test_accumulation_gives_the_gradient_of_the_whole_global_batch(tmp_path):
    """Loss only on unmasked targets, normalised by the trained tokens of the whole global batch:
    one batch of 4 and the same 4 sequences as micro batches of 1, 1 and 2 give the same
    gradient within 1e-6, and it is the gradient of (sum of losses / trained tokens)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 257, (4, 16), generator=g)
    y = torch.randint(0, 257, (4, 16), generator=g)
    y[0, :14] = -1  # the micro batches train on very different numbers of tokens: 2, 16, 16 + 11
    y[3, 5:] = -1
    whole, r_whole = one_update(tmp_path, "whole", [(x, y)])
    split, r_split = one_update(tmp_path, "split", [(x[:1], y[:1]), (x[1:2], y[1:2]), (x[2:], y[2:])])
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert r_whole.weight == r_split.weight == 2 + 16 + 16 + 5
    assert r_whole.loss == pytest.approx(r_split.loss, abs=1e-6)

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_size("nano", vocab_size=257, seq_len=16))
    loss, count = masked_loss(model, (x, y))
    (loss / count).backward()
    for a, p in zip(whole, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=0)

    # a mean of per-micro-batch means would differ: the test can tell them apart
    model.zero_grad()
    means = [masked_loss(model, (x[i:j], y[i:j])) for i, j in ((0, 1), (1, 2), (2, 4))]
    (sum(s / c for s, c in means) / 3).backward()
    assert max((a - p.grad).abs().max().item() for a, p in zip(whole, model.parameters())) > 1e-4


def test_a_global_batch_with_nothing_to_train_is_an_error(tmp_path):
    x = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="sft step 1: the global batch has nothing to train on"):
        one_update(tmp_path, "empty", [(x, torch.full_like(x, -1))])


def test_one_trainer_per_folder_and_a_dead_holder_holds_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.train.lifecycle import RunLock; "
                               "RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(300)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
        cfg = section_config("pretrain", {"wandb_mode": "disabled"})
        with pytest.raises(RunLocked, match=LOCK_NAME):
            setup_run("pretrain", cfg, out=tmp_path, identity={}, wandb_config={})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(tmp_path)  # the kernel released the dead holder's lock
    lock.release()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the refused run put its handlers back


def test_a_trainer_is_asked_to_stop_when_its_parent_dies(tmp_path):
    """A parent that starts the trainer (as torchrun's agent does, in a new session) and is then
    SIGKILLed: the trainer gets SIGHUP (PR_SET_PDEATHSIG; the getppid watch requests the same)."""
    marker = tmp_path / "stopped"
    child = ("import sys, time; from pipeline.train.lifecycle import StopSignals, watch_parent\n"
             "signals = StopSignals(); watch_parent(signals); print('ready', flush=True)\n"
             "while not signals.requested: time.sleep(0.05)\n"
             f"open({str(marker)!r}, 'w').write(signals.requested)\n")
    parent = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True, stdout=sys.stdout)\n"
              "sys.exit(p.wait())\n")  # a child that fails ends the parent, and the test
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "ready", "the child failed to start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.read_text() == "SIGHUP"


# --- config ----------------------------------------------------------------------------------------------

def test_shared_fragments_are_merged_into_the_section_schema():
    schema = load_schema()["properties"]["pretrain"]
    assert "fragments" not in schema
    for key in ("lr", "nproc", "nan_patience", "checkpoint_every", "wandb_mode", "seq_len"):
        assert "description" in schema["properties"][key] and "default" in schema["properties"][key]
    with pytest.raises(ConfigError, match="config key 'pretrain.nan_patience'"):
        section_config("pretrain", {"nan_patience": 0})


def test_resume_safe_keys_come_from_the_schema():
    """A checkpoint resumes across a change of cadence, placement or sampling keys, never of one
    that moves the weights; GRPO's top_p samples its rollouts, so there it moves the weights."""
    for stage in ("pretrain", "sft", "grpo"):
        safe = resume_safe_keys(stage)
        assert {"eval_every", "checkpoint_every", "keep", "log_every", "nproc", "compile", "samples"} <= safe
        assert not {"lr", "seed", "max_steps", "warmup_steps", "micro_batch", "weight_decay"} & safe
        cfg = section_config(stage, {})
        assert trajectory_config(stage, {**cfg, "eval_every": 7}) == trajectory_config(stage, cfg)
        assert trajectory_config(stage, {**cfg, "lr": 1.0}) != trajectory_config(stage, cfg)
    assert "top_p" in resume_safe_keys("sft") and "top_p" not in resume_safe_keys("grpo")


def test_a_tokenizer_that_is_not_the_models_is_refused_with_one_message(tmp_path, stories):
    tokenizer = BPETokenizer.train(stories[:20], 300, special_tokens=CHAT_SPECIAL_TOKENS)
    meta = {"vocab_size": tokenizer.n_vocab, "eos_id": tokenizer.eos_id}
    paths = {"tokenizer_path": tmp_path / "tokenizer.json", "model_path": tmp_path / "final.pt"}
    check_tokenizer(tokenizer, meta, **paths, special_tokens=CHAT_SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=r"tokenizer\.json: vocab 300 and eos id \d+; .*final\.pt was pretrained "
                                         r"with vocab 301 .*: not its tokenizer"):
        check_tokenizer(tokenizer, {**meta, "vocab_size": 301}, **paths)
    with pytest.raises(ValueError, match="eos id 7: not its tokenizer"):
        check_tokenizer(tokenizer, {**meta, "eos_id": 7}, **paths)
    plain = BPETokenizer.train(stories[:20], 300)
    with pytest.raises(ValueError, match=r"special tokens \['<\|assistant_end\|>'\] missing .*: not its tokenizer"):
        check_tokenizer(plain, {"vocab_size": plain.n_vocab, "eos_id": plain.eos_id}, **paths,
                        special_tokens=[ASSISTANT_END])


@pytest.mark.parametrize("pretrain", [
    {"global_batch_tokens": 200, "micro_batch": 4, "seq_len": 32},
    {"global_batch_tokens": 8192, "micro_batch": 16, "seq_len": 256, "nproc": 3, "parallel": "ddp"},
])
def test_a_global_batch_that_does_not_divide_fails_at_validation(pretrain):
    with pytest.raises(ConfigError, match="config key 'pretrain.global_batch_tokens'.*nproc"):
        validate_config({"pretrain": pretrain})

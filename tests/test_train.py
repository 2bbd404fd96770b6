"""Pretraining: schedule, data order, resume, checkpoints, watchdog, parity over DDP and FSDP2.

The data is the bundled TinyStories sample as bytes (ids 0-255, EOS 256), written as token shards
the way the tokenize stage writes them, so nothing here needs ../shared or a trained tokenizer.
The model is `nano` (2 layers, width 32) on 32-token sequences. Runs are in-process (parallel
none) except the DDP/FSDP ones, which go through torchrun like the Snakemake rule.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RESOURCES, ROOT
from pipeline.artifacts import sha256_file, verify, write_manifest
from pipeline.config import ConfigError, section_config
from pipeline.model.gpt import load_final
from pipeline.token_shards import TokenWindows, read_tokens_manifest, split_shards, write_shard
from pipeline.train.checkpoint import IdentityMismatch
from pipeline.train.data import TrainLoader, unigram_entropy, val_batches
from pipeline.train.engine import lr_at
from pipeline.train.lifecycle import LOCK_NAME, RunLock
from pipeline.train.pretrain import train
from pipeline.train.watchdog import OK, RESTORE, SKIP, TrainingDiverged, Watchdog

VOCAB, EOS = 257, 256
TEST_CONFIG = dict(seq_len=32, micro_batch=4, global_batch_tokens=256, max_steps=8, lr=0.01, warmup_steps=2,
                   eval_every=4, eval_tokens=1024, checkpoint_every=2, keep=2, samples=1, sample_tokens=8,
                   peak_flops=1e12, wandb_mode="disabled")  # 2 accumulation steps in one process
REFERENCE_LOSSES = ROOT / "tests" / "assets" / "losses" / "nano_cpu.txt"


@pytest.fixture(autouse=True)
def no_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def byte_tokens(tmp_path_factory) -> Path:
    """tokens/ with manifest.json, train/ (two shards) and val/, from TinyStories as bytes."""
    out = tmp_path_factory.mktemp("tokens")
    text = gzip.open(RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz", "rt", encoding="utf-8").read()
    docs = [list(d.strip().encode("utf-8")) + [EOS] for d in text.split("<|endoftext|>") if d.strip()]
    write_shard(out / "val" / "part-0.bin", docs[:40], VOCAB)
    write_shard(out / "train" / "part-0.bin", docs[40:190], VOCAB)
    write_shard(out / "train" / "part-1.bin", docs[190:340], VOCAB)
    write_manifest(out / "manifest.json", stage="tokens", config={}, inputs=[],
                   outputs={p: None for p in sorted(out.rglob("*.[bi][id][nx]"))}, metrics={"vocab_size": VOCAB, "eos_id": EOS})
    return out


def run(tokens: Path, out: Path, stop_at: int | None = None, inject_nan_at=(), **overrides) -> dict:
    cfg = section_config("pretrain", {**TEST_CONFIG, **overrides})
    return train(cfg, data=tokens, out=out, size="nano", stop_at=stop_at, inject_nan_at=inject_nan_at)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if r.get("loss") is not None and "event" not in r]


def events(out: Path, kind: str) -> list[dict]:
    return [r for r in records(out) if r.get("event") == kind]


@pytest.fixture(scope="session")
def reference_run(byte_tokens, tmp_path_factory) -> Path:
    """One uninterrupted 8-step run, the baseline the other runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        run(byte_tokens, out)
    return out


# --- schedule and data -------------------------------------------------------------------------------

def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    schedule = dict(lr=1.0, warmup=4, max_steps=20, min_lr_ratio=0.1)
    lrs = [lr_at(s, **schedule) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[11] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 15)))


def small_windows(tmp_path: Path, n_tokens: int = 100, seq_len: int = 9) -> TokenWindows:
    write_shard(tmp_path / "a.bin", [list(range(n_tokens))], VOCAB)
    return TokenWindows([tmp_path / "a.bin"], VOCAB, seq_len)


def test_windows_overlap_by_one_token_and_stay_inside_a_shard(tmp_path):
    windows = small_windows(tmp_path)
    assert len(windows) == 11  # (100 - 1) // 9
    assert windows[0].tolist() == list(range(10))
    assert windows[1][0] == windows[0][-1] == 9  # the last target is the next window's first input
    assert windows[10][-1] == 99


def test_one_process_with_accumulation_reads_the_same_batch_as_two_ranks(byte_tokens):
    windows = TokenWindows(split_shards(byte_tokens, "train"), VOCAB, 32)
    single = TrainLoader(windows, 4, rank=0, world_size=1, seed=3)
    one = torch.cat([single.next_batch(torch.device("cpu"))[0] for _ in range(2)])
    ranks = [TrainLoader(windows, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    two = torch.cat([loader.next_batch(torch.device("cpu"))[0] for loader in ranks])
    assert torch.equal(one, two)
    assert single.position == ranks[0].position == ranks[1].position == 8


def test_loader_position_resumes_exactly_and_each_epoch_visits_every_window_once(tmp_path):
    windows = small_windows(tmp_path)
    loader = TrainLoader(windows, 4, rank=0, world_size=1, seed=7)
    seen = [loader.next_batch(torch.device("cpu"))[0][:, 0] for _ in range(11)]  # 44 windows = 4 epochs
    firsts = torch.cat(seen).tolist()
    for epoch in range(4):
        assert sorted(firsts[epoch * 11:(epoch + 1) * 11]) == [9 * i for i in range(11)]
    assert firsts[:11] != firsts[11:22]  # a fresh order per epoch
    resumed = TrainLoader(windows, 4, rank=0, world_size=1, seed=7)
    resumed.load_state_dict({"position": 20, "seed": 7})
    assert resumed.next_batch(torch.device("cpu"))[0][:, 0].tolist() == firsts[20:24]


def test_val_batches_share_the_same_windows_out_over_ranks(byte_tokens):
    windows = TokenWindows(split_shards(byte_tokens, "val"), VOCAB, 32)
    single = np.concatenate(list(val_batches(windows, 2048, 2, rank=0, world_size=1)))
    per_rank = [list(val_batches(windows, 2048, 2, rank=r, world_size=2)) for r in range(2)]
    interleaved = np.concatenate([b for pair in zip(*per_rank) for b in pair])
    assert np.array_equal(single, interleaved) and len(single) == 2048 // 32
    with pytest.raises(ValueError, match="pretrain.eval_tokens"):
        list(val_batches(windows, 32, 4, rank=0, world_size=2))


def test_unigram_entropy_by_hand(tmp_path):
    write_shard(tmp_path / "a.bin", [[1, 1, 2, 3]], VOCAB)  # p = 1/2, 1/4, 1/4
    windows = TokenWindows([tmp_path / "a.bin"], VOCAB, 2)
    assert unigram_entropy(windows, VOCAB) == pytest.approx(1.5 * np.log(2))


def test_a_tokens_manifest_without_vocab_size_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"metrics": {"eos_id": 0}}))
    with pytest.raises(ValueError, match="metrics.vocab_size"):
        read_tokens_manifest(tmp_path)


def test_a_global_batch_that_does_not_divide_names_the_key(byte_tokens, tmp_path):
    with pytest.raises(ConfigError, match="pretrain.global_batch_tokens"):
        run(byte_tokens, tmp_path, global_batch_tokens=200)


# --- one run and its outputs ---------------------------------------------------------------------------

def test_a_run_writes_verified_outputs_and_a_loadable_model(reference_run):
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert verify(reference_run) == (4, [])  # final.pt, metrics.jsonl, loss.png, samples.md
    assert manifest["counts"]["steps"] == 8 and manifest["counts"]["tokens"] == 8 * 256
    metrics = manifest["metrics"]
    assert metrics["params"] > metrics["params_non_embedding"] > 0
    assert [r["step"] for r in records(reference_run) if "val_loss" in r] == [4, 8]
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "greedy" in (reference_run / "samples.md").read_text()
    model, final = load_final(reference_run / "final.pt")
    assert final["step"] == 8 and final["eos_id"] == EOS and model.config.vocab_size == VOCAB
    # keep=2 newest, plus the best-by-val one
    folders = sorted(p.name for p in (reference_run / "checkpoints").iterdir() if p.is_dir())
    best = json.loads((reference_run / "checkpoints" / "best.json").read_text())
    assert folders[-2:] == ["step_000006", "step_000008"] and f"step_{best['step']:06d}" in folders


def test_reference_losses(reference_run):
    """The per-step losses of the nano CPU run, against a committed file (torchtitan keeps one per
    hardware type). A deliberate change to the model, loop or data order changes them: rewrite
    the file with WETSTONE_WRITE_REFERENCE=1 pytest tests/test_train.py -k reference, and say why
    in the commit."""
    losses = step_losses(reference_run)
    if os.environ.get("WETSTONE_WRITE_REFERENCE"):
        REFERENCE_LOSSES.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE_LOSSES.write_text("".join(f"{loss!r}\n" for loss in losses))
    expected = [float(line) for line in REFERENCE_LOSSES.read_text().split()]
    assert losses == pytest.approx(expected, abs=1e-4), "the nano run's losses moved (see the docstring)"


# --- resume and checkpoints ---------------------------------------------------------------------------

def test_stopped_and_resumed_run_is_bit_identical(byte_tokens, reference_run, tmp_path):
    assert run(byte_tokens, tmp_path, stop_at=3)["finished"] is False
    assert len(step_losses(tmp_path)) == 3 and not (tmp_path / "final.pt").exists()
    assert run(byte_tokens, tmp_path)["finished"] is True
    assert step_losses(tmp_path) == step_losses(reference_run)  # exactly, not approximately
    assert [r["step"] for r in records(tmp_path) if "loss" in r] == list(range(1, 9))  # no duplicates
    assert events(tmp_path, "resume")[0]["checkpoint"] == "step_000003"


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(byte_tokens, reference_run, tmp_path, caplog):
    run(byte_tokens, tmp_path, stop_at=6)
    checkpoints = tmp_path / "checkpoints"
    shard = next((checkpoints / "step_000006").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    shard.write_bytes(bytes(data))
    half = checkpoints / ".tmp-step_000008"  # a save cut off mid-write: never loaded
    half.mkdir()
    (half / "extra.pt").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        run(byte_tokens, tmp_path)
    assert any("step_000006 is damaged" in r.getMessage() for r in caplog.records)
    assert events(tmp_path, "resume")[0]["checkpoint"] == "step_000004"
    assert step_losses(tmp_path) == step_losses(reference_run)


def test_a_changed_config_starts_fresh_and_keeps_the_old_checkpoints(byte_tokens, tmp_path, caplog):
    run(byte_tokens, tmp_path, stop_at=2)
    with caplog.at_level(logging.WARNING):
        run(byte_tokens, tmp_path, stop_at=2, lr=0.005)
    assert any("different config" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints.stale-1" / "step_000002").is_dir()
    assert not events(tmp_path, "resume")


def test_a_checkpoint_of_another_config_is_refused_naming_what_differs(byte_tokens, tmp_path):
    """A trainer of an old config, left running, wrote a checkpoint into this run's folder after
    the run claimed it: resume refuses it instead of training on from the old config's weights."""
    run(byte_tokens, tmp_path / "new", stop_at=2)
    run(byte_tokens, tmp_path / "old", stop_at=4, lr=0.005)
    (tmp_path / "old" / "checkpoints" / "step_000004").rename(tmp_path / "new" / "checkpoints" / "step_000004")
    with pytest.raises(IdentityMismatch, match=r"step_000004 .*pretrain\.lr: 0\.005 -> 0\.01"):
        run(byte_tokens, tmp_path / "new")
    assert not (tmp_path / "new" / "final.pt").exists()


def test_checkpoints_load_without_pickle(byte_tokens, tmp_path):
    """extra.pt used to be unpickled (weights_only=False): a crafted one, with meta.json updated
    to match, ran a command on resume. Our own checkpoint files are JSON now."""
    run(byte_tokens, tmp_path, stop_at=2)
    folder = tmp_path / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({"step": 2, "x": Payload()}, folder / "extra.pt")
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"]["extra.pt"] = {"sha256": sha256_file(folder / "extra.pt"), "bytes": (folder / "extra.pt").stat().st_size}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert run(byte_tokens, tmp_path)["finished"]
    assert not marker.exists()
    assert json.loads((folder.parent / "step_000008" / "extra.json").read_text())["step"] == 8
    for source in (ROOT / "pipeline").rglob("*.py"):  # and every torch.load of ours is weights_only
        for line in source.read_text().splitlines():
            assert "torch.load(" not in line or "weights_only=True" in line, (source, line)


def test_metrics_history_survives_snakemake_deleting_the_output(byte_tokens, reference_run, tmp_path):
    """Snakemake deletes the declared outputs of an incomplete job before rerunning it; the
    history lives under checkpoints/ and metrics.jsonl is assembled from it at the end."""
    run(byte_tokens, tmp_path, stop_at=5)
    (tmp_path / "metrics.jsonl").unlink()
    run(byte_tokens, tmp_path)
    assert step_losses(tmp_path) == step_losses(reference_run)
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [4, 8]


def test_a_bad_tokenizer_flag_fails_before_the_first_step(byte_tokens, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer 'results/no/tokenizer.json': no such file"):
        train(section_config("pretrain", TEST_CONFIG), data=byte_tokens, out=tmp_path, size="nano",
              tokenizer="results/no/tokenizer.json")
    assert not (tmp_path / "checkpoints").exists()


def test_samples_come_from_train_text_when_val_has_too_few_documents(byte_tokens, tmp_path):
    """The val split holds one (long) document and samples asks for 4 prompts: the openings of
    train documents make up the rest. (A prompt used to become [] and crash the finished run.)"""
    tokens = tmp_path / "tokens"
    shutil.copytree(byte_tokens / "train", tokens / "train")
    text = gzip.open(RESOURCES / "tinystories" / "TinyStories-valid.head1.5M.txt.gz", "rt", encoding="utf-8").read()
    long_doc = max(text.split("<|endoftext|>"), key=len)
    write_shard(tokens / "val" / "part-0.bin", [list(long_doc.strip().encode("utf-8")) + [EOS]], VOCAB)
    write_manifest(tokens / "manifest.json", stage="tokens", config={}, inputs=[],
                   outputs={p: None for p in sorted(tokens.rglob("*.[bi][id][nx]"))}, metrics={"vocab_size": VOCAB, "eos_id": EOS})
    assert run(tokens, tmp_path / "out", max_steps=2, eval_every=2, samples=4)["finished"]
    samples = (tmp_path / "out" / "samples.md").read_text()
    assert samples.count("## Prompt") == 4 and "(0 tokens)" not in samples.split("**greedy**")[0]
    train_opening = TokenWindows(split_shards(tokens, "train"), VOCAB, 32).shards[0][:8]
    assert " ".join(str(int(t)) for t in train_opening) in samples  # prompts show as ids without --tokenizer


def test_a_failure_to_sample_never_fails_the_run(byte_tokens, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sampler broke")
    monkeypatch.setattr("pipeline.train.pretrain.sample", broken)
    summary = run(byte_tokens, tmp_path, max_steps=2, eval_every=2)
    assert summary["finished"] and (tmp_path / "final.pt").exists()
    assert "Sampling failed: `RuntimeError: sampler broke`" in (tmp_path / "samples.md").read_text()
    assert verify(tmp_path) == (4, [])


# --- watchdog -----------------------------------------------------------------------------------------------

def test_watchdog_skips_then_restores_then_gives_up():
    dog = Watchdog("pretrain", patience=2, lr_backoff=0.5, max_restores=1)
    assert [dog.observe(f) for f in (True, False, True, False, False)] == [OK, SKIP, OK, SKIP, RESTORE]
    assert (dog.skipped, dog.restores, dog.lr_scale) == (3, 1, 0.5)
    dog.observe(False)
    with pytest.raises(TrainingDiverged, match="nan_max_restores"):
        dog.observe(False)


def test_an_injected_nan_is_skipped_and_counted(byte_tokens, reference_run, tmp_path):
    run(byte_tokens, tmp_path, inject_nan_at={3})
    skips = events(tmp_path, "nonfinite_skip")
    assert [e["step"] for e in skips] == [3] and skips[0]["loss"] is None
    losses = step_losses(tmp_path)
    assert len(losses) == 7 and all(np.isfinite(losses))
    assert losses[:2] == step_losses(reference_run)[:2]
    assert losses[2] != step_losses(reference_run)[3]  # step 4 ran on weights that missed step 3's update
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["skipped_steps"] == 1


def test_repeated_nans_restore_the_last_checkpoint_at_a_lower_lr(byte_tokens, tmp_path):
    run(byte_tokens, tmp_path, inject_nan_at={5, 6, 7}, nan_patience=3)
    assert [e["step"] for e in events(tmp_path, "nonfinite_skip")] == [5, 6, 7]
    [restore] = events(tmp_path, "restore")
    assert restore["to_step"] == 6 and restore["lr_scale"] == 0.5
    last = {r["step"]: r for r in records(tmp_path) if r.get("loss") is not None}
    assert last[8]["lr"] == pytest.approx(0.5 * lr_at(7, lr=0.01, warmup=2, max_steps=8, min_lr_ratio=0.1))
    counts = json.loads((tmp_path / "manifest.json").read_text())["counts"]
    assert (counts["skipped_steps"], counts["restores"], counts["steps"]) == (3, 1, 8)


def test_wandb_offline_writes_under_the_run_folder_only(byte_tokens, tmp_path, monkeypatch):
    """The default W&B mode (offline, ~2 s) logs into <out>/wandb, never the working directory."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.chdir(tmp_path)
    run(byte_tokens, tmp_path / "out", max_steps=2, eval_every=2, samples=0, wandb_mode="offline")
    assert os.environ["WANDB_MODE"] == "offline"  # set by the code, as the user had not
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- activation checkpointing and the profiler ----------------------------------------------------------------

def test_activation_checkpointing_recomputes_every_block_and_trains_the_same_losses(byte_tokens, reference_run,
                                                                                    tmp_path, monkeypatch):
    import pipeline.model.gpt as gpt
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(gpt, "checkpoint", counted)
    run(byte_tokens, tmp_path, activation_checkpointing=True)
    assert len(calls) == 8 * 2 * 2  # 8 steps x 2 micro batches x 2 blocks; evaluation is not checkpointed
    assert step_losses(tmp_path) == step_losses(reference_run)  # exactly: the same gradients every step


def test_profile_writes_a_perfetto_trace_of_the_steps_after_two_warm_up_steps(byte_tokens, tmp_path):
    cfg = section_config("pretrain", TEST_CONFIG)
    train(cfg, data=byte_tokens, out=tmp_path, size="nano", profile=3)
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())  # Chrome trace JSON
    names = [e.get("name", "") for e in trace["traceEvents"] if e.get("ph") == "X"]
    # training steps 3-5; torch counts the profiler's steps from 0
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3",
                                                                          "ProfilerStep#4"]
    assert "aten::scaled_dot_product_attention" in names and "Optimizer.step#AdamW.step" in names


def test_a_profile_longer_than_the_run_is_refused_before_the_first_step(byte_tokens, tmp_path):
    cfg = section_config("pretrain", TEST_CONFIG)
    with pytest.raises(ConfigError, match=r"--profile 7: needs 7 steps after 2 warm-up steps, but this invocation runs 8"):
        train(cfg, data=byte_tokens, out=tmp_path, size="nano", profile=7)
    assert not (tmp_path / "checkpoints" / "metrics.jsonl").read_text()


# --- it learns ------------------------------------------------------------------------------------------------

def test_val_loss_falls_well_below_the_unigram_entropy(byte_tokens, tmp_path):
    """300 nano steps (150k byte tokens, ~5 s): the model must learn more than byte frequencies."""
    summary = run(byte_tokens, tmp_path, max_steps=300, micro_batch=16, global_batch_tokens=512,
                  warmup_steps=10, eval_every=300, eval_tokens=8192, checkpoint_every=300, samples=0)
    metrics = summary["metrics"]
    assert metrics["final_val_loss"] < 0.9 * metrics["unigram_entropy"], metrics


def test_the_llama_shape_trains_and_exports_as_llama(byte_tokens, tmp_path):
    """architecture: llama (RMSNorm, SwiGLU, RoPE, untied head) with n_kv_head 1 (grouped-query
    attention) learns as the GPT-2 shape does, and its final.pt is a LlamaForCausalLM with our logits."""
    from pipeline.hf import hf_model

    summary = run(byte_tokens, tmp_path, architecture="llama", n_kv_head=1, max_steps=300, micro_batch=16,
                  global_batch_tokens=512, warmup_steps=10, eval_every=300, eval_tokens=8192, checkpoint_every=300,
                  samples=0)
    assert summary["metrics"]["final_val_loss"] < 0.9 * summary["metrics"]["unigram_entropy"], summary["metrics"]
    model, _ = load_final(tmp_path / "final.pt")
    config = model.config
    assert (config.norm, config.mlp, config.rope, config.tie_embeddings, config.kv_head_count) == \
        ("rmsnorm", "swiglu", True, False, 1)
    hf = hf_model(model, VOCAB, EOS, [EOS])
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[..., :VOCAB], hf(idx).logits, atol=1e-4, rtol=0)


# --- DDP and FSDP2 under torchrun ---------------------------------------------------------------------------

def torchrun(tokens: Path, out: Path, parallel: str, *extra: str) -> None:
    """The launch the Snakemake rule makes (`--` ends torchrun's options, so `--log` reaches us)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline", "--", "pretrain", "--data", str(tokens), "--out", str(out), "--size", "nano",
               "--parallel", parallel, "--config", json.dumps(TEST_CONFIG), "--log", str(out / "log"), *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_processes_match_one_process(byte_tokens, reference_run, tmp_path):
    """Same global batch of 8 sequences (1 process x 2 micro steps of 4 = 2 processes x 2 micro
    steps of 2, so gradient sync is skipped on the first micro step): the same loss curve within
    1e-5. The FSDP2 run is also stopped and resumed (sharded DCP checkpoint, 2 ranks). And FSDP2
    keeps half the parameter + gradient + optimizer bytes per rank that DDP keeps."""
    torchrun(byte_tokens, tmp_path / "ddp", "ddp", "--micro-batch", "2")
    torchrun(byte_tokens, tmp_path / "fsdp", "fsdp", "--micro-batch", "2", "--stop-at", "4")
    torchrun(byte_tokens, tmp_path / "fsdp", "fsdp", "--micro-batch", "2")
    reference = step_losses(reference_run)
    for mode in ("ddp", "fsdp"):
        assert step_losses(tmp_path / mode) == pytest.approx(reference, abs=1e-5), mode
    assert events(tmp_path / "fsdp", "resume")[0]["checkpoint"] == "step_000004"
    assert "val loss" in (tmp_path / "ddp" / "log").read_text()  # rank 0 logs to --log,
    assert "val loss" not in (tmp_path / "ddp" / "log.rank1").read_text()  # rank 1 beside it

    def bytes_per_rank(mode: str) -> list[int]:
        manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
        return [sum(r.values()) for r in manifest["metrics"]["state_bytes_per_rank"]]
    ddp, fsdp = bytes_per_rank("ddp"), bytes_per_rank("fsdp")
    assert len(ddp) == len(fsdp) == 2 and ddp[0] == ddp[1]
    assert all(0.45 < f / ddp[0] < 0.55 for f in fsdp), (ddp, fsdp)


def test_pretrain_help_documents_the_flags_without_importing_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "pretrain", "--help"],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    for flag in ("--data", "--out", "--size", "--max-steps", "--config", "--parallel", "--stop-at"):
        assert flag in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    # (modules loaded by importlib.import_module are not listed; what they import is)
    assert "pipeline.config" in imported and "torch" not in imported


# --- a killed job ------------------------------------------------------------------------------------------------

def launch(tokens: Path, out: Path, config: dict) -> subprocess.Popen:
    """The Snakemake rule's launch, in a process group of its own as a Snakemake job's shell is."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pipeline",
               "--", "pretrain", "--data", str(tokens), "--out", str(out), "--size", "nano",
               "--config", json.dumps(config), "--log", str(out.with_suffix(".log"))]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its reaper may be slow)


@pytest.mark.slow
def test_sigkill_of_the_launcher_stops_the_trainer_and_the_rerun_ends_as_if_uninterrupted(byte_tokens, tmp_path):
    """SIGKILL to the job's process group (Snakemake killed with its jobs) kills torchrun but not
    its worker, which torchrun starts in a new session: the worker must notice its parent's death
    and stop, freeing the lock; then the rerun (Snakemake having deleted the declared outputs)
    must end with the same losses and weights as a run that was never interrupted."""
    config = {**TEST_CONFIG, "max_steps": 300, "eval_every": 100, "checkpoint_every": 10, "samples": 0}
    assert launch(byte_tokens, tmp_path / "whole", config).wait(timeout=600) == 0

    out = tmp_path / "killed"
    job = launch(byte_tokens, out, config)
    history, deadline = out / "checkpoints" / "metrics.jsonl", time.monotonic() + 300
    while not (history.exists() and '"step": 12' in history.read_text()):
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.05)
    trainer = int((out / LOCK_NAME).read_text())
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    deadline = time.monotonic() + 60
    while alive(trainer):
        assert time.monotonic() < deadline, f"trainer {trainer} outlived its launcher"
        time.sleep(0.1)
    RunLock(out).release()  # free
    assert not (out / "final.pt").exists()
    last = json.loads(history.read_text().splitlines()[-1])  # it stopped cleanly, with a checkpoint
    assert (last["event"], last["reason"]) == ("stop", "SIGHUP")  # the parent's death
    assert (out / "checkpoints" / f"step_{last['step']:06d}").is_dir()
    (out / "metrics.jsonl").unlink(missing_ok=True)  # Snakemake deletes an incomplete job's outputs

    assert launch(byte_tokens, out, config).wait(timeout=600) == 0
    assert events(out, "resume") and step_losses(out) == step_losses(tmp_path / "whole")
    whole, resumed = (torch.load(p / "final.pt", weights_only=True)["model"] for p in (tmp_path / "whole", out))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_says_so_in_the_exit_code(byte_tokens, tmp_path):
    """A preempted job (SIGTERM) loses nothing: the trainer saves the step it is on and exits
    143, so Snakemake sees an interrupted job rather than a finished one without outputs."""
    config = {**TEST_CONFIG, "max_steps": 300, "checkpoint_every": 100, "samples": 0}
    job = subprocess.Popen([sys.executable, "-m", "pipeline", "pretrain", "--data", str(byte_tokens), "--out",
                            str(tmp_path), "--size", "nano", "--config", json.dumps(config)],
                           cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history, deadline = tmp_path / "checkpoints" / "metrics.jsonl", time.monotonic() + 300
    while not (history.exists() and '"step": 5' in history.read_text()):
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 128 + signal.SIGTERM
    stop = events(tmp_path, "stop")[0]
    assert stop["reason"] == "SIGTERM" and 5 <= stop["step"] < 300
    assert (tmp_path / "checkpoints" / f"step_{stop['step']:06d}").is_dir()

"""Pretraining, read top to bottom: a GPT on the tokenize stage's shards, on the training engine.

Sections in order: inputs (checked before anything trains) -> run setup (engine) -> data (token
windows, loader, batch arithmetic) -> model (size, parameter and FLOP accounting) -> wrappers and
optimizer -> resume -> the loop -> outputs. The command line is `pipeline/train/pretrain_cli.py`.

Under torchrun every rank runs all of it; only rank 0 logs, writes files and talks to W&B.
Rerunning the same command resumes from the newest good checkpoint in `<out>/checkpoints/`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.artifacts import sha256_file
from pipeline.config import ConfigError
from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.token_shards import TokenWindows, read_tokens_manifest, split_shards
from pipeline.train.data import TrainLoader, to_device, unigram_entropy, val_batches, val_rounds
from pipeline.train.engine import (build_optimizer, eval_and_checkpoint, evaluate, export, finish, log_step,
                                   profile_steps, restore, resume, setup_run, token_loss, train_step, trajectory_config)
from pipeline.train.parallel import parallelize, peak_flops, state_bytes
from pipeline.train.report import load_decoder
from pipeline.train.watchdog import OK, RESTORE

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resume: they do not change what the weights
# become (`parallel`, `nproc` and `nodes` change only the summation order). Any other change starts fresh.
PROMPT_TOKENS = 8  # a sample's prompt: the opening tokens of a document
PROMPT_SCAN_TOKENS = 200_000  # how far into each shard to look for document openings


def run_identity(cfg: dict[str, Any], size: str, tokens_manifest: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the size, the trajectory-setting config, the data."""
    return {"stage": "pretrain", "size": size, "tokens_manifest_sha256": sha256_file(tokens_manifest),
            "pretrain": trajectory_config("pretrain", cfg)}


def nan_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """token_loss made NaN: fault injection for the watchdog tests."""
    loss, count = token_loss(model, batch)
    return loss * float("nan"), count


def sample_prompts(splits: Iterable[TokenWindows], eos_id: int, n: int) -> list[list[int]]:
    """n prompts: the end-of-text token alone (how a document starts), then the opening tokens of
    documents, from the first split that has them (val), then the next (train). Never an empty
    prompt, however few documents a split holds."""
    prompts = [[eos_id]]
    for windows in splits:
        for tokens in windows.shards:
            head = np.asarray(tokens[:PROMPT_SCAN_TOKENS])
            for start in [0, *(np.flatnonzero(head == eos_id) + 1)]:
                opening = [int(t) for t in head[start:start + PROMPT_TOKENS]]
                if len(prompts) < n and opening and opening[0] != eos_id:
                    prompts.append(opening)
    return prompts[:n]


def sample(model_config: GPTConfig, state: dict[str, torch.Tensor], prompts: list[list[int]], cfg: dict[str, Any],
           device: torch.device) -> list[dict[str, list[int]]]:
    """Greedy and top-p continuations of the prompts (the inference engine, seeded by the run's
    seed), from a plain copy of the final weights."""
    model = GPT(model_config).to(device)
    model.load_state_dict(state)
    n = cfg["sample_tokens"]
    engine = Engine.for_prompts(model, prompts, n, max_batch_size=len(prompts), seed=cfg["seed"])
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n))
    top_p = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=cfg["top_p"], max_tokens=n))
    return [{"prompt": p, "greedy": g.token_ids, "top_p": t.token_ids} for p, g, t in zip(prompts, greedy, top_p)]


def train(cfg: dict[str, Any], *, data: Path, out: Path, size: str, stop_at: int | None = None,
          tokenizer: str | None = None, profile: int = 0, inject_nan_at: Iterable[int] = ()) -> dict[str, Any]:
    """Train `size` on the token shards in `data`, writing into `out`; return a summary.

    `cfg` is the validated `pretrain` config section. `stop_at` ends this invocation after that
    step's checkpoint, as a preempted job would (the schedule still runs to max_steps; rerun to go
    on). `profile` > 0 writes a torch.profiler trace of that many steps (`engine.profile_steps`).
    `inject_nan_at` makes the loss NaN at those steps, once each: fault injection for testing the
    watchdog."""
    data, out = Path(data), Path(out)

    # --- inputs: every file and flag checked before the first step -----------------------------------
    tokens_meta = read_tokens_manifest(data)
    vocab_size, eos_id = tokens_meta["vocab_size"], tokens_meta["eos_id"]
    T, B = cfg["seq_len"], cfg["micro_batch"]
    train_windows = TokenWindows(split_shards(data, "train"), vocab_size, T)
    val_windows = TokenWindows(split_shards(data, "val"), vocab_size, T)
    decode = load_decoder(tokenizer)
    model_config = GPTConfig.for_pretrain(size, cfg, vocab_size)

    with setup_run("pretrain", cfg, out=out, identity=run_identity(cfg, size, data / "manifest.json"),
                   wandb_config={"size": size, **cfg}) as run:
        d = run.d

        # --- data: loaders and batch arithmetic ------------------------------------------------------
        accum, remainder = divmod(cfg["global_batch_tokens"], B * T * d.world_size)
        if accum == 0 or remainder:
            raise ConfigError(f"config key 'pretrain.global_batch_tokens' = {cfg['global_batch_tokens']} is not a "
                              f"multiple of micro_batch x seq_len x processes = {B} x {T} x {d.world_size}")
        val_rounds(val_windows, cfg["eval_tokens"], B, d.world_size)  # fail now, not at the first eval
        loader = TrainLoader(train_windows, B, d.rank, d.world_size, cfg["seed"])

        def held_out_loss() -> float:
            """Mean token loss over the first eval_tokens of the val split, shared out over the ranks."""
            batches = val_batches(val_windows, cfg["eval_tokens"], B, d.rank, d.world_size)
            return evaluate(run, model, {"val": (to_device(batch, d.device) for batch in batches)})["all"]

        # --- model: the same initial weights on every rank -------------------------------------------
        torch.manual_seed(cfg["seed"])
        model = GPT(model_config).to(d.device)
        n_params, n_non_embedding = model.num_params(), model.num_params(non_embedding=True)
        flops_per_token = model.flops_per_token()
        peak, peak_source = peak_flops(d.device, cfg["peak_flops"], "pretrain")
        entropy = unigram_entropy(train_windows, vocab_size)
        total_tokens = cfg["max_steps"] * cfg["global_batch_tokens"]
        if d.is_main:
            log.info("model %s: %s", size, model_config.to_dict())
            log.info("parameters %s total, %s non-embedding; %.3g training FLOPs per token",
                     f"{n_params:,}", f"{n_non_embedding:,}", flops_per_token)
            log.info("data: %s train tokens (%d windows of %d), %s val tokens; vocab %d (padded %d), eos %d; "
                     "unigram entropy %.3f nats", f"{train_windows.num_tokens():,}", len(train_windows), T + 1,
                     f"{val_windows.num_tokens():,}", vocab_size, model_config.padded_vocab_size, eos_id, entropy)
            log.info("batch: %d tokens = %d micro x %d seq x %d tokens x %d processes; %d steps = %s tokens "
                     "(%.2f epochs, %.1f tokens per parameter)", cfg["global_batch_tokens"], accum, B, T,
                     d.world_size, cfg["max_steps"], f"{total_tokens:,}",
                     total_tokens / max(1, train_windows.num_tokens()), total_tokens / n_params)
            log.info("compute: %s, %s, parallel %s over %d process(es), compile %s, activation checkpointing %s; "
                     "peak %.3g FLOP/s (%s)", d.device, str(run.dtype).removeprefix("torch."), cfg["parallel"],
                     d.world_size, cfg["compile"], cfg["activation_checkpointing"], peak or float("nan"), peak_source)

        # --- wrappers, then per-rank RNG (dropout masks differ per rank; the weights are already equal) -
        model = parallelize(model, mode=cfg["parallel"], dist_info=d, compile=cfg["compile"], param_dtype=run.dtype,
                            activation_checkpointing=cfg["activation_checkpointing"])
        torch.manual_seed(cfg["seed"] + d.rank)
        random.seed(cfg["seed"] + d.rank)
        np.random.seed(cfg["seed"] + d.rank)
        optimizer = build_optimizer(model, cfg, d.device)

        # --- resume from the newest good checkpoint of this run identity --------------------------------
        state = resume(run, model, optimizer)
        if state is not None:
            loader.load_state_dict(state["data"])

        # --- the loop ------------------------------------------------------------------------------------
        nan_steps = set(inject_nan_at)
        rank_bytes: list[Any] | None = None
        last = min(cfg["max_steps"], stop_at if stop_at is not None else cfg["max_steps"])
        with profile_steps(run, profile, remaining=last - run.step) as profiled_step:
            while run.step < last:
                batches = [loader.next_batch(d.device) for _ in range(accum)]
                loss_fn = nan_loss if run.step + 1 in nan_steps else token_loss
                nan_steps.discard(run.step + 1)  # each injected once: a restored step runs clean
                result = train_step(run, model, optimizer, batches, loss_fn, lr=run.schedule_lr())
                if result.action == RESTORE:
                    restore(run, model, optimizer)
                    continue
                if result.action == OK and rank_bytes is None:
                    rank_bytes = [state_bytes(model, optimizer)]
                    if d.world_size > 1:
                        rank_bytes = [None] * d.world_size
                        dist.all_gather_object(rank_bytes, state_bytes(model, optimizer))
                log_step(run, result, step_tokens=cfg["global_batch_tokens"], flops_per_token=flops_per_token,
                         peak=peak, tokens=loader.position * T)
                if eval_and_checkpoint(run, model, optimizer, evaluate=held_out_loss,
                                       state=lambda: {"data": loader.state_dict()}, stop_at=stop_at):
                    break
                profiled_step()

        if run.step < cfg["max_steps"]:  # stopped (--stop-at or a signal): rerun to resume
            finish(run)
            return {"step": run.step, "finished": False, "signal": run.signals.requested}

        # --- outputs: final.pt, metrics.jsonl, loss.png, samples.md, manifest.json -------------------------
        vals = [r["val_loss"] for r in run.metrics.records if r.get("val_loss") is not None]
        final_val = vals[-1] if vals else float("nan")
        summary = export(
            run, model, final={"model_config": model_config.to_dict(), "vocab_size": vocab_size, "eos_id": eos_id},
            config={"size": size, **cfg}, inputs=[data / "manifest.json"],
            counts={"tokens": loader.position * T},
            metrics={"params": n_params, "params_non_embedding": n_non_embedding, "flops_per_token": flops_per_token,
                     "unigram_entropy": entropy, "final_val_loss": final_val, "peak_flops": peak,
                     "peak_flops_source": peak_source, "state_bytes_per_rank": rank_bytes},
            plot_title=f"{size}: val {final_val:.3f} vs unigram entropy {entropy:.3f} nats",
            plot_baseline=(entropy, "unigram entropy"),
            make_samples=lambda weights: sample(model_config, weights,
                                                sample_prompts([val_windows, train_windows], eos_id, cfg["samples"]),
                                                cfg, d.device),
            decode=decode, samples_header=f"`{size}` after {run.step} steps; greedy, and top-p {cfg['top_p']} "
                                          f"at temperature 1.")
        if d.is_main:
            log.info("done: val loss %.4f (unigram entropy %.4f), %d steps, %s tokens; outputs in %s",
                     final_val, entropy, run.step, f"{loader.position * T:,}", out)
        finish(run)
        return {"step": run.step, "finished": True, **summary}

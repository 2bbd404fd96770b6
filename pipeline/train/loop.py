"""The pretraining loop, read top to bottom.

`train()` runs these sections in order: compute (process group, device, dtype, seeds) -> data
(token shards, loaders, batch arithmetic) -> model (size, parameter and FLOP accounting) ->
wrappers (compile, DDP / FSDP2) -> optimizer and schedule -> resume -> the loop (accumulate, clip,
watchdog, update, log, eval, checkpoint) -> outputs (final.pt, loss.png, samples.md, manifest.json).

Under torchrun every rank runs all of it; only rank 0 logs, writes files and talks to W&B.
Rerunning the same command resumes from the newest good checkpoint in `<out>/checkpoints/`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline.artifacts import atomic_path, config_hash, sha256_file, write_manifest
from pipeline.cli import ConfigError
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.train import checkpoint
from pipeline.train.data import (TokenWindows, TrainLoader, read_tokens_manifest, split_shards, to_device,
                                 unigram_entropy, val_batches, val_rounds)
from pipeline.train.parallel import (Dist, all_reduce_mean, autocast, init_distributed, parallelize,
                                     peak_flops, peak_memory_bytes, resolve_dtype, set_grad_sync, state_bytes)
from pipeline.train.report import Metrics, finite_or_none, init_wandb, load_decoder, plot_losses, write_samples
from pipeline.train.watchdog import OK, RESTORE, Watchdog

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resume: they do not change what the weights
# become (`parallel` and `nproc` change only the summation order). Any other change starts fresh.
RESUME_FREE_KEYS = ("sizes", "nproc", "parallel", "device", "compile", "eval_every", "eval_tokens",
                    "checkpoint_every", "keep", "log_every", "peak_flops", "wandb_project", "wandb_mode",
                    "samples", "sample_tokens", "top_p")
OUTPUTS = ("final.pt", "metrics.jsonl", "loss.png", "samples.md")
PROMPT_TOKENS = 8  # a sample's prompt: the opening tokens of a val document


def lr_at(step: int, *, lr: float, warmup: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of update `step` (0-based): linear warmup to `lr` over `warmup` updates, then
    a cosine down to lr * min_lr_ratio at the last update."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - 1 - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, cfg: dict[str, Any], device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (Linear and Embedding weights): decaying biases
    and LayerNorm gains would only pull them toward zero. Fused kernel on CUDA."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                             fused=True if device.type == "cuda" else None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: TokenWindows, cfg: dict[str, Any], d: Dist, amp) -> float:
    """Mean val loss over the first eval_tokens of the val split, shared out over the ranks."""
    model.eval()
    losses = []
    for batch in val_batches(windows, cfg["eval_tokens"], cfg["micro_batch"], d.rank, d.world_size):
        x, y = to_device(batch, d.device)
        with amp:
            losses.append(model(x, y)[1])
    model.train()
    return all_reduce_mean(torch.stack(losses).mean(), d).item()


def run_identity(cfg: dict[str, Any], size: str, tokens_manifest: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the size, the trajectory-setting config, the data."""
    return {"size": size, "tokens_manifest_sha256": sha256_file(tokens_manifest),
            "pretrain": {k: v for k, v in sorted(cfg.items()) if k not in RESUME_FREE_KEYS}}


def train(cfg: dict[str, Any], *, data: Path, out: Path, size: str, stop_at: int | None = None,
          tokenizer: str | None = None, inject_nan_at: Iterable[int] = ()) -> dict[str, Any]:
    """Train `size` on the token shards in `data`, writing into `out`; return a summary.

    `cfg` is the validated `pretrain` config section. `stop_at` ends this invocation after that
    step's checkpoint, as a preempted job would (the schedule still runs to max_steps; rerun to go
    on). `inject_nan_at` makes the loss NaN at those steps, once each: fault injection for testing
    the watchdog."""
    data, out = Path(data), Path(out)
    wall_start = time.perf_counter()

    # --- compute: process group, device, dtype, seeds ----------------------------------------------
    d = init_distributed(cfg["parallel"], cfg["device"])
    dtype = resolve_dtype(cfg["dtype"], d.device)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain (fp32 runs) use TF32
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast(d.device, dtype, cfg["parallel"])
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)

    # --- data: token shards, loaders, batch arithmetic ---------------------------------------------
    tokens_meta = read_tokens_manifest(data)
    vocab_size, eos_id = tokens_meta["vocab_size"], tokens_meta["eos_id"]
    T, B = cfg["seq_len"], cfg["micro_batch"]
    train_windows = TokenWindows(split_shards(data, "train"), vocab_size, T)
    val_windows = TokenWindows(split_shards(data, "val"), vocab_size, T)
    tokens_per_micro = B * T * d.world_size
    accum, remainder = divmod(cfg["global_batch_tokens"], tokens_per_micro)
    if accum == 0 or remainder:
        raise ConfigError(f"config key 'pretrain.global_batch_tokens' = {cfg['global_batch_tokens']} is not a "
                          f"multiple of micro_batch x seq_len x processes = {B} x {T} x {d.world_size}")
    val_rounds(val_windows, cfg["eval_tokens"], B, d.world_size)  # fail now, not at the first eval
    loader = TrainLoader(train_windows, B, d.rank, d.world_size, cfg["seed"])

    # --- model: the same initial weights on every rank ----------------------------------------------
    torch.manual_seed(cfg["seed"])
    model_config = GPTConfig.from_size(size, vocab_size=vocab_size, seq_len=T, rope=cfg["rope"],
                                       dropout=cfg["dropout"])
    model = GPT(model_config).to(d.device)
    n_params, n_non_embedding = model.num_params(), model.num_params(non_embedding=True)
    flops_per_token = model.flops_per_token()
    peak, peak_source = peak_flops(d.device, cfg["peak_flops"])
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
        log.info("compute: %s, %s, parallel %s over %d process(es), compile %s; peak %.3g FLOP/s (%s)",
                 d.device, str(dtype).removeprefix("torch."), cfg["parallel"], d.world_size, cfg["compile"],
                 peak or float("nan"), peak_source)

    # --- wrappers, then per-rank RNG (dropout masks differ per rank; the weights are already equal) --
    model = parallelize(model, mode=cfg["parallel"], dist_info=d, compile=cfg["compile"], param_dtype=dtype)
    torch.manual_seed(cfg["seed"] + d.rank)
    random.seed(cfg["seed"] + d.rank)
    np.random.seed(cfg["seed"] + d.rank)

    # --- optimizer, schedule, watchdog ----------------------------------------------------------------
    optimizer = build_optimizer(model, cfg, d.device)
    watchdog = Watchdog(cfg["nan_patience"], cfg["nan_lr_backoff"], cfg["nan_max_restores"])
    schedule = dict(lr=cfg["lr"], warmup=cfg["warmup_steps"], max_steps=cfg["max_steps"],
                    min_lr_ratio=cfg["min_lr_ratio"])

    # --- resume from the newest good checkpoint of this run config ------------------------------------
    identity = run_identity(cfg, size, data / "manifest.json")
    ckpt_root = out / "checkpoints"
    checkpoint.claim(ckpt_root, identity)
    step, best_val = 0, float("inf")
    resume_from = checkpoint.find_resumable(ckpt_root)
    if resume_from is not None:
        extra = checkpoint.load(resume_from, model, optimizer, d.rank)
        step, best_val = extra["step"], extra["best_val"]
        loader.load_state_dict(extra["data"])
        watchdog.load_state_dict(extra["watchdog"])
    wandb_run = None
    if d.is_main:
        wandb_run = init_wandb(cfg["wandb_project"], cfg["wandb_mode"], out,
                               f"{out.name}-{config_hash(identity)[:8]}", {"size": size, **cfg})
    metrics = Metrics(out / "metrics.jsonl", wandb_run)
    if d.is_main:
        metrics.resume(step)
        if resume_from is not None:
            log.info("resumed from %s (step %d, data position %d)", resume_from, step, loader.position)
            metrics.write({"step": step, "event": "resume", "checkpoint": resume_from.name})

    def save_checkpoint(at: int) -> None:
        extra = {"best_val": best_val, "data": loader.state_dict(), "watchdog": watchdog.state_dict(),
                 "config": identity}
        best = checkpoint.best_step(ckpt_root) if d.is_main else None
        checkpoint.save(ckpt_root, at, model, optimizer, extra, keep=cfg["keep"],
                        protect={best} if best is not None else set())

    # --- the loop ---------------------------------------------------------------------------------------
    nan_steps = set(inject_nan_at)
    rank_bytes: list[Any] | None = None
    first_step = step
    while step < cfg["max_steps"] and (stop_at is None or step < stop_at):
        step += 1
        t0 = time.perf_counter()
        lr = lr_at(step - 1, **schedule) * watchdog.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr

        # forward and backward over the micro batches; gradients sync on the last one only
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = loader.next_batch(d.device)
            with set_grad_sync(model, cfg["parallel"], sync=micro == accum - 1):
                with amp:
                    _, loss = model(x, y)
                if step in nan_steps and micro == 0:
                    loss = loss * float("nan")  # fault injection (tests)
                (loss / accum).backward()
            loss_sum += loss.detach()
        nan_steps.discard(step)
        loss_value = all_reduce_mean(loss_sum / accum, d).item()
        # the total norm before clipping; an FSDP norm is a DTensor, the full value is the same on all ranks
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"] or float("inf"))
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()

        # the watchdog: every rank sees the same all-reduced loss and norm, so all decide alike
        action = watchdog.observe(math.isfinite(loss_value) and math.isfinite(grad_norm))
        if action == OK:
            optimizer.step()
            if rank_bytes is None:
                rank_bytes = [state_bytes(model, optimizer)]
                if d.world_size > 1:
                    rank_bytes = [None] * d.world_size
                    dist.all_gather_object(rank_bytes, state_bytes(model, optimizer))
        optimizer.zero_grad(set_to_none=True)
        if action != OK:
            if d.is_main:
                log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row, %d total)",
                            step, loss_value, grad_norm, watchdog.in_a_row or watchdog.patience, watchdog.skipped)
                metrics.write({"step": step, "event": "nonfinite_skip", "loss": finite_or_none(loss_value),
                               "grad_norm": finite_or_none(grad_norm), "skipped_total": watchdog.skipped})
        if action == RESTORE:
            folder = checkpoint.find_resumable(ckpt_root)
            if folder is None:
                raise RuntimeError(f"step {step}: {cfg['nan_patience']} non-finite steps in a row and no "
                                   f"checkpoint to restore yet; lower pretrain.lr or warm up longer")
            # weights, optimizer and step come back; the data position does not, so the batches
            # that blew up are not replayed
            position, dog = loader.position, watchdog.state_dict()
            extra = checkpoint.load(folder, model, optimizer, d.rank)
            loader.position = position
            watchdog.load_state_dict(dog)
            if d.is_main:
                log.warning("watchdog: restored %s (step %d); learning rate now x%.3g",
                            folder, extra["step"], watchdog.lr_scale)
                metrics.write({"step": step, "event": "restore", "checkpoint": folder.name,
                               "to_step": extra["step"], "lr_scale": watchdog.lr_scale,
                               "restores": watchdog.restores})
            step = extra["step"]
            continue

        # one metrics record per step; a log line every log_every
        dt = time.perf_counter() - t0
        tokens_per_s = cfg["global_batch_tokens"] / dt
        mfu = flops_per_token * tokens_per_s / (peak * d.world_size) if peak else None
        if d.is_main:
            metrics.write({"step": step, "loss": finite_or_none(loss_value), "lr": lr,
                           "grad_norm": finite_or_none(grad_norm), "tokens": loader.position * T,
                           "tokens_per_s": tokens_per_s, "mfu": mfu, "dt_s": dt,
                           "peak_mem_bytes": peak_memory_bytes(d.device)})
            if step % cfg["log_every"] == 0 or step == cfg["max_steps"]:
                eta = (cfg["max_steps"] - step) * dt
                log.info("step %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f tok/s | mfu %s | eta %dm%02ds",
                         step, cfg["max_steps"], loss_value, lr, grad_norm, tokens_per_s,
                         f"{100 * mfu:.1f}%" if mfu is not None else "n/a", eta // 60, eta % 60)

        # evaluation, then the checkpoint: periodic, last, at stop_at, and whenever val improves
        improved = False
        if step % cfg["eval_every"] == 0 or step == cfg["max_steps"]:
            val_loss = evaluate(model, val_windows, cfg, d, amp)
            improved = val_loss < best_val
            best_val = min(best_val, val_loss)
            if d.is_main:
                log.info("step %d | val loss %.4f%s", step, val_loss, " (best)" if improved else "")
                metrics.write({"step": step, "val_loss": val_loss})
        if improved or step % cfg["checkpoint_every"] == 0 or step in (cfg["max_steps"], stop_at):
            save_checkpoint(step)
            if improved:
                checkpoint.mark_best(ckpt_root, step, best_val)

    summary = {"step": step, "finished": step >= cfg["max_steps"]}
    if not summary["finished"]:
        if d.is_main:
            log.info("stopped at step %d of %d (stop_at); rerun the same command to resume", step, cfg["max_steps"])
            metrics.rewrite()
        _shutdown(d, wandb_run)
        return summary

    # --- outputs: final.pt, loss.png, samples.md, manifest.json -----------------------------------------
    # the full (unsharded) weights, gathered onto rank 0's CPU
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if d.is_main:
        records = metrics.records
        steps = [r for r in records if r.get("loss") is not None and "event" not in r]
        vals = [r for r in records if r.get("val_loss") is not None]
        final_val = vals[-1]["val_loss"] if vals else float("nan")
        with atomic_path(out / "final.pt") as tmp:
            torch.save({"model_config": model_config.to_dict(), "model": full_state, "step": step,
                        "vocab_size": vocab_size, "eos_id": eos_id}, tmp)
        plot_losses(records, out / "loss.png", entropy,
                    f"{size}: val {final_val:.3f} vs unigram entropy {entropy:.3f} nats")
        samples = sample(model_config, full_state, val_windows, eos_id, cfg, d.device)
        decode = load_decoder(tokenizer)
        write_samples(out / "samples.md", samples, decode,
                      f"`{size}` after {step} steps; greedy, and top-p {cfg['top_p']} at temperature 1.")
        for s in samples[:2]:
            log.info("sample (greedy): %s", decode(s["greedy"]) if decode else s["greedy"])
        metrics.rewrite()
        timed = [r for r in steps if r["step"] > first_step + 1] or steps  # the first step warms up
        counts = {"steps": step, "tokens": loader.position * T, "skipped_steps": watchdog.skipped,
                  "restores": watchdog.restores, "world_size": d.world_size}
        summary_metrics = {
            "params": n_params, "params_non_embedding": n_non_embedding, "flops_per_token": flops_per_token,
            "unigram_entropy": entropy, "final_val_loss": final_val, "best_val_loss": best_val,
            "final_train_loss": steps[-1]["loss"] if steps else None,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
            "mfu": float(np.median([r["mfu"] for r in timed])) if timed and peak else None,
            "peak_flops": peak, "peak_flops_source": peak_source,
            "peak_mem_bytes": max((r["peak_mem_bytes"] for r in steps), default=None),
            "state_bytes_per_rank": rank_bytes, "wall_s_this_invocation": time.perf_counter() - wall_start,
            "device": str(d.device), "dtype": str(dtype).removeprefix("torch."),
        }
        write_manifest(out / "manifest.json", stage="pretrain", config={"size": size, **cfg},
                       inputs=[data / "manifest.json"],
                       outputs={out / name: (len(records) if name == "metrics.jsonl" else None) for name in OUTPUTS},
                       counts=counts, metrics=summary_metrics)
        log.info("done: val loss %.4f (unigram entropy %.4f), %d steps, %s tokens; outputs in %s",
                 final_val, entropy, step, f"{counts['tokens']:,}", out)
        summary.update(counts=counts, metrics=summary_metrics)
    _shutdown(d, wandb_run)
    return summary


def sample(model_config: GPTConfig, state: dict[str, torch.Tensor], val_windows: TokenWindows, eos_id: int,
           cfg: dict[str, Any], device: torch.device) -> list[dict[str, list[int]]]:
    """Greedy and top-p continuations of a few prompts, from a plain copy of the final weights:
    the end-of-text token alone (how a document starts), then the openings of val documents."""
    model = GPT(model_config).to(device)
    model.load_state_dict(state)
    model.eval()
    tokens = val_windows.shards[0]
    starts = [0] + [int(i) + 1 for i in np.flatnonzero(np.asarray(tokens[:200_000]) == eos_id)]
    prompts = [[eos_id]] + [list(map(int, tokens[s:s + PROMPT_TOKENS])) for s in starts[:max(0, cfg["samples"] - 1)]]
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    out = []
    for prompt in prompts[:cfg["samples"]]:
        idx = torch.tensor([prompt], device=device)
        greedy = model.generate(idx, cfg["sample_tokens"])
        top_p = model.generate(idx, cfg["sample_tokens"], temperature=1.0, top_p=cfg["top_p"], generator=generator)
        out.append({"prompt": prompt, "greedy": greedy[0, len(prompt):].tolist(),
                    "top_p": top_p[0, len(prompt):].tolist()})
    return out


def _shutdown(d: Dist, wandb_run: Any) -> None:
    if wandb_run is not None:
        wandb_run.finish()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

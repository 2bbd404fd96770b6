"""The training engine: what pretraining, SFT and GRPO share, each piece written once.

A stage is a short script on these pieces, in this order:

    run = setup_run("sft", cfg, out=out, identity=...)       # process group, dtype, lock, W&B, metrics
    model = parallelize(...); optimizer = build_optimizer(model, cfg, run.d.device)
    state = resume(run, model, optimizer)                     # the stage's own state, or None
    while run.step < cfg["max_steps"]:
        result = train_step(run, model, optimizer, micro_batches, loss_fn, lr=...)
        if result.action == RESTORE: restore(run, model, optimizer); continue
        log_step(run, result, ...)
        if eval_and_checkpoint(run, model, optimizer, ...): break   # True: stop now (signal, --stop-at)
    export(run, model, ...)                                    # final.pt, metrics.jsonl, plot, samples, manifest
    finish(run)

The one normalisation rule: `loss_fn(model, batch) -> (loss_sum, weight)` returns a micro batch's
*sum* of losses and what that sum counts (tokens, completions, ...). Each sum is backpropagated
as is; then the weights are summed over every micro batch of every rank and the gradients scaled
so that the update is d(sum of all losses) / (total weight) over the whole global batch. So
neither gradient accumulation nor the number of processes changes the gradient (not a mean of
per-micro-batch means, which weighs a micro batch with few trained tokens like a full one).

Config keys in errors are named `<stage>.<key>` (`sft.lr`, not `pretrain.lr`). Steps are the stage's own:
a step is `updates_per_step` optimizer updates (GRPO's num_iterations updates on one rollout batch, one
elsewhere), so step counts in the config (max_steps, warmup, cadences) and in checkpoints, metrics and
`--stop-at` mean the same thing; the learning-rate schedule alone runs over updates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline.artifacts import atomic_path, atomic_write_text, config_hash, write_manifest
from pipeline.config import ConfigError, resume_safe_keys
from pipeline.train import checkpoint
from pipeline.train.lifecycle import RunLock, StopSignals, watch_parent
from pipeline.train.parallel import (Dist, all_reduce_sum, autocast, init_distributed, peak_memory_bytes, resolve_dtype,
                                     set_grad_sync)
from pipeline.train.report import Metrics, finite_or_none, init_wandb, plot_losses, write_samples
from pipeline.train.watchdog import OK, Watchdog

log = logging.getLogger(__name__)

OUTPUTS = ("final.pt", "metrics.jsonl", "loss.png", "samples.md")


# --- schedule and optimizer ------------------------------------------------------------------------

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
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                             fused=True if device.type == "cuda" else None)


# --- the run ------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One invocation of a training stage: where it runs, where it writes, how far it is."""
    stage: str  # the config section: `pretrain`, `sft`, `grpo`
    cfg: dict[str, Any]
    d: Dist
    dtype: torch.dtype
    amp: Any  # the forward's autocast context (reusable)
    out: Path
    identity: dict[str, Any]  # what a checkpoint must match to be resumed
    watchdog: Watchdog
    metrics: Metrics
    wandb_run: Any
    lock: RunLock | None  # rank 0 only
    signals: StopSignals
    step: int = 0  # steps done, in the stage's unit
    updates_per_step: int = 1
    updates: int = 0  # optimizer updates done: the learning-rate schedule's position
    best_val: float = float("inf")
    first_step: int = 0  # the step this invocation started from (its first step warms up)
    started: float = field(default_factory=time.perf_counter)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock and put back the signal handlers, however the run ended (a run in a
        longer-lived process, e.g. tests, must leave both as it found them)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.signals.restore()

    def schedule_lr(self) -> float:
        """The learning rate of the next update: the schedule, over updates, times the watchdog's backoff."""
        cfg, k = self.cfg, self.updates_per_step
        return lr_at(self.updates, lr=cfg["lr"], warmup=cfg["warmup_steps"] * k, max_steps=cfg["max_steps"] * k,
                     min_lr_ratio=cfg["min_lr_ratio"]) * self.watchdog.lr_scale

    def set_step(self, step: int) -> None:
        """Go to the start of `step` (a checkpoint's), where its updates begin."""
        self.step, self.updates = step, step * self.updates_per_step


def trajectory_config(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage's config that a checkpoint must match to be resumed: every key but those
    its schema marks `resume_safe` (cadences, placement, samples)."""
    safe = resume_safe_keys(stage)
    return {key: value for key, value in sorted(cfg.items()) if key not in safe}


def check_tokenizer(tokenizer: Any, meta: dict[str, Any], *, tokenizer_path: Path, model_path: Path,
                    special_tokens: Sequence[str] = ()) -> None:
    """The tokenizer must be the one the model in `model_path` (its final.pt `meta`) was trained
    with: the same vocabulary size and end-of-text id, and each of `special_tokens` inside the
    model's embedding (the chat tokens are reserved before pretraining, never added after)."""
    vocab_size, eos_id = meta["vocab_size"], meta["eos_id"]
    outside = [s for s in special_tokens if not 0 <= tokenizer.special_tokens.get(s, -1) < vocab_size]
    if tokenizer.n_vocab != vocab_size or tokenizer.eos_id != eos_id or outside:
        raise ValueError(f"{tokenizer_path}: vocab {tokenizer.n_vocab} and eos id {tokenizer.eos_id}"
                         + (f", special tokens {outside} missing or past the embedding" if outside else "")
                         + f"; {model_path} was pretrained with vocab {vocab_size} and eos id {eos_id}: "
                           "not its tokenizer")


def setup_run(stage: str, cfg: dict[str, Any], *, out: Path, identity: dict[str, Any],
              wandb_config: dict[str, Any], updates_per_step: int = 1) -> Run:
    """Everything before the model: stops on SIGTERM/SIGINT and when its parent dies, joins the
    process group, picks dtype and autocast, takes the output folder's lock (rank 0), claims the
    checkpoint folder for `identity`, opens the metrics history and W&B."""
    signals = StopSignals()
    watch_parent(signals)
    d = init_distributed(cfg["parallel"], cfg["device"], stage)
    dtype = resolve_dtype(cfg["dtype"], d.device)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that remain (fp32 runs) use TF32
        torch.backends.cudnn.allow_tf32 = True
    out = Path(out)
    lock = None
    try:
        lock = RunLock(out) if d.is_main else None  # one trainer per folder; a dead one holds nothing
        checkpoint.claim(out / "checkpoints", identity)
        wandb_run = None
        if d.is_main:
            wandb_run = init_wandb(cfg["wandb_project"], cfg["wandb_mode"], out,
                                   f"{out.name}-{config_hash(identity)[:8]}", wandb_config)
    except BaseException:
        if lock is not None:
            lock.release()
        signals.restore()
        raise
    watchdog = Watchdog(stage, cfg["nan_patience"], cfg["nan_lr_backoff"], cfg["nan_max_restores"])
    return Run(stage, cfg, d, dtype, autocast(d.device, dtype, cfg["parallel"]), out, identity, watchdog,
               Metrics(out / "checkpoints" / "metrics.jsonl", wandb_run), wandb_run, lock, signals,
               updates_per_step=updates_per_step)


def resume(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Load the newest good checkpoint of this run identity (refusing one of another identity),
    set the run's step, best val and watchdog, trim the metrics history to that step, and return
    the stage's own state (data position, ...), or None for a fresh start."""
    folder = checkpoint.find_resumable(run.ckpt_root)
    extra = checkpoint.load(folder, model, optimizer, run.d.rank, run.identity) if folder else None
    if extra is not None:
        run.set_step(extra["step"])
        run.best_val = extra["best_val"]
        run.watchdog.load_state_dict(extra["watchdog"])
    run.first_step = run.step
    if run.d.is_main:
        run.metrics.resume(run.step)
        if extra is not None:
            log.info("resumed from %s (step %d)", folder, run.step)
            run.metrics.write({"step": run.step, "event": "resume", "checkpoint": folder.name})
    return extra["state"] if extra is not None else None


# --- one optimizer step ---------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # sum of losses / total weight, over the global batch
    grad_norm: float  # before clipping
    weight: float  # the global batch's total weight (trained tokens, completions, ...)
    action: str  # the watchdog's: OK, SKIP or RESTORE
    lr: float
    dt: float  # seconds


LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, torch.Tensor | float]]


def train_step(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Any],
               loss_fn: LossFn, *, lr: float) -> StepResult:
    """One update from this rank's `micro_batches`: forward and backward each micro batch's loss
    sum (gradient sync on the last one only), scale the gradients to sum / total weight over all
    ranks, clip, let the watchdog judge, step. A skipped or restoring step leaves the weights as
    they were; the caller handles RESTORE (see `restore`)."""
    t0 = time.perf_counter()
    d = run.d
    run.updates += 1
    if run.updates % run.updates_per_step == 0:
        run.step += 1
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(2, dtype=torch.float64, device=d.device)  # (loss sum, weight) of this rank
    for i, batch in enumerate(micro_batches):
        with set_grad_sync(model, run.cfg["parallel"], sync=i == len(micro_batches) - 1):
            with run.amp:
                loss_sum, weight = loss_fn(model, batch)
            loss_sum.backward()
        sums[0] += loss_sum.detach().double()
        sums[1] += weight
    loss_total, weight_total = all_reduce_sum(sums, d).tolist()
    if weight_total <= 0:
        raise ValueError(f"{run.stage} step {run.step}: the global batch has nothing to train on "
                         f"(total weight {weight_total})")
    # DDP and FSDP average the gradients over ranks, which is a sum / world_size: times
    # world_size / total makes it sum / total
    scale = d.world_size / weight_total
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    loss_value = loss_total / weight_total
    # the total norm before clipping; an FSDP norm is a DTensor, the full value is the same on all ranks
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg["grad_clip"] or float("inf"))
    grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()

    # the watchdog: every rank sees the same all-reduced loss and norm, so all decide alike
    action = run.watchdog.observe(math.isfinite(loss_value) and math.isfinite(grad_norm))
    if action == OK:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if action != OK and d.is_main:
        dog = run.watchdog
        log.warning("step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row, %d total)",
                    run.step, loss_value, grad_norm, dog.in_a_row or dog.patience, dog.skipped)
        run.metrics.write({"step": run.step, "event": "nonfinite_skip", "loss": finite_or_none(loss_value),
                           "grad_norm": finite_or_none(grad_norm), "skipped_total": dog.skipped})
    return StepResult(loss_value, grad_norm, weight_total, action, lr, time.perf_counter() - t0)


def token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token cross-entropies in fp32, number of target tokens); targets -1 are ignored."""
    x, y = batch
    _, loss = model(x, y, loss_reduction="sum")
    return loss, (y != -1).sum()


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module,
             parts: dict[str, Iterable[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, float]:
    """Mean loss per target token of each part's held-out batches and of all of them together
    (`all`), summed over every rank's share of the batches."""
    model.eval()
    sums = torch.zeros(len(parts), 2, dtype=torch.float64, device=run.d.device)
    for k, batches in enumerate(parts.values()):
        for batch in batches:
            with run.amp:
                loss, count = token_loss(model, batch)
            sums[k] += torch.stack([loss.double(), count.double()])
    model.train()
    sums = all_reduce_sum(sums, run.d)
    total = sums.sum(dim=0)
    return {**{name: (s[0] / s[1]).item() for name, s in zip(parts, sums)}, "all": (total[0] / total[1]).item()}


def skip_step(run: Run) -> None:
    """A step with nothing to train on (GRPO: every completion masked out): it counts, and the
    schedule moves past its updates, but the weights stay as they are."""
    run.updates += run.updates_per_step
    run.step += 1


def restore(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The watchdog's RESTORE: weights, optimizer, RNG and step come back from the newest good
    checkpoint; the watchdog's state (its lower lr) and the stage's data position do not, so the
    batches that blew up are not replayed."""
    folder = checkpoint.find_resumable(run.ckpt_root)
    if folder is None:
        raise RuntimeError(f"step {run.step}: {run.watchdog.patience} non-finite steps in a row and no "
                           f"checkpoint to restore yet; lower {run.stage}.lr or warm up longer")
    extra = checkpoint.load(folder, model, optimizer, run.d.rank, run.identity)
    if run.d.is_main:
        log.warning("watchdog: restored %s (step %d); learning rate now x%.3g",
                    folder, extra["step"], run.watchdog.lr_scale)
        run.metrics.write({"step": run.step, "event": "restore", "checkpoint": folder.name,
                           "to_step": extra["step"], "lr_scale": run.watchdog.lr_scale,
                           "restores": run.watchdog.restores})
    run.set_step(extra["step"])


def log_step(run: Run, result: StepResult, *, step_tokens: int, flops_per_token: float, peak: float | None,
             **extra: Any) -> None:
    """One metrics record per step (with the stage's `extra` fields), and a log line every
    log_every. `step_tokens`: tokens this step processed over all ranks (for tokens/s and MFU)."""
    if not run.d.is_main:
        return
    tokens_per_s = step_tokens / result.dt
    mfu = flops_per_token * tokens_per_s / (peak * run.d.world_size) if peak else None
    run.metrics.write({"step": run.step, "loss": finite_or_none(result.loss), "lr": result.lr,
                       "grad_norm": finite_or_none(result.grad_norm), "tokens_per_s": tokens_per_s, "mfu": mfu,
                       "dt_s": result.dt, "peak_mem_bytes": peak_memory_bytes(run.d.device), **extra})
    max_steps = run.cfg["max_steps"]
    if run.step % run.cfg["log_every"] == 0 or run.step == max_steps:
        eta = (max_steps - run.step) * result.dt
        log.info("step %d/%d | loss %.4f | lr %.2e | norm %.3f | %.0f tok/s | mfu %s | eta %dm%02ds",
                 run.step, max_steps, result.loss, result.lr, result.grad_norm, tokens_per_s,
                 f"{100 * mfu:.1f}%" if mfu is not None else "n/a", eta // 60, eta % 60)


@contextmanager
def profile_steps(run: Run, steps: int, remaining: int) -> Iterator[Callable[[], None]]:
    """`--profile N`: a torch.profiler trace (CPU, and CUDA kernels on a GPU) of N steps after two
    warm-up steps (the first compiles and allocates, the second starts the profiler), written to
    <out>/profile/trace_rank<rank>.json: Chrome trace JSON, which Perfetto (ui.perfetto.dev) opens.
    Yields the function the loop calls after each step; N = 0 profiles nothing. `remaining`: the
    steps this invocation will run (fewer than N + 2 is refused: the trace would be cut short)."""
    if steps < 0:
        raise ConfigError(f"--profile {steps}: the number of steps to profile cannot be negative")
    if steps == 0:
        yield lambda: None
        return
    if steps + 2 > remaining:
        raise ConfigError(f"--profile {steps}: needs {steps} steps after 2 warm-up steps, but this invocation "
                          f"runs {remaining} (raise {run.stage}.max_steps or --stop-at, or profile fewer)")
    from torch.profiler import ProfilerActivity, profile, schedule

    path = run.out / "profile" / f"trace_rank{run.d.rank}.json"

    def write(prof: profile) -> None:
        with atomic_path(path) as tmp:
            prof.export_chrome_trace(str(tmp))
        log.info("profile of steps %d-%d: %s (open it in ui.perfetto.dev)", run.step - steps + 1, run.step, path)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.d.device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=write) as prof:
        yield prof.step


# --- evaluation, checkpoints, stopping ----------------------------------------------------------------

def stop_requested(run: Run) -> bool:
    """Whether any rank was asked to stop (a signal, or its parent died): all ranks stop at the
    same step."""
    flag = torch.tensor([1.0 if run.signals.requested else 0.0], device=run.d.device)
    return all_reduce_sum(flag, run.d).item() > 0


def save_checkpoint(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """The checkpoint of run.step: model, optimizer, RNG, the run identity and `state` (the
    stage's own, JSON-able: data position, ...)."""
    extra = {"identity": run.identity, "best_val": run.best_val, "watchdog": run.watchdog.state_dict(),
             "state": state}
    best = checkpoint.best_step(run.ckpt_root) if run.d.is_main else None
    checkpoint.save(run.ckpt_root, run.step, model, optimizer, extra, keep=run.cfg["keep"],
                    protect={best} if best is not None else set())


def eval_and_checkpoint(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                        evaluate: Callable[[], float] | None, state: Callable[[], dict[str, Any]],
                        stop_at: int | None = None) -> bool:
    """After a step: evaluate every eval_every steps and at the last; checkpoint every
    checkpoint_every steps, at the last, at `stop_at`, on a stop signal and whenever val improves.
    Returns True when this invocation must stop now (a signal or `stop_at`)."""
    cfg, step = run.cfg, run.step
    last = step >= cfg["max_steps"]
    stopping = not last and (step == stop_at or stop_requested(run))
    improved = False
    if evaluate is not None and (step % cfg["eval_every"] == 0 or last):
        val_loss = evaluate()
        improved = val_loss < run.best_val
        run.best_val = min(run.best_val, val_loss)
        if run.d.is_main:
            log.info("step %d | val loss %.4f%s", step, val_loss, " (best)" if improved else "")
            run.metrics.write({"step": step, "val_loss": val_loss})
    if improved or last or stopping or step % cfg["checkpoint_every"] == 0:
        save_checkpoint(run, model, optimizer, state())
        if improved:
            checkpoint.mark_best(run.ckpt_root, step, run.best_val)
    if stopping and run.d.is_main:
        why = run.signals.requested or "--stop-at"
        log.info("stopped at step %d of %d (%s); rerun the same command to resume", step, cfg["max_steps"], why)
        run.metrics.write({"step": step, "event": "stop", "reason": why})
    return stopping


# --- the outputs ------------------------------------------------------------------------------------------

def step_summary(run: Run) -> dict[str, Any]:
    """Manifest metrics every stage reports: last train loss, median tokens/s and MFU (this
    invocation's steps after its first, which warms up), peak memory, wall time."""
    steps = [r for r in run.metrics.records if r.get("loss") is not None and "event" not in r]
    timed = [r for r in steps if r["step"] > run.first_step + 1] or steps
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"final_train_loss": steps[-1]["loss"] if steps else None,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in timed])) if timed else None,
            "mfu": float(np.median(mfus)) if mfus else None,
            "peak_mem_bytes": max((r["peak_mem_bytes"] for r in steps), default=None),
            "wall_s_this_invocation": time.perf_counter() - run.started,
            "device": str(run.d.device), "dtype": str(run.dtype).removeprefix("torch.")}


def write_samples_safely(path: Path, make_samples: Callable[[], list[dict[str, Any]]],
                         decode: Callable[[list[int]], str] | None, header: str) -> None:
    """samples.md, which can never fail a finished run: a failure to sample is logged and
    samples.md says what went wrong instead."""
    try:
        samples = make_samples()
        write_samples(path, samples, decode, header)
        for s in samples[:2]:
            log.info("sample (greedy): %s", decode(s["greedy"]) if decode else s["greedy"])
    except Exception as e:  # noqa: BLE001 - the weights are trained and saved; samples are a look at them
        log.exception("sampling failed; samples.md says so")
        atomic_write_text(path, f"# Samples\n\n{header}\n\nSampling failed: `{type(e).__name__}: {e}` "
                                f"(see the log). The trained weights in final.pt are not affected.\n")


def export(run: Run, model: torch.nn.Module, *, final: dict[str, Any], config: dict[str, Any], inputs: list[Path],
           counts: dict[str, Any], metrics: dict[str, Any], plot_title: str,
           plot_baseline: tuple[float, str] | None, plot_labels: dict[str, str] | None = None,
           make_samples: Callable[[dict[str, torch.Tensor]], list[dict[str, Any]]],
           decode: Callable[[list[int]], str] | None, samples_header: str,
           extra_outputs: Sequence[str] = ()) -> dict[str, Any]:
    """The stage's outputs in `out`: final.pt (the full, unsharded weights on CPU plus `final`,
    e.g. model_config, vocab_size, eos_id; loads with torch.load(weights_only=True)),
    metrics.jsonl (the whole history), loss.png (axes named by `plot_labels`, `plot_losses`'s
    loss_label and val_label; cross-entropy by default), samples.md and manifest.json, which also names
    `extra_outputs` (files the stage wrote into `out` before, e.g. its own plots). Every rank calls
    this (gathering FSDP shards is collective); rank 0 writes. Returns the manifest metrics."""
    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.d.is_main:
        return {}
    out = run.out
    with atomic_path(out / "final.pt") as tmp:
        torch.save({**final, "model": full_state, "step": run.updates}, tmp)  # the updates the weights had
    run.metrics.export(out / "metrics.jsonl")
    plot_losses(run.metrics.records, out / "loss.png", plot_title, plot_baseline, **(plot_labels or {}))
    write_samples_safely(out / "samples.md", lambda: make_samples(full_state), decode, samples_header)
    summary = {**metrics, **step_summary(run), "best_val_loss": run.best_val}
    counts = {"steps": run.step, "updates": run.updates, "skipped_steps": run.watchdog.skipped,
              "restores": run.watchdog.restores,
              "world_size": run.d.world_size, **counts}
    write_manifest(out / "manifest.json", stage=run.stage, config=config,
                   inputs=inputs,
                   outputs={out / name: (len(run.metrics.records) if name == "metrics.jsonl" else None)
                            for name in (*OUTPUTS, *extra_outputs)},
                   counts=counts, metrics=summary)
    return {"counts": counts, "metrics": summary}


def finish(run: Run) -> None:
    """End a run that finished or stopped: the metrics history also into metrics.jsonl (a stopped
    run's so far), W&B closed, process group down. (`Run.close`, on leaving `with`, releases the
    lock.)"""
    if run.d.is_main:
        run.metrics.export(run.out / "metrics.jsonl")
    if run.wandb_run is not None:
        run.wandb_run.finish()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

"""GRPO, the stage, read top to bottom: the SFT model trained on a verifiable task's rewards, on
the training engine. The algorithm's pieces are in `pipeline/train/rl.py`; the command line is
`pipeline/train/grpo_cli.py`.

Sections in order: inputs (the SFT model, its tokenizer, the task's prompts; all checked before
anything trains) -> run setup (engine) -> model, reference, optimizer -> resume -> the loop ->
outputs (held-out accuracy of the input and the trained model, final.pt, metrics, plots, samples).

A GRPO step is one rollout batch (prompts_per_step prompts x group_size completions) followed by
num_iterations (mu) optimizer updates on it: the engine's step unit (`updates_per_step`), so
`max_steps`, `warmup_steps`, the cadences, checkpoints and `--stop-at` all count GRPO steps, and
checkpoints fall on rollout-batch boundaries only. Rollouts run on the inference
engine (`pipeline.inference.Engine`, continuous batching over a paged KV cache). A step's prompts
and each completion's sampling generator are seeded by (seed, step, prompt, completion): resuming
at a step boundary replays exactly what an uninterrupted run does, with no RNG state to save.

One process only (`parallel: none`): the engine decodes each sequence for as long as it needs, so a
sharded (FSDP) model could not gather in step across ranks; DDP would work with the unwrapped
module for rollouts and a rank's share of the prompts, but is not built or tested yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import check_inputs, sha256_file
from pipeline.config import ConfigError
from pipeline.figures import pyplot, save_figure
from pipeline.model.gpt import GPT, GPTConfig, load_final
from pipeline.stats import fmt
from pipeline.tasks import Example, get_task, held_out_items, held_out_record
from pipeline.tasks.evaluate import held_out_accuracy, held_out_metrics, held_out_sentence
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import ASSISTANT_END
from pipeline.tokenizer.chat import render_prompt
from pipeline.train.engine import (build_optimizer, check_tokenizer, eval_and_checkpoint, export, finish, log_step,
                                   restore, resume, setup_run, skip_step, train_step, trajectory_config)
from pipeline.train.parallel import parallelize, peak_flops
from pipeline.train.rl import (PolicyLoss, Rollouts, batch_logprobs, equal_reward_groups, group_advantages, loss_mask,
                               micro_batches, mixed_seed, sample_completions, score_completions, set_old_logprobs)
from pipeline.train.watchdog import RESTORE

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resume: they do not change what the weights become.
PLOTTED = (("reward_mean", "reward (mean; band: mean std within the batch)"), ("accuracy", "task accuracy"),
           ("kl", "KL to the reference (k3)"), ("clip_frac", "clip fraction"), ("entropy", "entropy (nats/token)"),
           ("completion_tokens", "completion length (tokens)"), ("zero_adv_groups", "groups with equal rewards"),
           ("rollout_tokens_per_s", "rollout tokens/s"))


def run_identity(cfg: dict[str, Any], tasks_config: dict[str, Any], model: Path, tokenizer: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the input model, the tokenizer, the tasks and
    the trajectory-setting config."""
    return {"stage": "grpo", "model_sha256": sha256_file(model), "tokenizer_sha256": sha256_file(tokenizer),
            "tasks": tasks_config, "grpo": trajectory_config("grpo", cfg)}


def step_prompts(n: int, count: int, seed: int, step: int) -> list[int]:
    """Indices of the `count` train prompts of GRPO step `step` (0-based): distinct within a step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mixed_seed(seed, step)))[:count].tolist()


def fitting_prompts(tokenizer: BPETokenizer, examples: Sequence[Example], seq_len: int,
                    max_completion_tokens: int) -> tuple[list[tuple[list[int], Example]], int]:
    """(prompt ids, example) of the examples whose prompt leaves room for a whole completion in
    the context (see `sample_completions`), and how many were dropped as too long."""
    rendered = [(render_prompt(tokenizer, e.prompt), e) for e in examples]
    kept = [(ids, e) for ids, e in rendered if len(ids) + max_completion_tokens <= seq_len]
    return kept, len(rendered) - len(kept)


@contextmanager
def one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread for token-by-token sampling on CPU: a decode step's forward (one token
    for each of the P x G rows of the tiny model) is too small to split, and threads that wait on
    each other lose badly on a busy machine with 2 shared cores."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rollout(model: GPT, prompts: Sequence[Sequence[int]], cfg: dict[str, Any], stop: int, step: int,
            group_size: int | None = None, temperature: float | None = None) -> Rollouts:
    """G completions of each prompt, completion j of prompt i sampled with its own generator seeded
    by (seed, step, i, j), so the draws are a function of the step alone (a resumed run replays them)."""
    with one_thread_on_cpu(model.wte.weight.device):
        return sample_completions(model, prompts, group_size or cfg["group_size"], cfg["max_completion_tokens"],
                                  cfg["temperature"] if temperature is None else temperature, cfg["top_k"],
                                  cfg["top_p"], stop, seed=(cfg["seed"], step))


def completion_texts(tokenizer: BPETokenizer, rollouts: Rollouts, stop: int) -> list[str]:
    """Each completion's text: its sampled tokens without the stop token."""
    return [tokenizer.decode([t for t in ids.tolist() if t != stop][:int(m.sum())])
            for ids, m in zip(rollouts.ids, rollouts.mask)]


def plot_rewards(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per logged rollout statistic against GRPO step; a statistic that is 0 at every
    step (KL with beta 0, the clip fraction with one update per batch) is named, not drawn."""
    plt = pyplot()

    steps = {r["grpo_step"]: r for r in records if "reward_mean" in r}  # a restored step: its last run
    xs = sorted(steps)
    drawn = [(key, label) for key, label in PLOTTED if any(steps[s][key] for s in xs)]
    zero = [label for key, label in PLOTTED if (key, label) not in drawn]
    cols = min(4, max(1, len(drawn)))
    rows = max(1, -(-len(drawn) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows + 0.4), sharex=True, squeeze=False)
    for ax in axes.flat[len(drawn):]:
        ax.axis("off")
    for ax, (key, label) in zip(axes.flat, drawn):
        ys = np.array([steps[s][key] for s in xs], dtype=float)
        ax.plot(xs, ys, lw=1.2)
        if key == "reward_mean":
            sd = np.array([steps[s]["reward_std"] for s in xs], dtype=float)
            ax.fill_between(xs, ys - sd, ys + sd, alpha=0.2)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("GRPO step (rollout batch)")
    fig.suptitle(title + (f"\n0 at every step, not drawn: {', '.join(zero)}" if zero else ""), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def train(cfg: dict[str, Any], *, model_path: Path, tokenizer_path: Path, out: Path, tasks_config: dict[str, Any],
          stop_at: int | None = None) -> dict[str, Any]:
    """GRPO on `cfg["task"]` from the model in `model_path` (SFT's final.pt), writing into `out`;
    return a summary. `cfg` is the validated `grpo` section, `tasks_config` the `tasks` one.
    `stop_at` (a GRPO step) ends this invocation after that step's checkpoint, as a preempted job would."""
    model_path, tokenizer_path, out = Path(model_path), Path(tokenizer_path), Path(out)
    if cfg["parallel"] != "none":
        raise ConfigError(f"config key 'grpo.parallel' = {cfg['parallel']!r}: GRPO runs in one process "
                          "(parallel: none); see pipeline/train/grpo.py")
    mu, P, G, L = cfg["num_iterations"], cfg["prompts_per_step"], cfg["group_size"], cfg["max_completion_tokens"]

    # --- inputs: the model, its tokenizer, the task's prompts; checked before the first step -----------
    check_inputs(model_path, tokenizer_path)  # against the manifests of the stages that wrote them
    policy, meta = load_final(model_path)
    model_config = GPTConfig(**meta["model_config"])
    tokenizer = BPETokenizer.load(tokenizer_path)
    check_tokenizer(tokenizer, meta, tokenizer_path=tokenizer_path, model_path=model_path,
                    special_tokens=[ASSISTANT_END])
    stop = tokenizer.special_tokens[ASSISTANT_END]
    task = get_task(cfg["task"], tasks_config)
    train_prompts, dropped = fitting_prompts(tokenizer, task.examples("train"), model_config.seq_len, L)
    if len(train_prompts) < P:
        raise ValueError(f"task {task.name}: {len(train_prompts)} train prompts fit the context with "
                         f"max_completion_tokens {L} ({dropped} dropped); grpo.prompts_per_step is {P}")
    held_out = held_out_items(task)  # the fixed items eval scores too; samples.md shows the first ones
    eval_n = min(cfg["eval_examples"], len(held_out))
    accuracy_record = held_out_record(task, cfg["accuracy_examples"]) if cfg["accuracy_examples"] != 0 else None

    with setup_run("grpo", cfg, out=out,
                   identity=run_identity(cfg, tasks_config, model_path, tokenizer_path),
                   wandb_config={"model": str(model_path), **cfg}, updates_per_step=mu) as run:
        d = run.d
        flops_per_token = policy.flops_per_token()
        peak, peak_source = peak_flops(d.device, cfg["peak_flops"], "grpo")
        if d.is_main:
            log.info("model %s: %s, %s parameters, step %d", model_path, model_config.to_dict(),
                     f"{policy.num_params():,}", meta["step"])
            log.info("task %s: %d train prompts (%d too long for %d completion tokens dropped), %d held out",
                     task.name, len(train_prompts), dropped, L, len(held_out))
            log.info("step: %d prompts x %d completions, %d update(s) of micro batches of %d; %d steps; "
                     "loss %s, advantages scaled by %s, beta %g; compute %s, %s", P, G, mu, cfg["micro_batch"],
                     cfg["max_steps"], cfg["loss_type"], cfg["advantage_scale"], cfg["beta"], d.device,
                     str(run.dtype).removeprefix("torch."))

        # --- model, frozen reference (only with a KL term), optimizer ---------------------------------------
        policy = policy.to(d.device).train()
        model = parallelize(policy, mode="none", dist_info=d, compile=cfg["compile"], param_dtype=run.dtype)
        reference = load_final(model_path, d.device)[0].requires_grad_(False) if cfg["beta"] > 0 else None
        optimizer = build_optimizer(model, cfg, d.device)
        loss_fn = PolicyLoss(loss_type=cfg["loss_type"], eps_low=cfg["eps_low"], eps_high=cfg["eps_high"],
                             beta=cfg["beta"], max_completion_tokens=L)

        # --- resume at a rollout-batch boundary -------------------------------------------------------------
        resume(run, model, optimizer)

        def evaluate() -> float:  # the engine keeps the best checkpoint by this "loss": the error rate
            accuracy = held_out_accuracy(policy, tokenizer, task, eval_n)["accuracy"]["value"]
            run.metrics.write({"step": run.step, "grpo_step": run.step, "held_out_accuracy": accuracy})
            return 1.0 - accuracy

        # --- the loop: rollouts, rewards, advantages, then mu updates ------------------------------------------
        while run.step < cfg["max_steps"] and (stop_at is None or run.step < stop_at):
            step = run.step  # the GRPO step about to run, 0-based
            t0 = time.perf_counter()
            chosen = [train_prompts[i] for i in step_prompts(len(train_prompts), P, cfg["seed"], step)]
            rollouts = rollout(policy, [p for p, _ in chosen], cfg, stop, step)
            rollout_s = time.perf_counter() - t0
            texts = completion_texts(tokenizer, rollouts, stop)
            answers = [example.answer for _, example in chosen for _ in range(G)]
            rewards, task_rewards = score_completions(task, texts, answers, (~rollouts.truncated).tolist(),
                                                      cfg["format_weight"])
            advantages = group_advantages(rewards, G, cfg["advantage_scale"])
            mask = loss_mask(rollouts, cfg["mask_truncated"])
            batches = micro_batches(rollouts, mask, advantages.to(d.device), cfg["micro_batch"])
            if reference is not None:
                ref_logp = batch_logprobs(reference, batches)
                batches = micro_batches(rollouts, mask, advantages.to(d.device), cfg["micro_batch"], ref_logp=ref_logp)
            if mu > 1:
                set_old_logprobs(policy, batches)

            if mask.sum() == 0:  # every completion truncated and masked out: no update, the step still counts
                result = None
                skip_step(run)
            for _ in range(mu if mask.sum() > 0 else 0):
                result = train_step(run, model, optimizer, batches, loss_fn, lr=run.schedule_lr())
                if result.action == RESTORE:
                    break
            if result is not None and result.action == RESTORE:
                restore(run, model, optimizer)
                continue
            lengths = rollouts.mask.sum(dim=1).float()
            rollout_stats = {
                "grpo_step": step + 1, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "accuracy": float(task_rewards.mean()), **loss_fn.stats(),
                "completion_tokens": float(lengths.mean()), "truncated_frac": float(rollouts.truncated.float().mean()),
                "zero_adv_groups": equal_reward_groups(rewards, G), "rollout_tokens_per_s": float(lengths.sum()) / rollout_s,
                "rollout_s": rollout_s}
            if result is not None:
                # tokens/s of the last update (result.dt is its time), so one pass over the batch
                log_step(run, result, step_tokens=sum(b["idx"].numel() for b in batches),
                         flops_per_token=flops_per_token, peak=peak, **rollout_stats)
            else:
                run.metrics.write({"step": run.step, "event": "all_masked", **rollout_stats})
            if d.is_main and (step + 1) % cfg["log_every"] == 0:
                log.info("grpo step %d/%d | reward %.3f | accuracy %.3f | kl %.4f | clip %.3f | len %.1f | "
                         "zero-adv groups %d/%d | rollout %.0f tok/s", step + 1, cfg["max_steps"],
                         rollout_stats["reward_mean"], rollout_stats["accuracy"], rollout_stats["kl"],
                         rollout_stats["clip_frac"], rollout_stats["completion_tokens"],
                         rollout_stats["zero_adv_groups"], P, rollout_stats["rollout_tokens_per_s"])
            if eval_and_checkpoint(run, model, optimizer, evaluate=evaluate if eval_n else None,
                                   state=lambda: {"grpo_step": run.step}, stop_at=stop_at):
                break

        if run.step < cfg["max_steps"]:  # stopped (--stop-at or a signal): rerun to resume
            finish(run)
            return {"step": run.step, "finished": False, "signal": run.signals.requested}

        # --- outputs: held-out accuracy of the input and the trained model, then the files ---------------------
        accuracy: dict[str, Any] = {}
        if accuracy_record is not None:
            n = accuracy_record["items"]
            before = held_out_accuracy(load_final(model_path, d.device)[0], tokenizer, task, n)
            after = held_out_accuracy(policy, tokenizer, task, n)
            accuracy = held_out_metrics(task.name, "grpo", before, after, accuracy_record)
            log.info("held-out %s accuracy (greedy, exact answer, %d problems): input %s -> GRPO %s (p = %.3g)",
                     task.name, n, fmt(before["accuracy"]), fmt(after["accuracy"]),
                     accuracy[f"{task.name}_comparison"]["p_value"])
        steps = [r for r in run.metrics.records if "grpo_step" in r and "reward_mean" in r]
        title = f"GRPO {out.name} on {task.name}: {cfg['loss_type']}, {P} x {G} per step"
        plot_rewards(run.metrics.records, out / "rewards.png", title)
        header = (f"`{out.name}` after {run.step} GRPO steps: held-out {task.name} prompts, answered greedily "
                  f"and sampled at temperature {cfg['temperature']} (top-p {cfg['top_p']}), up to {ASSISTANT_END}.")
        if accuracy:
            header += " " + held_out_sentence(task.name, "input", "GRPO", accuracy)

        def make_samples(weights: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
            fitting, _ = fitting_prompts(tokenizer, held_out, model_config.seq_len, cfg["sample_tokens"])
            prompts = [p for p, _ in fitting[:cfg["samples"]]]
            if not prompts:
                return []
            sample_cfg = {**cfg, "max_completion_tokens": cfg["sample_tokens"]}
            after = cfg["max_steps"]  # a step number no rollout batch used: its own draws
            greedy = rollout(policy, prompts, sample_cfg, stop, after, group_size=1, temperature=0.0)
            drawn = rollout(policy, prompts, sample_cfg, stop, after, group_size=1)
            return [{"prompt": p, "greedy": g[m].tolist(), "top_p": s[n].tolist()}
                    for p, g, m, s, n in zip(prompts, greedy.ids, greedy.mask, drawn.ids, drawn.mask)]

        summary = export(
            run, model, final={"model_config": model_config.to_dict(), "vocab_size": meta["vocab_size"],
                               "eos_id": meta["eos_id"]},
            config={"grpo": cfg, "tasks": tasks_config},
            inputs=[model_path, model_path.with_name("manifest.json"), tokenizer_path],
            counts={"grpo_steps": run.step, "rollouts": run.step * P * G,
                    "train_prompts": len(train_prompts), "dropped_too_long": dropped},
            metrics={"final_reward_mean": steps[-1]["reward_mean"] if steps else None,
                     "final_train_accuracy": steps[-1]["accuracy"] if steps else None,
                     "rollout_tokens_per_s": float(np.median([r["rollout_tokens_per_s"] for r in steps])) if steps else None,
                     "zero_adv_groups_total": sum(r["zero_adv_groups"] for r in steps),
                     "flops_per_token": flops_per_token, "peak_flops": peak, "peak_flops_source": peak_source,
                     **accuracy},
            plot_title=title, plot_baseline=None,
            plot_labels={"loss_label": f"clipped surrogate loss ({cfg['loss_type']}): -objective, not a cross-entropy",
                         "val_label": f"held-out error: 1 - greedy accuracy, first {eval_n} fixed items"},
            make_samples=make_samples,
            decode=tokenizer.decode, samples_header=header, extra_outputs=("rewards.png",))
        if d.is_main:
            log.info("done: %d GRPO steps; outputs in %s", run.step, out)
        finish(run)
        return {"step": run.step, "finished": True, **summary}

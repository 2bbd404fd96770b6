"""Supervised fine-tuning, read top to bottom: the pretrained GPT taught to answer in the chat
template, on the training engine.

Sections in order: inputs (the pretrained model, its tokenizer's chat ids checked against its
embedding, the task conversations rendered; all before anything trains) -> run setup (engine) ->
model, wrappers and optimizer -> resume -> the loop -> outputs. The command line is
`pipeline/train/sft_cli.py`.

The loss is the pretraining token loss on the assistant's tokens only (every other target is -1),
summed per micro batch and divided by the trained tokens of the whole global batch (the engine's
`train_step`). At the end the held-out arithmetic problems are answered greedily by the base and
the fine-tuned model, and both accuracies go into the manifest and samples.md.

Under torchrun every rank runs all of it; only rank 0 logs, writes files and talks to W&B.
Rerunning the same command resumes from the newest good checkpoint in `<out>/checkpoints/`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from pipeline.artifacts import check_inputs, sha256_file
from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT, GPTConfig, load_final
from pipeline.tasks import get_task
from pipeline.tasks.evaluate import greedy_accuracy, greedy_complete
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS
from pipeline.tokenizer.chat import render_prompt
from pipeline.train.engine import (Run, build_optimizer, eval_and_checkpoint, export, finish, log_step, restore,
                                   resume, setup_run, train_step)
from pipeline.train.parallel import all_reduce_sum, parallelize, peak_flops
from pipeline.train.pretrain import token_loss
from pipeline.train.sft_data import Mixture, SFTLoader, load_split, val_batches
from pipeline.train.watchdog import RESTORE

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resume: they do not change what the weights
# become (`parallel` and `nproc` change only the summation order). Any other change starts fresh.
RESUME_FREE_KEYS = ("nproc", "parallel", "device", "compile", "eval_every", "eval_examples", "checkpoint_every",
                    "keep", "log_every", "peak_flops", "wandb_project", "wandb_mode", "samples", "sample_tokens",
                    "top_p", "accuracy_examples", "max_new_tokens")
ACCURACY_TASK = "arithmetic"  # the held-out task answered greedily at the end (it has a verifier)
SAMPLE_TASKS = ("arithmetic", "instruct")  # held-out prompts shown in samples.md


def run_identity(cfg: dict[str, Any], tasks_config: dict[str, Any], base: Path, tokenizer: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the base model, the tokenizer, the tasks and
    the trajectory-setting config."""
    return {"stage": "sft", "base_sha256": sha256_file(base), "tokenizer_sha256": sha256_file(tokenizer),
            "tasks": tasks_config, "sft": {k: v for k, v in sorted(cfg.items()) if k not in RESUME_FREE_KEYS}}


def check_tokenizer(tokenizer: BPETokenizer, meta: dict[str, Any], model_path: Path, tokenizer_path: Path) -> None:
    """The tokenizer must be the model's: the same vocabulary size and end-of-text id, and the
    chat tokens inside the pretrained embedding (they were reserved at pretraining, never added)."""
    if tokenizer.n_vocab != meta["vocab_size"] or tokenizer.eos_id != meta["eos_id"]:
        raise ValueError(f"{tokenizer_path}: vocab {tokenizer.n_vocab} and eos id {tokenizer.eos_id}, but {model_path} "
                         f"was pretrained with vocab {meta['vocab_size']} and eos id {meta['eos_id']}: not its tokenizer")
    missing = [s for s in CHAT_SPECIAL_TOKENS if not 0 <= tokenizer.special_tokens.get(s, -1) < meta["vocab_size"]]
    if missing:
        raise ValueError(f"{tokenizer_path}: the chat tokens {missing} are missing or outside the model's embedding "
                         f"of {meta['vocab_size']} ids (tokenizer.special_tokens must list them before pretraining)")


@torch.no_grad()
def evaluate(run: Run, model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss per assistant token of the held-out conversations, over all ranks."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.d.device)
    for x, y in batches:
        with run.amp:
            loss, count = token_loss(model, (x, y))
        sums += torch.stack([loss.double(), count.double()])
    model.train()
    loss, count = all_reduce_sum(sums, run.d).tolist()
    return loss / count


def plain_model(model_config: GPTConfig, state: dict[str, torch.Tensor], device: torch.device) -> GPT:
    """A plain GPT (no DDP/FSDP wrapper) in eval mode with `state`, for generation on one rank."""
    model = GPT(model_config).to(device)
    model.load_state_dict(state)
    return model.eval()


def sample(model: GPT, tokenizer: BPETokenizer, prompts: list[list[int]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The greedy answer and a top-p answer (the inference engine, seeded by the run's seed) to
    each prompt, each up to <|assistant_end|>."""
    stop = tokenizer.special_tokens[ASSISTANT_END]
    greedy = greedy_complete(model, prompts, max_new_tokens=cfg["sample_tokens"], stop_id=stop, desc="samples")
    params = SamplingParams(temperature=1.0, top_p=cfg["top_p"], max_tokens=cfg["sample_tokens"], stop_token_ids=[stop])
    engine = Engine.for_prompts(model, prompts, cfg["sample_tokens"], max_batch_size=len(prompts), seed=cfg["seed"])
    drawn = engine.generate(prompts, params)
    return [{"prompt": p, "greedy": g, "top_p": t.ids_before_stop} for p, g, t in zip(prompts, greedy, drawn)]


def sample_prompts(tokenizer: BPETokenizer, tasks_config: dict[str, Any], cfg: dict[str, Any],
                   seq_len: int) -> list[list[int]]:
    """The first `samples` held-out prompts of each sample task that leave room for the answer."""
    prompts = []
    for name in SAMPLE_TASKS:
        rendered = (render_prompt(tokenizer, e.prompt) for e in get_task(name, tasks_config).examples("test"))
        prompts += [p for p in rendered if len(p) + cfg["sample_tokens"] <= seq_len][:cfg["samples"]]
    return prompts


def train(cfg: dict[str, Any], *, model_path: Path, tokenizer_path: Path, out: Path, tasks_config: dict[str, Any],
          stop_at: int | None = None) -> dict[str, Any]:
    """Fine-tune the pretrained model in `model_path` on the task mixture, writing into `out`;
    return a summary. `cfg` is the validated `sft` section, `tasks_config` the `tasks` one.
    `stop_at` ends this invocation after that step's checkpoint, as a preempted job would."""
    model_path, tokenizer_path, out = Path(model_path), Path(tokenizer_path), Path(out)

    # --- inputs: the model, its tokenizer, the conversations; checked before the first step ----------
    check_inputs(model_path, tokenizer_path)  # against the manifests of the stages that wrote them
    base, meta = load_final(model_path)
    model_config = GPTConfig(**meta["model_config"])
    tokenizer = BPETokenizer.load(tokenizer_path)
    check_tokenizer(tokenizer, meta, model_path, tokenizer_path)
    T = model_config.seq_len
    names = [name for name, weight in cfg["mixture"].items() if weight > 0]
    train_rows, dropped = load_split(tokenizer, tasks_config, names, "train", T)
    val_rows, val_dropped = load_split(tokenizer, tasks_config, names, "test", T)
    val_rows = {name: rows[:cfg["eval_examples"]] for name, rows in val_rows.items()}
    mixture = Mixture(train_rows, cfg["mixture"], cfg["seed"])
    accuracy_task = get_task(ACCURACY_TASK, tasks_config)
    accuracy_examples = accuracy_task.examples("test")[:cfg["accuracy_examples"]]

    with setup_run("sft", cfg, out=out, identity=run_identity(cfg, tasks_config, model_path, tokenizer_path),
                   wandb_config={"base": str(model_path), **cfg}) as run:
        d = run.d

        # --- data: the loader and the held-out batches ----------------------------------------------------
        pad_id = tokenizer.eos_id  # never a target (padding targets are -1) and never read by a real token
        loader = SFTLoader(mixture, cfg["global_batch"], cfg["micro_batch"], d.rank, d.world_size, pad_id)
        held_out = [row for rows in val_rows.values() for row in rows]
        eval_batches = [(x.to(d.device), y.to(d.device))
                        for x, y in val_batches(held_out, cfg["micro_batch"], d.rank, d.world_size, pad_id)]
        flops_per_token = base.flops_per_token()
        peak, peak_source = peak_flops(d.device, cfg["peak_flops"], "sft")
        if d.is_main:
            log.info("base %s: %s, %s parameters, step %d", model_path, model_config.to_dict(),
                     f"{base.num_params():,}", meta["step"])
            for name in names:
                log.info("task %s: %d train conversations (%d longer than %d tokens dropped), %d held out",
                         name, len(train_rows[name]), dropped[name], T + 1, len(val_rows[name]))
            log.info("mixture shares %s; epoch of %d conversations; %d steps x %d conversations = %.2f epochs",
                     {k: round(v, 3) for k, v in mixture.shares().items()}, mixture.epoch_size, cfg["max_steps"],
                     cfg["global_batch"], cfg["max_steps"] * cfg["global_batch"] / mixture.epoch_size)
            log.info("batch: %d conversations = %d micro batches x %d x %d processes; compute %s, %s, parallel %s",
                     cfg["global_batch"], cfg["global_batch"] // (cfg["micro_batch"] * d.world_size),
                     cfg["micro_batch"], d.world_size, d.device, str(run.dtype).removeprefix("torch."), cfg["parallel"])

        # --- model: the pretrained weights, wrapped, then a per-rank torch seed and the optimizer --------------
        model = parallelize(base.to(d.device).train(), mode=cfg["parallel"], dist_info=d, compile=cfg["compile"],
                            param_dtype=run.dtype)
        torch.manual_seed(cfg["seed"] + d.rank)  # only dropout draws here: the data order has its own generators
        optimizer = build_optimizer(model, cfg, d.device)

        # --- resume from the newest good checkpoint of this run identity ------------------------------------
        state = resume(run, model, optimizer)
        trained_tokens = 0
        if state is not None:
            loader.load_state_dict(state["data"])
            trained_tokens = state["trained_tokens"]

        # --- the loop ------------------------------------------------------------------------------------------
        while run.step < cfg["max_steps"] and (stop_at is None or run.step < stop_at):
            batches = loader.next_batches(d.device)
            result = train_step(run, model, optimizer, batches, token_loss, lr=run.schedule_lr())
            if result.action == RESTORE:
                restore(run, model, optimizer)
                continue
            trained_tokens += int(result.weight)
            step_tokens = int(all_reduce_sum(torch.tensor([float(sum(x.numel() for x, _ in batches))],
                                                          device=d.device), d).item())
            log_step(run, result, step_tokens=step_tokens, flops_per_token=flops_per_token, peak=peak,
                     trained_tokens=trained_tokens, conversations=loader.position)
            if eval_and_checkpoint(run, model, optimizer, evaluate=lambda: evaluate(run, model, eval_batches),
                                   state=lambda: {"data": loader.state_dict(), "trained_tokens": trained_tokens},
                                   stop_at=stop_at):
                break

        if run.step < cfg["max_steps"]:  # stopped (--stop-at or a signal): rerun to resume
            finish(run)
            return {"step": run.step, "finished": False, "signal": run.signals.requested}

        # --- outputs: held-out accuracy of base and SFT, then final.pt, metrics, plot, samples, manifest -------
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        accuracy: dict[str, Any] = {}
        if d.is_main and accuracy_examples:
            score = dict(max_new_tokens=cfg["max_new_tokens"])
            base_score = greedy_accuracy(load_final(model_path, d.device)[0], tokenizer, accuracy_task,
                                         accuracy_examples, **score)
            sft_score = greedy_accuracy(plain_model(model_config, full_state, d.device), tokenizer, accuracy_task,
                                        accuracy_examples, **score)
            accuracy = {f"{ACCURACY_TASK}_accuracy_base": base_score["accuracy"],
                        f"{ACCURACY_TASK}_accuracy": sft_score["accuracy"], f"{ACCURACY_TASK}_scored": sft_score["n"]}
            log.info("held-out %s accuracy (greedy, exact answer, %d problems): base %.1f%% -> SFT %.1f%%",
                     ACCURACY_TASK, sft_score["n"], 100 * base_score["accuracy"], 100 * sft_score["accuracy"])
        vals = [r["val_loss"] for r in run.metrics.records if r.get("val_loss") is not None]
        final_val = vals[-1] if vals else float("nan")
        header = (f"`{out.name}` after {run.step} SFT steps: held-out prompts, answered greedily and top-p "
                  f"{cfg['top_p']} at temperature 1, up to <|assistant_end|>.")
        if accuracy:
            header += (f" Held-out {ACCURACY_TASK} accuracy (greedy, exact answer, {accuracy[f'{ACCURACY_TASK}_scored']}"
                       f" problems): base {accuracy[f'{ACCURACY_TASK}_accuracy_base']:.1%}, "
                       f"SFT {accuracy[f'{ACCURACY_TASK}_accuracy']:.1%}.")
        summary = export(
            run, model, final={"model_config": model_config.to_dict(), "vocab_size": meta["vocab_size"],
                               "eos_id": meta["eos_id"]},
            config={"sft": cfg, "tasks": tasks_config},
            inputs=[model_path, model_path.with_name("manifest.json"), tokenizer_path],
            counts={"conversations": loader.position, "trained_tokens": trained_tokens,
                    "train_conversations": {k: len(v) for k, v in train_rows.items()}, "dropped_too_long": dropped,
                    "held_out_conversations": {k: len(v) for k, v in val_rows.items()},
                    "held_out_dropped_too_long": val_dropped},
            metrics={"final_val_loss": final_val, "mixture_shares": mixture.shares(), "flops_per_token": flops_per_token,
                     "peak_flops": peak, "peak_flops_source": peak_source, **accuracy},
            plot_title=f"SFT {out.name}: held-out assistant-token loss {final_val:.3f}", plot_baseline=None,
            make_samples=lambda weights: sample(plain_model(model_config, weights, d.device), tokenizer,
                                                sample_prompts(tokenizer, tasks_config, cfg, T), cfg),
            decode=tokenizer.decode, samples_header=header)
        if d.is_main:
            log.info("done: held-out loss %.4f, %d steps, %d conversations, %s trained tokens; outputs in %s",
                     final_val, run.step, loader.position, f"{trained_tokens:,}", out)
        finish(run)
        return {"step": run.step, "finished": True, **summary}

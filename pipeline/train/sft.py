"""Supervised fine-tuning, read top to bottom: the pretrained GPT taught to answer in the chat
template, on the training engine.

Sections in order: inputs (the pretrained model, its tokenizer's chat ids checked against its
embedding, the task conversations rendered, the replayed pretraining shards checked against the
tokens manifest; all before anything trains) -> run setup (engine) -> model, wrappers and
optimizer -> resume -> the loop -> outputs. The command line is `pipeline/train/sft_cli.py`.

The loss is the pretraining token loss on the assistant's tokens of a conversation (every other
target is -1) and on every token of a replayed window of pretraining text, summed per micro batch
and divided by the trained tokens of the whole global batch (the engine's `train_step`). At the end
the base and the fine-tuned model answer the fixed held-out arithmetic items greedily
(`held_out_accuracy`, the items and scorer eval uses), and both accuracies, with their intervals
and the paired comparison, go into the manifest and samples.md.

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
from pipeline.config import ConfigError
from pipeline.inference import Engine, SamplingParams
from pipeline.model.gpt import GPT, GPTConfig, load_final
from pipeline.stats import fmt
from pipeline.tasks import get_task, held_out_record
from pipeline.tasks.evaluate import greedy_complete, held_out_accuracy, held_out_metrics, held_out_sentence
from pipeline.token_shards import read_tokens_manifest
from pipeline.tokenizer import BPETokenizer
from pipeline.tokenizer.bpe import ASSISTANT_END, CHAT_SPECIAL_TOKENS
from pipeline.tokenizer.chat import render_prompt
from pipeline.train.engine import (build_optimizer, check_tokenizer, eval_and_checkpoint, evaluate, export, finish,
                                   log_step, restore, resume, setup_run, token_loss, train_step, trajectory_config)
from pipeline.train.parallel import all_reduce_sum, parallelize, peak_flops
from pipeline.train.sft_data import REPLAY, Mixture, ReplayRows, SFTLoader, load_split, val_batches
from pipeline.train.watchdog import RESTORE

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resume: they do not change what the weights
# become (`parallel` and `nproc` change only the summation order). Any other change starts fresh.
ACCURACY_TASK = "arithmetic"  # the held-out task answered greedily at the end (it has a verifier)
SAMPLE_TASKS = ("arithmetic", "instruct")  # held-out prompts shown in samples.md


def run_identity(cfg: dict[str, Any], tasks_config: dict[str, Any], base: Path, tokenizer: Path,
                 tokens: Path | None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the base model, the tokenizer, the tasks, the
    replayed tokens (when replay is in the mixture) and the trajectory-setting config."""
    return {"stage": "sft", "base_sha256": sha256_file(base), "tokenizer_sha256": sha256_file(tokenizer),
            "tokens_manifest_sha256": sha256_file(tokens / "manifest.json") if tokens else None,
            "tasks": tasks_config, "sft": trajectory_config("sft", cfg)}


def replay_rows(tokens: Path | None, tokenizer: BPETokenizer, tokenizer_path: Path, cfg: dict[str, Any],
                seq_len: int) -> tuple[ReplayRows, ReplayRows]:
    """Replay's rows of the train split (what it trains on) and of the val split (its held-out
    loss reads the first eval_examples, as pretraining's val loss does). The tokens must be this
    tokenizer's; each shard is checked against the tokens manifest."""
    if tokens is None:
        raise ConfigError(f"config key 'sft.mixture.{REPLAY}' = {cfg['mixture'][REPLAY]} replays pretraining text, "
                          f"but no tokens folder was given (--tokens results/<run>/tokens)")
    if cfg["replay_tokens"] > seq_len:
        raise ConfigError(f"config key 'sft.replay_tokens' = {cfg['replay_tokens']} exceeds the model's context "
                          f"of {seq_len} tokens")
    meta = read_tokens_manifest(tokens)
    if meta.get("tokenizer_sha256") != sha256_file(tokenizer_path):
        raise ValueError(f"{tokens / 'manifest.json'}: the shards were written by the tokenizer with sha256 "
                         f"{meta.get('tokenizer_sha256')}, not by {tokenizer_path}")
    if (meta["vocab_size"], meta["eos_id"]) != (tokenizer.n_vocab, tokenizer.eos_id):  # a manifest at odds with itself
        raise ValueError(f"{tokens / 'manifest.json'}: vocab {meta['vocab_size']} and eos id {meta['eos_id']}, "
                         f"but {tokenizer_path} has {tokenizer.n_vocab} and {tokenizer.eos_id}")
    return (ReplayRows(tokens, "train", meta["vocab_size"], cfg["replay_tokens"]),
            ReplayRows(tokens, "val", meta["vocab_size"], cfg["replay_tokens"]))


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
          tokens: Path | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Fine-tune the pretrained model in `model_path` on the mixture, writing into `out`; return a
    summary. `cfg` is the validated `sft` section, `tasks_config` the `tasks` one, `tokens` the
    tokenize stage's folder (read when the mixture replays pretraining text). `stop_at` ends this
    invocation after that step's checkpoint, as a preempted job would."""
    model_path, tokenizer_path, out = Path(model_path), Path(tokenizer_path), Path(out)
    tokens = Path(tokens) if tokens is not None else None

    # --- inputs: the model, its tokenizer, the conversations; checked before the first step ----------
    check_inputs(model_path, tokenizer_path)  # against the manifests of the stages that wrote them
    base, meta = load_final(model_path)
    model_config = GPTConfig(**meta["model_config"])
    tokenizer = BPETokenizer.load(tokenizer_path)
    check_tokenizer(tokenizer, meta, tokenizer_path=tokenizer_path, model_path=model_path,
                    special_tokens=CHAT_SPECIAL_TOKENS)
    T = model_config.seq_len
    names = [name for name, weight in cfg["mixture"].items() if weight > 0 and name != REPLAY]
    train_rows, dropped = load_split(tokenizer, tasks_config, names, "train", T)
    val_rows, val_dropped = load_split(tokenizer, tasks_config, names, "test", T)
    val_rows = {name: rows[:cfg["eval_examples"]] for name, rows in val_rows.items()}
    # held out in two parts: the tasks' conversations and, with replay, the val split's first windows
    held_out = {"tasks": [row for rows in val_rows.values() for row in rows]} if names else {}
    replayed = cfg["mixture"][REPLAY] > 0
    if replayed:
        train_rows[REPLAY], replay_val = replay_rows(tokens, tokenizer, tokenizer_path, cfg, T)
        held_out[REPLAY] = [replay_val[i] for i in range(min(len(replay_val), cfg["eval_examples"]))]
    elif tokens is not None:
        log.info("sft.mixture.%s is 0: %s is not read", REPLAY, tokens)
    mixture = Mixture(train_rows, cfg["mixture"], cfg["seed"])
    accuracy_task = get_task(ACCURACY_TASK, tasks_config)
    accuracy_record = held_out_record(accuracy_task, cfg["accuracy_examples"]) if cfg["accuracy_examples"] != 0 else None

    identity = run_identity(cfg, tasks_config, model_path, tokenizer_path, tokens if replayed else None)
    with setup_run("sft", cfg, out=out, identity=identity,
                   wandb_config={"base": str(model_path), **cfg}) as run:
        d = run.d

        # --- data: the loader and the held-out batches ----------------------------------------------------
        pad_id = tokenizer.eos_id  # never a target (padding targets are -1) and never read by a real token
        loader = SFTLoader(mixture, cfg["global_batch"], cfg["micro_batch"], d.rank, d.world_size, pad_id)
        eval_batches = {part: [(x.to(d.device), y.to(d.device))
                               for x, y in val_batches(rows, cfg["micro_batch"], d.rank, d.world_size, pad_id)]
                        for part, rows in held_out.items()}

        def held_out_loss() -> float:
            """The engine's val loss (every held-out row); each part's goes into the metrics too."""
            losses = evaluate(run, model, eval_batches)
            if d.is_main:
                run.metrics.write({"step": run.step, **{f"val_loss_{part}": losses[part] for part in held_out}})
            return losses["all"]
        flops_per_token = base.flops_per_token()
        peak, peak_source = peak_flops(d.device, cfg["peak_flops"], "sft")
        if d.is_main:
            log.info("base %s: %s, %s parameters, step %d", model_path, model_config.to_dict(),
                     f"{base.num_params():,}", meta["step"])
            for name in names:
                log.info("task %s: %d train conversations (%d longer than %d tokens dropped), %d held out",
                         name, len(train_rows[name]), dropped[name], T + 1, len(val_rows[name]))
            if replayed:
                log.info("replay: %d windows of %d tokens from the %s train tokens in %s, %d held out (val)",
                         len(train_rows[REPLAY]), cfg["replay_tokens"] + 1,
                         f"{train_rows[REPLAY].windows.num_tokens():,}", tokens, len(held_out[REPLAY]))
            log.info("mixture shares %s; epoch of %d rows; %d steps x %d rows = %.2f epochs",
                     {k: round(v, 3) for k, v in mixture.shares().items()}, mixture.epoch_size, cfg["max_steps"],
                     cfg["global_batch"], cfg["max_steps"] * cfg["global_batch"] / mixture.epoch_size)
            log.info("batch: %d rows = %d micro batches x %d x %d processes; compute %s, %s, parallel %s",
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
            if eval_and_checkpoint(run, model, optimizer, evaluate=held_out_loss,
                                   state=lambda: {"data": loader.state_dict(), "trained_tokens": trained_tokens},
                                   stop_at=stop_at):
                break

        if run.step < cfg["max_steps"]:  # stopped (--stop-at or a signal): rerun to resume
            finish(run)
            return {"step": run.step, "finished": False, "signal": run.signals.requested}

        # --- outputs: held-out accuracy of base and SFT, then final.pt, metrics, plot, samples, manifest -------
        full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        accuracy: dict[str, Any] = {}
        if d.is_main and accuracy_record is not None:
            n = accuracy_record["items"]
            base_score = held_out_accuracy(load_final(model_path, d.device)[0], tokenizer, accuracy_task, n)
            sft_score = held_out_accuracy(plain_model(model_config, full_state, d.device), tokenizer, accuracy_task, n)
            accuracy = held_out_metrics(ACCURACY_TASK, "sft", base_score, sft_score, accuracy_record)
            log.info("held-out %s accuracy (greedy, exact answer, %d problems): base %s -> SFT %s (p = %.3g)",
                     ACCURACY_TASK, n, fmt(base_score["accuracy"]), fmt(sft_score["accuracy"]),
                     accuracy[f"{ACCURACY_TASK}_comparison"]["p_value"])
        final_val, final_by_part = float("nan"), {}
        for record in run.metrics.records:  # the last evaluation's
            final_val = record.get("val_loss", final_val)
            final_by_part.update({part: record[key] for part in held_out if (key := f"val_loss_{part}") in record})
        header = (f"`{out.name}` after {run.step} SFT steps: held-out prompts, answered greedily and top-p "
                  f"{cfg['top_p']} at temperature 1, up to <|assistant_end|>.")
        if accuracy:
            header += " " + held_out_sentence(ACCURACY_TASK, "base", "SFT", accuracy)
        summary = export(
            run, model, final={"model_config": model_config.to_dict(), "vocab_size": meta["vocab_size"],
                               "eos_id": meta["eos_id"]},
            config={"sft": cfg, "tasks": tasks_config},
            inputs=[model_path, model_path.with_name("manifest.json"), tokenizer_path,
                    *([tokens / "manifest.json", *train_rows[REPLAY].files(), *replay_val.files()]
                      if replayed else [])],
            counts={"conversations": loader.position, "trained_tokens": trained_tokens,
                    "train_conversations": {k: len(train_rows[k]) for k in names}, "dropped_too_long": dropped,
                    "held_out_conversations": {k: len(val_rows[k]) for k in names},
                    "held_out_dropped_too_long": val_dropped,
                    **({REPLAY: {"train_windows": len(train_rows[REPLAY]), "held_out_windows": len(held_out[REPLAY])}}
                       if replayed else {})},
            metrics={"final_val_loss": final_val, "final_val_loss_by_part": final_by_part,
                     "mixture_shares": mixture.shares(), "flops_per_token": flops_per_token,
                     "peak_flops": peak, "peak_flops_source": peak_source, **accuracy},
            plot_title=f"SFT {out.name}: held-out loss per trained token {final_val:.3f}", plot_baseline=None,
            make_samples=lambda weights: sample(plain_model(model_config, weights, d.device), tokenizer,
                                                sample_prompts(tokenizer, tasks_config, cfg, T), cfg),
            decode=tokenizer.decode, samples_header=header)
        if d.is_main:
            log.info("done: held-out loss %.4f, %d steps, %d conversations, %s trained tokens; outputs in %s",
                     final_val, run.step, loader.position, f"{trained_tokens:,}", out)
        finish(run)
        return {"step": run.step, "finished": True, **summary}

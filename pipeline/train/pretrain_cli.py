"""pretrain: train a GPT on the tokenize stage's shards (one model size per run).

The command line of `pipeline/train/pretrain.py` (kept apart so that --help imports no torch).

Reads <data>/manifest.json (vocab_size, eos_id) and <data>/{train,val}/*.bin, and writes into
<out>: final.pt (the weights and model config), metrics.jsonl (one record per step, val losses,
watchdog events), loss.png, samples.md (greedy and top-p samples), manifest.json, and
checkpoints/ (rerunning the same command resumes from the newest good one; the metrics history
lives there too). One trainer per --out at a time (train.lock); SIGTERM / SIGINT stop it after
the current step with a checkpoint, and it stops likewise when its parent process dies.

One process:           python -m pipeline pretrain --data results/sample/tokens --out runs/tiny --size tiny
N processes (DDP/FSDP): python -m torch.distributed.run --standalone --nproc_per_node=N \\
                         -m pipeline -- pretrain ... --parallel fsdp
(the `--` ends torchrun's own options; without it torchrun reads --log as its --log-dir)

The settings are the `pretrain` config section (workflow/schemas/pretrain.schema.yaml), given as
--config JSON; the flags below override single keys. W&B logs offline under <out>/wandb unless
WANDB_MODE says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.train.flags import add_config_flags, exit_code, section_from_args

# the pretrain section's own flags: flag -> (config key, type, help); the shared ones are in flags.py
FLAGS: dict[str, tuple[str, type, str]] = {
    "--seq-len": ("seq_len", int, "context length in tokens"),
    "--micro-batch": ("micro_batch", int, "sequences per process per micro step"),
    "--global-batch-tokens": ("global_batch_tokens", int, "tokens per optimizer step over all processes"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="the tokens folder (manifest.json, train/, val/)")
    parser.add_argument("--out", required=True, type=Path, help="the run folder to write (and resume from)")
    parser.add_argument("--size", help="model size name (pipeline/model/gpt.py MODEL_SIZES); "
                                       "default: the first of the config's sizes")
    add_config_flags(parser, "pretrain", FLAGS)
    parser.add_argument("--tokenizer", help="decode samples with this tokenizer.json (the tokenizer stage's) "
                                            "or tiktoken encoding name; without it samples show token ids")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="write a torch.profiler trace of N steps (after 2 warm-up steps) to "
                             "<out>/profile/trace_rank<rank>.json, readable in Perfetto (ui.perfetto.dev)")


def run(args: argparse.Namespace) -> int:
    cfg = section_from_args("pretrain", args, FLAGS)
    size = args.size or cfg["sizes"][0]

    from pipeline.train.pretrain import train  # torch is imported only when a run starts, not for --help
    return exit_code(train(cfg, data=args.data, out=args.out, size=size, stop_at=args.stop_at,
                           tokenizer=args.tokenizer, profile=args.profile))

"""sft: fine-tune a pretrained GPT on task conversations (chat template, loss on assistant tokens)
mixed with replayed pretraining text (loss on every token).

The command line of `pipeline/train/sft.py` (kept apart so that --help imports no torch).

Reads --model (pretrain's final.pt) and --tokenizer (the tokenizer it was pretrained with), renders
the train conversations of the mixture's tasks (the `tasks` section: arithmetic, GSM8K,
Self-Instruct), reads the train shards of --tokens (the tokenize stage's folder, which pretraining
read) for replay, and writes into <out>: final.pt (the fine-tuned weights, loadable like pretrain's),
metrics.jsonl, loss.png (train and held-out loss per assistant token), samples.md (held-out
arithmetic and instruction prompts answered greedily, and the held-out arithmetic accuracy of the
base and the SFT model), manifest.json (counts per task, conversations dropped as too long,
accuracies), and checkpoints/ (rerunning the same command resumes from the newest good one).
One trainer per --out at a time; SIGTERM / SIGINT stop it after the current step with a
checkpoint.

One process:           python -m pipeline sft --model results/sample/pretrain/tiny/final.pt \\
                         --tokenizer results/sample/tokenizer/tokenizer.json --tokens results/sample/tokens \\
                         --out results/sample/sft/tiny
N processes (DDP/FSDP): python -m torch.distributed.run --standalone --nproc_per_node=N \\
                         -m pipeline -- sft ... --parallel fsdp

The settings are the `sft` config section (workflow/schemas/sft.schema.yaml), given as --config
JSON, and the `tasks` section as --tasks-config; the flags below override single `sft` keys. W&B
logs offline under <out>/wandb unless WANDB_MODE says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.train.flags import add_post_training_arguments, run_post_training

# the sft section's own flags: flag -> (config key, type, help); the shared ones are in flags.py
FLAGS: dict[str, tuple[str, type, str]] = {
    "--global-batch": ("global_batch", int, "conversations per optimizer step over all processes"),
    "--micro-batch": ("micro_batch", int, "conversations per process per micro step"),
    "--accuracy-examples": ("accuracy_examples", int, "the first N fixed held-out arithmetic items answered at the end (0 skips)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_post_training_arguments(parser, "sft", FLAGS, "the pretrained model (pretrain's final.pt)")
    parser.add_argument("--tokens", type=Path, help="the tokenize stage's folder the model was pretrained on "
                                                    "(its train split is replayed; needed when sft.mixture.replay > 0)")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.sft import train  # torch is imported only when a run starts, not for --help
    return run_post_training("sft", args, FLAGS, train, tokens=args.tokens)

"""grpo: reinforcement learning of the SFT model on a verifiable task (GRPO / Dr. GRPO / DAPO).

The command line of `pipeline/train/grpo.py` (kept apart so that --help imports no torch).

Reads --model (SFT's final.pt, checked against its manifest) and --tokenizer, renders the task's
train prompts with the chat template, and writes into <out>: final.pt (loadable like SFT's),
metrics.jsonl (per GRPO step: reward mean and std, accuracy, KL, clip fraction, entropy,
completion length, groups with equal rewards, rollout tokens/s; held-out accuracy at each
evaluation), loss.png, rewards.png, samples.md (held-out prompts answered greedily and sampled),
manifest.json (held-out accuracy of the input model and the trained one), and checkpoints/
(rerunning the same command resumes from the newest good one). A GRPO step is one rollout batch
and num_iterations updates on it; --max-steps and --stop-at count GRPO steps.

One process:  python -m pipeline grpo --model results/sample/sft/tiny/final.pt \\
                --tokenizer results/sample/tokenizer/tokenizer.json --out results/sample/grpo/tiny

The settings are the `grpo` config section (workflow/schemas/grpo.schema.yaml), given as --config
JSON, and the `tasks` section as --tasks-config; the flags below override single `grpo` keys.
"""

from __future__ import annotations

import argparse

from pipeline.train.flags import add_post_training_arguments, run_post_training

# the grpo section's own flags: flag -> (config key, type, help); the shared ones are in flags.py
FLAGS: dict[str, tuple[str, type, str]] = {
    "--loss-type": ("loss_type", str, "dapo | grpo | dr_grpo"),
    "--advantage-scale": ("advantage_scale", str, "group | batch | none"),
    "--prompts-per-step": ("prompts_per_step", int, "prompts per rollout batch"),
    "--group-size": ("group_size", int, "completions sampled per prompt"),
    "--beta": ("beta", float, "weight of the k3 KL to the frozen input model (0: no reference)"),
    "--accuracy-examples": ("accuracy_examples", int, "the first N fixed held-out items answered at the end (0 skips)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_post_training_arguments(parser, "grpo", FLAGS, "the model to train (SFT's final.pt)")


def run(args: argparse.Namespace) -> int:
    from pipeline.train.grpo import train  # torch is imported only when a run starts, not for --help
    return run_post_training("grpo", args, FLAGS, train)

"""Command-line flags every training stage shares (no torch here, so `--help` stays fast).

A stage's command takes its config section as `--config` JSON and single-key overrides as flags;
`add_config_flags` adds both (the shared flags plus the stage's own) and `section_from_args`
validates the result as the stage's section, so a bad value names `<stage>.<key>`.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cli import json_arg
from pipeline.config import section_config

# flag -> (config key, type, help): keys of the shared schema fragments (workflow/schemas/fragments/)
SHARED_FLAGS: dict[str, tuple[str, type, str]] = {
    "--max-steps": ("max_steps", int, "optimizer steps (the schedule's length)"),
    "--lr": ("lr", float, "peak learning rate"),
    "--parallel": ("parallel", str, "none | ddp | fsdp"),
    "--device": ("device", str, "auto | cpu | cuda"),
    "--dtype": ("dtype", str, "auto | float32 | bfloat16"),
    "--seed": ("seed", int, "seed for init, data order and sampling"),
    "--eval-every": ("eval_every", int, "steps between evaluations"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints"),
    "--wandb-mode": ("wandb_mode", str, "offline | online | disabled (WANDB_MODE wins when set)"),
}


def add_config_flags(parser: argparse.ArgumentParser, section: str,
                     stage_flags: dict[str, tuple[str, type, str]]) -> None:
    """--config, the shared flags, the stage's own flags, --compile and --stop-at."""
    parser.add_argument("--config", type=json_arg, default={},
                        help=f"the {section} config section as JSON (or @file.yaml)")
    for flag, (key, kind, text) in {**SHARED_FLAGS, **stage_flags}.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"{text} (config key {section}.{key})")
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                        help=f"torch.compile each block (config key {section}.compile)")
    parser.add_argument("--stop-at", type=int, help="stop after this step's checkpoint, as a preempted job "
                                                    "would; the schedule still runs to max_steps")


def section_from_args(section: str, args: argparse.Namespace,
                      stage_flags: dict[str, tuple[str, type, str]]) -> dict[str, Any]:
    """--config with the flags given on top, validated as `section` (defaults filled)."""
    config = dict(args.config or {})
    for key in [key for key, _, _ in {**SHARED_FLAGS, **stage_flags}.values()] + ["compile"]:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return section_config(section, config)


def exit_code(summary: dict[str, Any]) -> int:
    """0 when the run finished or stopped at --stop-at; 128 + the signal's number when a signal
    stopped it, so Snakemake and schedulers see an interrupted job, not a finished one."""
    return 128 + signal.Signals[summary["signal"]].value if summary.get("signal") else 0


def add_post_training_arguments(parser: argparse.ArgumentParser, section: str,
                                stage_flags: dict[str, tuple[str, type, str]], model_help: str) -> None:
    """The command line SFT and GRPO share: the input model, its tokenizer, the output folder, the
    stage's config flags and the `tasks` section."""
    parser.add_argument("--model", required=True, type=Path, help=model_help)
    parser.add_argument("--tokenizer", required=True, type=Path,
                        help="the tokenizer.json the model was trained with (chat special tokens included)")
    parser.add_argument("--out", required=True, type=Path, help="the run folder to write (and resume from)")
    add_config_flags(parser, section, stage_flags)
    parser.add_argument("--tasks-config", type=json_arg, default={},
                        help="the tasks config section as JSON (or @file.yaml); default: its defaults")


def run_post_training(section: str, args: argparse.Namespace, stage_flags: dict[str, tuple[str, type, str]],
                      train: Callable[..., dict[str, Any]], **inputs: Any) -> int:
    """Validate the stage's and the tasks section, run `train` (given the stage's own `inputs`
    too), and return the exit code."""
    cfg = section_from_args(section, args, stage_flags)
    tasks_config = section_config("tasks", args.tasks_config)
    return exit_code(train(cfg, model_path=args.model, tokenizer_path=args.tokenizer, out=args.out,
                           tasks_config=tasks_config, stop_at=args.stop_at, **inputs))

"""Shared command-line plumbing: logging to the rule's log file and reading a config slice."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("pipeline")


def configure_logging(log_file: str | None, verbose: bool = False) -> None:
    """Log to stderr and, when given, to `log_file` (the Snakemake rule's `log:`); uncaught
    exceptions land in both, so a failed job's log says why it failed."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    rank = os.environ.get("RANK", "0")  # set by torchrun: ranks past 0 log beside the rule's log
    if log_file and rank != "0":
        log_file = f"{log_file}.rank{rank}"
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def excepthook(kind, value, tb):
        log.critical("uncaught exception", exc_info=(kind, value, tb))

    sys.excepthook = excepthook


def json_arg(text: str) -> Any:
    """argparse type for a JSON config slice: inline JSON, or @path to a JSON/YAML file."""
    if text.startswith("@"):
        import yaml
        return yaml.safe_load(Path(text[1:]).read_text(encoding="utf-8"))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text[:80]!r}") from e

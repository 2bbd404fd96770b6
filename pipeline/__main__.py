"""`python -m pipeline <command> [args]`: one command per stage, each documented by `--help`.

Stage modules are imported only when their command runs, so `--help` of a data stage never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.cli import configure_logging

# command -> module; each module has `add_arguments(parser)` and `run(args) -> int`, and its
# docstring is the command's description.
COMMANDS: dict[str, str] = {
    "fetch": "pipeline.data.fetch",
    "ingest": "pipeline.data.ingest",
    "langid": "pipeline.data.langid",
    "quality": "pipeline.data.quality",
    "dedup": "pipeline.data.dedup",
    "data-report": "pipeline.data.report",
    "tokenizer": "pipeline.tokenizer.train_stage",
    "tokenize": "pipeline.tokenizer.tokenize_stage",
    "tokens": "pipeline.tokenizer.gather_stage",
    "pretrain": "pipeline.train.pretrain",
    "seal": "pipeline.seal",
    "verify": "pipeline.verify",
}


def usage() -> str:
    lines = ["usage: python -m pipeline <command> [--help] [args]", "", "commands:"]
    lines += [f"  {name}" for name in COMMANDS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command])
    # --log may stand anywhere, also after a sub-step (`dedup signatures ... --log x`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log", help="log file (the Snakemake rule's log:); stderr always gets a copy")
    known, rest = common.parse_known_args(rest)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {command}", parents=[common],
                                     description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    configure_logging(known.log)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

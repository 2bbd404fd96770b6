"""`python -m pipeline <command> [args]`: one command per stage, each documented by `--help`.

Stage modules are imported only when their command runs, so `--help` of a data stage never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

from pipeline.cli import configure_logging

# command -> (module, one-line summary); each module has `add_arguments(parser)` and
# `run(args) -> int`, and its docstring is the command's full description.
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("pipeline.data.fetch", "download one input file (a WET URL) atomically"),
    "ingest": ("pipeline.data.ingest", "WET file -> documents (warcio), bad records dropped with a reason"),
    "url_filter": ("pipeline.data.url_filter", "WARC file -> responses whose URL passes the block lists"),
    "extract": ("pipeline.data.extract", "WARC responses -> main text (trafilatura), drops with a reason"),
    "langid": ("pipeline.data.langid", "fastText lid.176 language ID; keep configured languages"),
    "quality": ("pipeline.data.quality", "Gopher, C4 and FineWeb quality filters"),
    "dedup": ("pipeline.data.dedup", "exact + MinHash-LSH dedup: signatures | clusters | filter"),
    "decontaminate": ("pipeline.data.decontaminate", "n-gram overlap with the eval sets; drop contaminated documents"),
    "pii": ("pipeline.data.pii", "replace e-mail and public IP addresses with placeholders"),
    "data-report": ("pipeline.data.report", "drop report (json, md, plots) of the web-data stages"),
    "tokenizer": ("pipeline.tokenizer.stage", "train our byte-level BPE; compression report"),
    "tokenize": ("pipeline.tokenizer.tokenize", "one source -> train/val token shards"),
    "tokens": ("pipeline.tokenizer.tokens", "check and gather the shards into tokens/manifest.json"),
    "pretrain": ("pipeline.train.pretrain_cli", "pretrain a GPT (run under torchrun for DDP / FSDP2)"),
    "sft": ("pipeline.train.sft_cli", "fine-tune a pretrained GPT on task conversations (chat template)"),
    "grpo": ("pipeline.train.grpo_cli", "GRPO of the SFT model on a verifiable task (group-relative rewards)"),
    "eval": ("pipeline.eval.stage", "val loss/bpb, MMLU, task pass@k of every model of a size; the table"),
    "canary": ("pipeline.eval.canary", "score a served model on eval's held-out items via its API; exit 1 below baseline"),
    "export-hf": ("pipeline.export_hf", "a final.pt as a transformers GPT2LMHeadModel folder + fast tokenizer"),
    "serve": ("pipeline.inference.serve", "OpenAI-compatible HTTP server (SSE streaming, /metrics) over the engine"),
    "inference-bench": ("pipeline.inference.bench", "serving benchmark: naive .. continuous batching, paged, speculative, HF"),
    "scaling-plan": ("pipeline.scaling.plan", "the scaling sweep's runs, tokens per run, run count and GPU-hours"),
    "scaling-fit": ("pipeline.scaling.fit", "scaling laws from the sweep: approach 3 (+ bootstrap CIs) and IsoFLOP"),
    "report-card": ("pipeline.report_card", "the run on one page (report/index.html) and its tables as HTML pages"),
    "seal": ("pipeline.seal", "merge per-shard manifests into a stage folder's manifest.json"),
    "verify": ("pipeline.verify", "re-hash every artifact under a results folder against its manifest"),
    "config-template": ("pipeline.config_template", "write config.yaml from the schemas (defaults, descriptions as comments)"),
}


def usage() -> str:
    lines = ["usage: python -m pipeline <command> [--help] [args]", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {summary}" for name, (_, summary) in COMMANDS.items()]
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
    module = importlib.import_module(COMMANDS[command][0])
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
    started = time.monotonic()
    code = int(module.run(args) or 0)
    if known.log:  # the last line of a finished job's log, so none is empty (a stage may log nothing else)
        logging.getLogger("pipeline").info("%s: exit %d after %.1f s", command, code, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Seal a stage folder: merge the per-shard job manifests into the folder's manifest.json
(`pipeline.artifacts.seal`).

Data stages run one job per WET file, each writing `<shard>.manifest.json`; sealing checks they
ran with one config, merges their counts and their metrics the way DataTrove merges per-task
stats (counters summed key by key, so e.g. langid's `languages_in` is the whole stage's mix; a
value every shard agrees on kept once), and lists every output once, so the stage folder carries
one manifest that `verify` and the drop report read.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.artifacts import seal

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the stage folder's manifest.json")
    parser.add_argument("shards", nargs="+", help="per-shard <shard>.manifest.json files")


def run(args: argparse.Namespace) -> int:
    manifest = seal(args.output, args.shards)
    log.info("sealed %s: %d shards, %d outputs", args.output, manifest["metrics"]["shards"],
             len(manifest["outputs"]))
    return 0

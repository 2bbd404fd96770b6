"""Seal a stage folder: merge the per-shard job manifests into the folder's manifest.json.

Data stages run one job per WET file, each writing `<shard>.manifest.json`; sealing checks they
ran with one config, merges their counts and their metrics the way DataTrove merges per-task
stats (counters summed key by key, so e.g. langid's `languages_in` is the whole stage's mix; a
value every shard agrees on kept once), and lists every output once, so the stage folder carries
one manifest that `verify` and the drop report read.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.artifacts import (MANIFEST_VERSION, atomic_write_json, code_version, config_hash,
                                file_entry, read_manifest)

log = logging.getLogger(__name__)


def add_numbers(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Merge one shard's counts or metrics into the total: numbers are summed (nested dicts key by
    key); a string, flag or list every shard agrees on is kept once; lists that differ (one error
    list per file) are concatenated, and strings that differ become the sorted list of values."""
    out = dict(total)
    for key, value in part.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = add_numbers(out[key], value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out[key] + value
        elif out[key] == value:
            continue
        elif isinstance(value, list):
            out[key] = out[key] + value
        else:
            seen = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = sorted({*seen, value}, key=str)
    return out


def seal(out_path: str | os.PathLike, shard_manifests: list[str | os.PathLike]) -> dict[str, Any]:
    out_path = Path(out_path)
    folder = out_path.parent.resolve()
    shards = [(Path(p), read_manifest(p)) for p in sorted(shard_manifests, key=str)]
    if not shards:
        raise ValueError(f"{out_path}: no shard manifests to seal")
    stages = {m["stage"] for _, m in shards}
    hashes = {m["config_sha256"] for _, m in shards}
    if len(stages) != 1 or len(hashes) != 1:
        raise ValueError(f"{out_path}: shard manifests disagree on stage or config "
                         f"({sorted(stages)}, {len(hashes)} config hashes): rerun the stage")
    counts: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    outputs = []
    for path, manifest in shards:
        counts = add_numbers(counts, manifest["counts"])
        metrics = add_numbers(metrics, manifest["metrics"])
        for entry in manifest["outputs"]:
            moved = dict(entry, path=os.path.relpath((path.parent / entry["path"]).resolve(), folder))
            outputs.append(moved)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stages.pop(),
        "config": shards[0][1]["config"],
        "config_sha256": config_hash(shards[0][1]["config"]),
        "code_version": code_version(),
        "inputs": [file_entry(p) for p, _ in shards],
        "outputs": sorted(outputs, key=lambda e: e["path"]),
        "counts": counts,
        "metrics": {**metrics, "shards": len(shards), "by_shard": {p.name.removesuffix(".manifest.json"): m["counts"]
                                                       for p, m in shards}},
    }
    atomic_write_json(out_path, manifest)
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the stage folder's manifest.json")
    parser.add_argument("shards", nargs="+", help="per-shard <shard>.manifest.json files")


def run(args: argparse.Namespace) -> int:
    manifest = seal(args.output, args.shards)
    log.info("sealed %s: %d shards, %d outputs", args.output, manifest["metrics"]["shards"],
             len(manifest["outputs"]))
    return 0

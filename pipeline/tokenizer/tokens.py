"""tokens: gather the per-source tokenize manifests into tokens/manifest.json.

It checks that every shard was made with the given tokenizer and that every index adds up to its
file's size, seals the manifests (summed counts, per-source counts, every output with sha256),
and adds the metrics the training stages read: `vocab_size`, `eos_id`, `dtype` and
`special_tokens` (name -> id, so SFT can check that its chat tokens match the shards').
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_write_json, check_file, read_manifest, seal, sha256_file
from pipeline.token_shards import read_shard, token_dtype
from pipeline.tokenizer.bpe import BPETokenizer

log = logging.getLogger(__name__)


def gather(output: str, source_manifests: list[str], tokenizer_path: str) -> dict[str, Any]:
    """Seal the per-source manifests into tokens/manifest.json, after checking that every shard was
    made with this tokenizer, that its bytes are those its manifest recorded and that every index
    adds up to its file's size."""
    check_file(tokenizer_path)
    tokenizer = BPETokenizer.load(tokenizer_path)
    tokenizer_sha = sha256_file(tokenizer_path)
    for path in source_manifests:
        source_manifest = read_manifest(path)
        if source_manifest["metrics"].get("tokenizer_sha256") != tokenizer_sha:
            raise ValueError(f"{path}: made with another tokenizer than {tokenizer_path}; rerun tokenize")
        for entry in source_manifest["outputs"]:
            check_file(Path(path).parent / entry["path"], path)
            if entry["path"].endswith(".bin"):
                read_shard(Path(path).parent / entry["path"], tokenizer.n_vocab)  # raises if the index disagrees
    manifest = seal(output, source_manifests)
    manifest["stage"] = "tokens"  # the gathered folder is this stage's output; each source's stays `tokenize`
    manifest["metrics"].update(vocab_size=tokenizer.n_vocab, eos_id=tokenizer.eos_id,
                               dtype=token_dtype(tokenizer.n_vocab).name, tokenizer_sha256=tokenizer_sha,
                               special_tokens=tokenizer.special_tokens)
    atomic_write_json(output, manifest)  # the sealed manifest again, now with the metrics training reads
    return manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json the shards were made with")
    parser.add_argument("--output", required=True, help="output tokens/manifest.json")
    parser.add_argument("manifests", nargs="+", help="per-source <source>.manifest.json files")


def run(args: argparse.Namespace) -> int:
    manifest = gather(args.output, args.manifests, args.tokenizer)
    log.info("gathered %d sources: %d train, %d val tokens", manifest["metrics"]["shards"],
             manifest["counts"]["train"]["tokens"], manifest["counts"]["val"]["tokens"])
    return 0

"""tokenize: turn one source's documents into training-ready token shards.

One job per source (a clean web shard or an inputs.text corpus) writes
tokens/train/<source>.bin|.idx, tokens/val/<source>.bin|.idx and tokens/<source>.manifest.json;
`python -m pipeline tokens` then gathers the manifests into tokens/manifest.json.

Every document's ids are followed by <|endoftext|>, so EOS separates documents. The split is by a
hash of the document id (see pipeline.tokenizer.sources), so it stays put when shards change;
train documents repeat or thin out by their source's weight, val documents appear once each.
Encoding runs on our tokenizer's tiktoken export (the same ids, many times faster); the first
documents of each split are also encoded with our reference `encode`, and any disagreement stops
the job.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

from tqdm import tqdm

from pipeline.artifacts import check_file, sha256_file, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.token_shards import index_path, write_shard
from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.sources import Source, copies, is_val, read_documents

log = logging.getLogger(__name__)

BATCH_DOCS = 256      # documents per tiktoken batch call
REFERENCE_CHECKS = 4  # documents per split also encoded by our reference encoder


def split_texts(source: Source, split: str, val_fraction: float, dropped: Counter | None = None) -> Iterator[str]:
    """The texts of one split, in file order. Train makes ceil(weight) passes over the source;
    pass k yields the train documents with more than k copies, so repeats are spread out."""
    if split == "val":
        yield from (text for doc_id, text in read_documents(source, dropped) if is_val(doc_id, val_fraction))
        return
    for k in range(math.ceil(source.weight)):
        for doc_id, text in read_documents(source):
            if not is_val(doc_id, val_fraction) and copies(doc_id, source.weight) > k:
                yield text


def encode_documents(texts: Iterable[str], tokenizer: BPETokenizer, engine: Any, threads: int,
                     stats: Counter) -> Iterator[list[int]]:
    """Ids of each text plus EOS, in batches on the tiktoken `engine`; counts bytes in `stats`."""
    eos, checked = tokenizer.eos_id, 0
    texts = iter(texts)
    while batch := list(islice(texts, BATCH_DOCS)):
        for text, ids in zip(batch, engine.encode_ordinary_batch(batch, num_threads=threads)):
            if checked < REFERENCE_CHECKS:
                if tokenizer.encode(text) != ids:
                    raise RuntimeError(f"tiktoken export and reference encoder disagree on a document "
                                       f"starting {text[:60]!r}: a bug, please report it")
                checked += 1
            stats["bytes"] += len(text.encode("utf-8"))
            ids.append(eos)
            yield ids


def tokenize_source(source: Source, tokenizer_path: str, *, train_out: str, val_out: str, manifest_out: str,
                    config: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    check_file(tokenizer_path)  # against the tokenizer stage's manifest
    tokenizer = BPETokenizer.load(tokenizer_path)
    engine = tokenizer.to_tiktoken()
    dropped: Counter = Counter()
    counts: dict[str, Any] = {}
    for split, out in (("val", val_out), ("train", train_out)):
        stats: Counter = Counter()
        texts = split_texts(source, split, config["val_fraction"], dropped)
        docs = tqdm(encode_documents(texts, tokenizer, engine, threads, stats), desc=f"{source.name} {split}",
                    unit="doc", disable=None)
        documents, tokens = write_shard(out, docs, tokenizer.n_vocab)
        counts[split] = {"documents": documents, "tokens": tokens, "bytes": stats["bytes"]}
        log.info("%s %s: %d documents, %d tokens (%d bytes)", source.name, split, documents, tokens, stats["bytes"])
    counts["dropped"] = dict(dropped)
    counts["by_source"] = {source.name: {f"{split}_{key}": counts[split][key] for split in ("train", "val")
                                         for key in ("documents", "tokens")}}
    outputs = {train_out: counts["train"]["documents"], index_path(train_out): None,
               val_out: counts["val"]["documents"], index_path(val_out): None}
    return write_manifest(manifest_out, stage="tokenize", config=config, inputs=[source.path, tokenizer_path],
                          outputs=outputs, counts=counts,
                          metrics={"tokenizer_sha256": sha256_file(tokenizer_path), "weights": {source.name: source.weight}})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, type=json_arg,
                        help="the source as JSON ({name, path, format, separator, field, weight})")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json from the tokenizer stage")
    parser.add_argument("--train", required=True, help="output train shard (.bin; the .idx goes beside it)")
    parser.add_argument("--val", required=True, help="output val shard (.bin; the .idx goes beside it)")
    parser.add_argument("--manifest", required=True, help="output <source>.manifest.json")
    parser.add_argument("--threads", type=int, default=1, help="tiktoken encoding threads")
    parser.add_argument("--config", type=json_arg, default={}, help="the `tokenizer` config section (JSON)")


def run(args: argparse.Namespace) -> int:
    tokenize_source(Source.from_json(args.source), args.tokenizer, train_out=args.train, val_out=args.val,
                    manifest_out=args.manifest, config=section_config("tokenizer", args.config),
                    threads=args.threads)
    return 0

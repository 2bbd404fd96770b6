"""dedup: exact, then MinHash-LSH near-duplicate removal (datasketch), in three steps.

1. `signatures` (one job per shard): normalize each document's text (lowercase, accents and
   punctuation stripped, digits folded to 0, whitespace collapsed), hash it for exact matching,
   and MinHash its word n-grams (`ngram`, 5) with `bands x rows` permutations (14 x 8 = 112, the
   FineWeb setting) using datasketch's vectorized `MinHash.bulk`.
2. `clusters` (one global job): documents with the same normalized-text hash are one cluster;
   then every exact-group representative goes into a datasketch `MinHashLSH` with `(bands, rows)`,
   and two documents sharing a band bucket are joined (union-find) when their estimated Jaccard
   similarity is at least `min_jaccard` (null joins every collision, as FineWeb does). Each
   cluster keeps one deterministic representative, the smallest (id, shard, row), so the choice
   does not depend on job order or on how documents are split into shards.
3. `filter` (one job per shard): drops every non-representative as `exact_duplicate` or
   `near_duplicate`, recording `duplicate_of`; what stays is the clean text.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from datasketch import LeanMinHash, MinHash, MinHashLSH
from tqdm import tqdm

from pipeline.artifacts import atomic_path, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.data.docs import DEDUP_REMOVED_COLUMNS, Doc, read_docs, read_frame
from pipeline.data.steps import Decision, add_stage_arguments, run_doc_stage

log = logging.getLogger(__name__)

SCHEME = "affine32"  # datasketch 2.x default; stored signatures are only comparable under one scheme
_NON_WORD = re.compile(r"[^\w\s]|_")
_DIGIT = re.compile(r"\d")


# ---------------------------------------------------------------------------------------------
# text -> shingles -> signature

@functools.cache
def _combining_marks() -> dict[int, None]:
    """str.translate table deleting every combining mark (category Mn), built once (~0.3 s)."""
    return dict.fromkeys(cp for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Mn")


def normalize(text: str) -> str:
    """Lowercase, strip accents and punctuation, fold digits to 0, collapse whitespace."""
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFD", text).translate(_combining_marks())
    text = _DIGIT.sub("0", _NON_WORD.sub(" ", text))
    return " ".join(text.split())


def shingles(normalized: str, n: int) -> set[bytes]:
    """Word n-grams; a text shorter than n words is one shingle of all its words."""
    words = normalized.split()
    if len(words) < n:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def text_hash(normalized: str) -> str:
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:32]


def signatures(docs: list[Doc], shard: str, config: dict[str, Any]) -> pl.DataFrame:
    """One row per document: its place (shard, row), id, url, exact hash and MinHash values.

    A document with no words gets no signature (`has_signature` false): it can still be an
    exact duplicate, but it must not collide with every other empty shingle set in LSH."""
    num_perm = config["bands"] * config["rows"]
    normalized = [normalize(d["text"]) for d in docs]
    shingle_sets = [shingles(t, config["ngram"]) for t in normalized]
    minhashes = MinHash.bulk((s for s in shingle_sets), num_perm=num_perm, seed=config["seed"], scheme=SCHEME)
    values = np.stack([m.hashvalues for m in minhashes]).astype(np.uint32) if docs else np.zeros((0, num_perm), np.uint32)
    return pl.DataFrame({
        "source": pl.Series([shard] * len(docs), dtype=pl.String),
        "row": np.arange(len(docs), dtype=np.int64),
        "id": pl.Series([d["id"] for d in docs], dtype=pl.String),
        "url": pl.Series([d["url"] for d in docs], dtype=pl.String),
        "text_hash": pl.Series([text_hash(t) for t in normalized], dtype=pl.String),
        "has_signature": pl.Series([bool(s) for s in shingle_sets], dtype=pl.Boolean),
        "signature": pl.Series(values, dtype=pl.Array(pl.UInt32, num_perm)),
    })


# ---------------------------------------------------------------------------------------------
# global clustering

class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def cluster(table: pl.DataFrame, config: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Assign every document a representative; return the removed ones and cluster statistics.

    Rows are first put in representative order (id, source, row), so index 0 of every cluster
    is its representative and union-find (which keeps the smaller index as root) preserves it."""
    table = table.sort(["id", "source", "row"])
    sigs = table["signature"].to_numpy()
    col = {name: table[name].to_list() for name in ("source", "row", "id", "url", "text_hash", "has_signature")}
    uf = UnionFind(table.height)

    first_with_hash: dict[str, int] = {}
    for i, h in enumerate(col["text_hash"]):
        uf.union(first_with_hash.setdefault(h, i), i)

    num_perm = config["bands"] * config["rows"]
    lsh = MinHashLSH(num_perm=num_perm, params=(config["bands"], config["rows"]))
    candidates = [i for i in first_with_hash.values() if col["has_signature"][i]]
    minhash = {i: LeanMinHash(seed=config["seed"], hashvalues=sigs[i], scheme=SCHEME) for i in candidates}
    with lsh.insertion_session() as session:
        for i in candidates:
            session.insert(i, minhash[i])
    pairs_checked = 0
    for i in tqdm(candidates, desc="lsh query", unit="doc", disable=None):
        for j in lsh.query(minhash[i]):
            if j <= i:
                continue
            pairs_checked += 1
            if config["min_jaccard"] is None or estimated_jaccard(sigs[i], sigs[j]) >= config["min_jaccard"]:
                uf.union(i, j)

    roots = [uf.find(i) for i in range(table.height)]
    hashes = col["text_hash"]
    removed = [{
        "source": col["source"][i], "row": col["row"][i], "id": col["id"][i], "url": col["url"][i],
        "duplicate_of": col["id"][r], "duplicate_of_url": col["url"][r],
        "reason": "exact_duplicate" if hashes[i] == hashes[r] else "near_duplicate",
        "similarity": 1.0 if hashes[i] == hashes[r] else estimated_jaccard(sigs[i], sigs[r]),
    } for i, r in enumerate(roots) if i != r]
    removed_frame = pl.DataFrame(removed, schema={
        "source": pl.String, "row": pl.Int64, "id": pl.String, "url": pl.String, "duplicate_of": pl.String,
        "duplicate_of_url": pl.String, "reason": pl.String, "similarity": pl.Float64,
    }).sort(["source", "row"])
    sizes = Counter(Counter(roots).values())
    stats = {
        "docs": table.height,
        "clusters": len(set(roots)),
        "lsh_pairs_checked": pairs_checked,
        "removed": dict(sorted(Counter(r["reason"] for r in removed).items())),
        "cluster_sizes": {str(size): n for size, n in sorted(sizes.items())},
        "example_pairs": examples(removed_frame, config["example_pairs"]),
    }
    return removed_frame, stats


def examples(removed: pl.DataFrame, n: int) -> list[dict[str, Any]]:
    """The least similar near duplicates (the interesting ones to eyeball), then exact ones."""
    ordered = removed.sort(["reason", "similarity", "id"], descending=[True, False, False])
    return ordered.select("id", "url", "duplicate_of", "duplicate_of_url", "reason", "similarity").head(n).to_dicts()


# ---------------------------------------------------------------------------------------------
# the three commands

def write_frame(path: str, frame: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", compression_level=3, statistics=False)


def run_signatures(docs_in: str, *, output: str, manifest: str, config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shard = Path(docs_in).name.removesuffix(".parquet")
    frame = signatures(read_docs(docs_in), shard, config)
    write_frame(output, frame)
    write_manifest(manifest, stage="dedup_signatures", config=config, inputs=[docs_in],
                   outputs={output: frame.height}, counts={"docs": frame.height})


def run_clusters(signature_files: list[str], *, output: str, manifest: str, config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    table = pl.concat([read_frame(p) for p in sorted(signature_files)])
    if table.height == 0:
        log.warning("dedup: no documents reached dedup (every one was dropped upstream)")
    removed, stats = cluster(table, config)
    write_frame(output, removed)
    log.info("dedup: %d docs in %d clusters, removed %s", stats["docs"], stats["clusters"], stats["removed"])
    write_manifest(manifest, stage="dedup", config=config, inputs=sorted(signature_files),
                   outputs={output: removed.height}, counts={"docs": stats["docs"], "removed": stats["removed"]},
                   metrics=stats)


def run_filter(docs_in: str, clusters: str, *, output: str, removed: str, manifest: str,
               config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shard = Path(docs_in).name.removesuffix(".parquet")
    duplicates = {r["row"]: r for r in read_frame(clusters).filter(pl.col("source") == shard).to_dicts()}

    def decide(docs: list[Doc]) -> Iterator[Decision]:
        for row, doc in enumerate(docs):
            dup = duplicates.get(row)
            if dup is None:
                yield doc, None
                continue
            if dup["id"] != doc["id"]:
                raise ValueError(f"{clusters} is stale for {docs_in}: row {row} is {doc['id']}, "
                                 f"clusters name {dup['id']}; rerun dedup")
            yield {**doc, "duplicate_of": dup["duplicate_of"]}, dup["reason"]

    run_doc_stage("dedup", decide, docs_in=docs_in, docs_out=output, removed_out=removed, manifest=manifest,
                  config=config, removed_schema=DEDUP_REMOVED_COLUMNS, extra_inputs=[clusters])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_subparsers(dest="step", required=True)
    sig = steps.add_parser("signatures", help="MinHash signatures of one shard")
    sig.add_argument("--input", required=True, help="documents (parquet)")
    sig.add_argument("--output", required=True, help="signatures (parquet)")
    sig.add_argument("--manifest", required=True)
    sig.add_argument("--config", type=json_arg, default={}, help="the `dedup` config section as JSON")
    clu = steps.add_parser("clusters", help="global exact + LSH clustering over all shards")
    clu.add_argument("--input", nargs="+", required=True, help="every shard's signatures (parquet)")
    clu.add_argument("--output", required=True, help="removed documents with their representative (parquet)")
    clu.add_argument("--manifest", required=True)
    clu.add_argument("--config", type=json_arg, default={}, help="the `dedup` config section as JSON")
    fil = steps.add_parser("filter", help="drop one shard's duplicates")
    add_stage_arguments(fil, config_help="the `dedup` config section as JSON")
    fil.add_argument("--clusters", required=True, help="output of `dedup clusters`")


def run(args: argparse.Namespace) -> int:
    if args.step == "signatures":
        run_signatures(args.input, output=args.output, manifest=args.manifest, config=args.config)
    elif args.step == "clusters":
        run_clusters(args.input, output=args.output, manifest=args.manifest, config=args.config)
    else:
        run_filter(args.input, args.clusters, output=args.output, removed=args.removed,
                   manifest=args.manifest, config=args.config)
    return 0

"""dedup: exact, then MinHash-LSH near-duplicate removal (datasketch), in four steps whose memory
does not grow with the crawl.

1. `signatures` (one job per shard): normalize each document's text (lowercase, accents and
   punctuation stripped, digits folded to 0, whitespace collapsed), hash it for exact matching,
   and MinHash its word n-grams (`ngram`, 5) with `bands x rows` permutations (14 x 8 = 112, the
   FineWeb setting) using datasketch's vectorized `MinHash.bulk`, `batch_size` documents at a
   time streamed from the parquet. Beside the signatures it writes the shard's bucket index: per
   LSH band, (band key, document) sorted by key, and the same keyed by the exact text hash.
2. `band` (one job per band, plus one for exact matches, in parallel): merges that band of
   every shard's bucket index as sorted streams, `merge_batch` rows per shard at a time, and
   writes the candidate pairs of every bucket that more than one document shares. Within a band
   bucket only the first document (smallest id) of each exact-text group takes part, as only
   exact-group representatives went into LSH before; every pair of those is a candidate, as a
   `MinHashLSH` query returns. The exact job joins each document to the first of its text hash.
3. `clusters` (one global job): reads every band's pairs (memory grows with the candidate pairs,
   not the documents), loads the signatures of only the paired documents, and joins a pair
   (union-find) when its estimated Jaccard similarity is at least `min_jaccard` (null joins
   every collision, as FineWeb does). Each cluster keeps one deterministic representative, the
   smallest (id, shard, row), so the choice does not depend on job order or on how documents are
   split into shards.
4. `filter` (one job per shard): drops every non-representative as `exact_duplicate` or
   `near_duplicate`, recording `duplicate_of`; what stays is the clean text.

Results equal those of one datasketch `MinHashLSH` over all signatures (tests/dedup_reference.py).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.artifacts import atomic_path, check_file, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.data.docs import DEDUP_REMOVED_COLUMNS, Doc, iter_batches, read_frame
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


def signatures(docs: list[Doc], shard: str, config: dict[str, Any], first_row: int = 0) -> pl.DataFrame:
    """One row per document: its place (shard, row), id, url, exact hash and MinHash values.
    `first_row` is the row of docs[0] in its shard (the shard comes in batches).

    A document with no words gets no signature (`has_signature` false): it can still be an
    exact duplicate, but it must not collide with every other empty shingle set in LSH."""
    from datasketch import MinHash  # here: the band, clusters and filter jobs need not pay its ~0.7 s import
    num_perm = config["bands"] * config["rows"]
    normalized = [normalize(d["text"]) for d in docs]
    shingle_sets = [shingles(t, config["ngram"]) for t in normalized]
    minhashes = MinHash.bulk((s for s in shingle_sets), num_perm=num_perm, seed=config["seed"], scheme=SCHEME)
    values = np.stack([m.hashvalues for m in minhashes]).astype(np.uint32) if docs else np.zeros((0, num_perm), np.uint32)
    return pl.DataFrame({
        "source": pl.Series([shard] * len(docs), dtype=pl.String),
        "row": np.arange(first_row, first_row + len(docs), dtype=np.int64),
        "id": pl.Series([d["id"] for d in docs], dtype=pl.String),
        "url": pl.Series([d["url"] for d in docs], dtype=pl.String),
        "text_hash": pl.Series([text_hash(t) for t in normalized], dtype=pl.String),
        "has_signature": pl.Series([bool(s) for s in shingle_sets], dtype=pl.Boolean),
        "signature": pl.Series(values, dtype=pl.Array(pl.UInt32, num_perm)),
    })


# ---------------------------------------------------------------------------------------------
# the bucket index: per band, (key, document) sorted by key

BUCKET_SCHEMA = pa.schema([("hash", pa.uint64()), ("id", pa.string()), ("source", pa.string()),
                           ("row", pa.int64()), ("text_hash", pa.string())])
BUCKET_ORDER = ["hash", "id", "source", "row"]  # a bucket's documents in representative order
EXACT = "exact"  # the band name of the exact-text index, after the LSH bands
BUCKET_ROW_GROUP = 8192  # what a band job holds per shard: parquet is read a row group at a time
BAND_GROUPS = b"wetstone.band_row_groups"  # metadata key: row groups per band, in band order


def band_keys(values: np.ndarray, rows: int) -> np.ndarray:
    """A 64-bit FNV-1a hash (finalized) of each band's `rows` values, shape (docs, bands). Two documents share
    a datasketch LSH bucket when their band values are equal; equal values give equal keys, and a
    key shared by chance is caught in `clusters`, which compares the values themselves."""
    v = values.reshape(len(values), values.shape[1] // rows, rows).astype(np.uint64)
    keys = np.full(v.shape[:2], 0xCBF29CE484222325, dtype=np.uint64)
    for k in range(rows):
        keys = (keys ^ v[:, :, k]) * np.uint64(0x100000001B3)  # wraps mod 2^64, as FNV does
    keys ^= keys >> np.uint64(33)  # murmur3's finalizer: spread keys over the whole range
    return keys * np.uint64(0xFF51AFD7ED558CCD)


def bucket_tables(table: pl.DataFrame, config: dict[str, Any]) -> list[pl.DataFrame]:
    """The bucket index of a signature table: one frame per band (documents with a signature),
    then one keyed by the exact text hash (every document), each sorted by key then document."""
    docs = table.select("id", "source", "row", "text_hash")
    signed = table["has_signature"].to_numpy()
    keys = band_keys(table["signature"].to_numpy()[signed], config["rows"])
    bands = [docs.filter(signed).with_columns(hash=pl.Series(keys[:, b], dtype=pl.UInt64)).sort(BUCKET_ORDER)
             for b in range(config["bands"])]
    exact = docs.with_columns(hash=pl.col("text_hash").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64))
    return [frame.select(BUCKET_SCHEMA.names) for frame in [*bands, exact.sort(BUCKET_ORDER)]]


def write_buckets(path: str, tables: list[pl.DataFrame]) -> None:
    """Each band in row groups of BUCKET_ROW_GROUP rows, in band order, and how many each band has
    in the file's metadata, so a band job reads only its own, a row group at a time."""
    groups = [max(1, -(-frame.height // BUCKET_ROW_GROUP)) for frame in tables]  # an empty band: one empty group
    schema = BUCKET_SCHEMA.with_metadata({BAND_GROUPS: json.dumps(groups)})
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=3,
                                                    write_statistics=False) as writer:
        for frame in tables:
            writer.write_table(frame.to_arrow().cast(schema), row_group_size=BUCKET_ROW_GROUP)


def band_index(band: str, config: dict[str, Any]) -> int:
    """The place of `band` (0 .. bands-1, or `exact`) in a bucket index."""
    if band == EXACT:
        return config["bands"]
    if not band.isdigit() or int(band) >= config["bands"]:
        raise ValueError(f"dedup band: --band {band!r} is not `{EXACT}` or a band 0..{config['bands'] - 1} "
                         f"(dedup.bands is {config['bands']})")
    return int(band)


# ---------------------------------------------------------------------------------------------
# band jobs: sorted streams merged, buckets -> candidate pairs

PAIR_SCHEMA = {"band": pl.Int32, "a_id": pl.String, "a_source": pl.String, "a_row": pl.Int64,
               "b_id": pl.String, "b_source": pl.String, "b_row": pl.Int64}


def read_bucket_stream(path: str, band: int, rows: int) -> Iterator[pl.DataFrame]:
    """Band `band` of one bucket index, `rows` at a time."""
    index = pq.ParquetFile(path)
    groups = json.loads(index.schema_arrow.metadata[BAND_GROUPS])
    if band >= len(groups):
        raise ValueError(f"{path}: bucket index has {len(groups)} bands, no band {band}: written with other "
                         "dedup.bands? rerun dedup signatures")
    first = sum(groups[:band])
    for group in range(first, first + groups[band]):  # one at a time: iter_batches reads ahead
        table = pl.from_arrow(index.read_row_group(group))
        for start in range(0, table.height, rows):
            yield table[start:start + rows]


def merge_buckets(streams: list[Iterator[pl.DataFrame]]) -> Iterator[pl.DataFrame]:
    """Frames holding whole buckets, from streams each sorted by key: everything under the
    smallest last key in the buffer of any unfinished stream is complete. A buffer holding one
    key only reads on (that bucket may go on), so memory is a batch per stream plus the largest
    bucket."""
    buffers = [pl.DataFrame(schema=pl.Schema(BUCKET_SCHEMA)) for _ in streams]
    live = [True] * len(streams)
    while True:
        for i, stream in enumerate(streams):
            while live[i] and (buffers[i].height == 0 or buffers[i]["hash"][0] == buffers[i]["hash"][-1]):
                batch = next(stream, None)
                if batch is None:
                    live[i] = False
                else:
                    buffers[i] = pl.concat([buffers[i], batch])
        bounds = [b["hash"][-1] for b, alive in zip(buffers, live) if alive]
        if not bounds:
            yield pl.concat(buffers)
            return
        cuts = [b["hash"].search_sorted(min(bounds), side="left") for b in buffers]  # buffers are sorted
        yield pl.concat([b[:cut] for b, cut in zip(buffers, cuts)])
        buffers = [b[cut:] for b, cut in zip(buffers, cuts)]


def bucket_pairs(chunks: Iterable[pl.DataFrame], band: int, exact: bool) -> pl.DataFrame:
    """Candidate pairs (a < b in representative order) of every bucket shared by several documents.

    Exact: each document pairs with the first of its text hash. A band: the first document of
    each text hash in the bucket (the exact group's representative: equal texts share every
    bucket) pairs with every other such document."""
    pairs = []
    for chunk in chunks:
        shared = chunk.filter(pl.col("hash").is_duplicated()).sort(BUCKET_ORDER)
        bucket: list[tuple] = []
        for row in shared.iter_rows():  # (hash, id, source, row, text_hash), whole buckets in a row
            if bucket and row[0] != bucket[0][0]:
                pairs += _pairs_in(bucket, band, exact)
                bucket = []
            bucket.append(row)
        pairs += _pairs_in(bucket, band, exact)
    return pl.DataFrame(pairs, schema=PAIR_SCHEMA, orient="row")


def _pairs_in(bucket: list[tuple], band: int, exact: bool) -> list[tuple]:
    first: dict[str, tuple] = {}  # text hash -> its first document in the bucket
    pairs = []
    for _, *doc, text in bucket:
        doc = tuple(doc)
        if text not in first:
            first[text] = doc
        elif exact:
            pairs.append((band, *first[text], *doc))
    if not exact:
        heads = list(first.values())
        pairs += [(band, *a, *b) for i, a in enumerate(heads) for b in heads[i + 1:]]
    return pairs


# ---------------------------------------------------------------------------------------------
# union-find over the pairs

class UnionFind:
    """Disjoint sets of hashable keys; a set's root is always its smallest key."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, key):
        root = key
        while (up := self.parent.get(root, root)) != root:
            root = up
        while (up := self.parent.get(key, key)) != root:  # path compression
            self.parent[key], key = root, up
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def paired_docs(pairs: pl.DataFrame) -> dict[str, set[int]]:
    """Shard -> rows of every document named by a pair: the only signatures `clusters` loads."""
    ends = pl.concat([pairs.select(source=pl.col(f"{e}_source"), row=pl.col(f"{e}_row")) for e in "ab"]).unique()
    wanted: dict[str, set[int]] = {}
    for source, row in ends.iter_rows():
        wanted.setdefault(source, set()).add(row)
    return wanted


def jaccards(sigs: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Estimated Jaccard similarity (the share of equal MinHash values) of each pair of rows
    (a[k], b[k]), a chunk of pairs at a time."""
    return np.concatenate([np.mean(sigs[a[i:i + chunk]] == sigs[b[i:i + chunk]], axis=1)
                           for i in range(0, len(a), chunk)] or [np.zeros(0)])


def cluster_pairs(pairs: pl.DataFrame, nodes: pl.DataFrame, docs: int,
                  config: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Assign every paired document a representative; return the removed ones and statistics.

    `nodes` are the signature rows of the paired documents, `docs` the count of all documents.
    Nodes are numbered in representative order, so union-find's smallest root is the smallest
    (id, shard, row). A band pair counts (`lsh_pairs_checked`) once however many bands it shares,
    and only when the band values are equal (not just their 64-bit keys)."""
    nodes = nodes.sort(["id", "source", "row"]).with_row_index("node")
    sigs, rows = nodes["signature"].to_numpy(), config["rows"]
    for end in "ab":  # each end's node number
        ends = nodes.select(pl.col("id").alias(f"{end}_id"), pl.col("source").alias(f"{end}_source"),
                            pl.col("row").alias(f"{end}_row"), pl.col("node").cast(pl.Int64).alias(end))
        pairs = pairs.join(ends, on=[f"{end}_id", f"{end}_source", f"{end}_row"], how="inner")
    uf = UnionFind()
    for a, b in pairs.filter(pl.col("band") < 0).select("a", "b").iter_rows():
        uf.union(a, b)
    lsh = pairs.filter(pl.col("band") >= 0)
    a, b = lsh["a"].to_numpy(), lsh["b"].to_numpy()
    cols = lsh["band"].to_numpy()[:, None] * rows + np.arange(rows)
    same_band = (sigs[a[:, None], cols] == sigs[b[:, None], cols]).all(axis=1)  # else equal keys by chance
    checked = pl.DataFrame({"a": a[same_band], "b": b[same_band]}).unique().sort("a", "b")
    a, b = checked["a"].to_numpy(), checked["b"].to_numpy()
    if config["min_jaccard"] is not None:
        similar = jaccards(sigs, a, b) >= config["min_jaccard"]
        a, b = a[similar], b[similar]
    for i, j in zip(a.tolist(), b.tolist()):
        uf.union(i, j)

    node = np.arange(nodes.height)
    root = np.array([uf.find(i) for i in range(nodes.height)], dtype=np.int64)
    gone, rep = node[root != node], root[root != node]
    same = (nodes["text_hash"].gather(gone) == nodes["text_hash"].gather(rep)).to_numpy()
    removed_frame = pl.DataFrame({
        "source": nodes["source"].gather(gone), "row": nodes["row"].gather(gone),
        "id": nodes["id"].gather(gone), "url": nodes["url"].gather(gone),
        "duplicate_of": nodes["id"].gather(rep), "duplicate_of_url": nodes["url"].gather(rep),
        "reason": pl.Series(np.where(same, "exact_duplicate", "near_duplicate"), dtype=pl.String),
        "similarity": pl.Series(np.where(same, 1.0, jaccards(sigs, gone, rep)), dtype=pl.Float64),
    }).sort(["source", "row"])
    sizes = Counter(Counter(root.tolist()).values())
    sizes[1] += docs - nodes.height  # documents in no pair are clusters of one
    stats = {
        "docs": docs,
        "clusters": docs - removed_frame.height,
        "lsh_pairs_checked": checked.height,
        "removed": dict(sorted(Counter(removed_frame["reason"].to_list()).items())),
        "cluster_sizes": {str(size): n for size, n in sorted(sizes.items()) if n},
        "example_pairs": examples(removed_frame, config["example_pairs"]),
    }
    return removed_frame, stats


def select_paired(table: pl.DataFrame, wanted: dict[str, set[int]]) -> pl.DataFrame:
    """The rows of one signature table that `wanted` names."""
    rows = [(s, r) for s, rs in wanted.items() for r in rs]
    keep = pl.DataFrame(rows, schema={"source": pl.String, "row": pl.Int64}, orient="row")
    return table.join(keep, on=["source", "row"], how="semi")


def cluster(table: pl.DataFrame, config: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every step in one process, on one signature table (tests, benchmarks): the band jobs'
    pairs over the table's bucket index, then union-find."""
    tables = bucket_tables(table, config)
    pairs = pl.concat([bucket_pairs([frame], -1 if b == config["bands"] else b, exact=b == config["bands"])
                       for b, frame in enumerate(tables)])
    return cluster_pairs(pairs, select_paired(table, paired_docs(pairs)), table.height, config)


def examples(removed: pl.DataFrame, n: int) -> list[dict[str, Any]]:
    """The least similar near duplicates (the interesting ones to eyeball), then exact ones."""
    ordered = removed.sort(["reason", "similarity", "id"], descending=[True, False, False])
    return ordered.select("id", "url", "duplicate_of", "duplicate_of_url", "reason", "similarity").head(n).to_dicts()


# ---------------------------------------------------------------------------------------------
# the commands

def write_frame(path: str, frame: pl.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", compression_level=3, statistics=False)


def run_signatures(docs_in: str, *, output: str, buckets: str, manifest: str, config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shard = Path(docs_in).name.removesuffix(".parquet")
    parts, row = [], 0
    batches = iter_batches(docs_in, config["batch_size"], columns=["id", "url", "text"])  # only what dedup needs
    for docs in tqdm(batches, desc="minhash", unit="batch", disable=None):
        parts.append(signatures(docs, shard, config, first_row=row))
        row += len(docs)
    frame = pl.concat(parts).rechunk() if parts else signatures([], shard, config)
    write_frame(output, frame)
    write_buckets(buckets, bucket_tables(frame, config))
    write_manifest(manifest, stage="dedup_signatures", config=config, inputs=[docs_in],
                   outputs={output: frame.height, buckets: None}, counts={"docs": frame.height})


def run_band(bucket_files: list[str], band: str, *, upstream: list[str], output: str, manifest: str,
             config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    number = band_index(band, config)
    manifests = {Path(m).name.removesuffix(".manifest.json"): m for m in upstream}
    streams = []
    for path in sorted(bucket_files):
        shard = Path(path).name.removesuffix(".parquet")
        if shard not in manifests:
            raise ValueError(f"dedup band: no --upstream manifest {shard}.manifest.json for {path}")
        check_file(path, manifests[shard])
        streams.append(read_bucket_stream(path, number, config["merge_batch"]))
    pairs = bucket_pairs(tqdm(merge_buckets(streams), desc=f"band {band}", unit="chunk", disable=None),
                         -1 if band == EXACT else number, exact=band == EXACT)
    write_frame(output, pairs)
    write_manifest(manifest, stage="dedup_band", config=config, inputs=sorted(bucket_files),
                   outputs={output: pairs.height}, counts={"pairs": pairs.height}, metrics={"band": band})


def run_clusters(signature_files: list[str], pair_files: list[str], *, output: str, manifest: str,
                 config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    pairs = pl.concat([read_frame(p) for p in sorted(pair_files)]) if pair_files else pl.DataFrame(schema=PAIR_SCHEMA)
    wanted, nodes, docs = paired_docs(pairs), [], 0
    for path in sorted(signature_files):
        check_file(path)
        docs += pq.ParquetFile(path).metadata.num_rows
        shard = Path(path).name.removesuffix(".parquet")
        if shard in wanted:  # a shard's file lists its rows in order: read only the paired ones
            nodes.append(select_paired(pl.read_parquet(path), {shard: wanted[shard]}))
    if docs == 0:
        log.warning("dedup: no documents reached dedup (every one was dropped upstream)")
    nodes_frame = pl.concat(nodes) if nodes else pl.DataFrame(schema=signatures([], "", config).schema)
    removed, stats = cluster_pairs(pairs, nodes_frame, docs, config)
    write_frame(output, removed)
    log.info("dedup: %d docs in %d clusters, removed %s", stats["docs"], stats["clusters"], stats["removed"])
    write_manifest(manifest, stage="dedup", config=config, inputs=[*sorted(signature_files), *sorted(pair_files)],
                   outputs={output: removed.height}, counts={"docs": stats["docs"], "removed": stats["removed"]},
                   metrics=stats)


def run_filter(docs_in: str, clusters: str, *, output: str, removed: str, manifest: str,
               config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shard = Path(docs_in).name.removesuffix(".parquet")
    check_file(clusters)  # one table for the whole crawl: scan this shard's rows, never hold it whole
    mine = (pl.scan_parquet(clusters).filter(pl.col("source") == shard)
            .select("row", "id", "duplicate_of", "reason").collect(engine="streaming"))
    duplicates = {r["row"]: r for r in mine.to_dicts()}

    def decide(docs: Iterator[Doc]) -> Iterator[Decision]:
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
    sig = steps.add_parser("signatures", help="MinHash signatures and the bucket index of one shard")
    sig.add_argument("--input", required=True, help="documents (parquet)")
    sig.add_argument("--output", required=True, help="signatures (parquet)")
    sig.add_argument("--buckets", required=True, help="bucket index: each band sorted by key (parquet)")
    band = steps.add_parser("band", help="one LSH band (or `exact`) over every shard: candidate pairs")
    band.add_argument("--band", required=True, help=f"a band 0..bands-1, or `{EXACT}`")
    band.add_argument("--input", nargs="+", required=True, help="every shard's bucket index (parquet)")
    band.add_argument("--upstream", nargs="+", required=True, help="the signature manifests naming them")
    band.add_argument("--output", required=True, help="candidate pairs (parquet)")
    clu = steps.add_parser("clusters", help="union-find over every band's pairs")
    clu.add_argument("--input", nargs="+", required=True, help="every shard's signatures (parquet)")
    clu.add_argument("--pairs", nargs="+", required=True, help="every band's candidate pairs (parquet)")
    clu.add_argument("--output", required=True, help="removed documents with their representative (parquet)")
    for step in (sig, band, clu):
        step.add_argument("--manifest", required=True)
        step.add_argument("--config", type=json_arg, default={}, help="the `dedup` config section as JSON")
    fil = steps.add_parser("filter", help="drop one shard's duplicates")
    add_stage_arguments(fil, config_help="the `dedup` config section as JSON")
    fil.add_argument("--clusters", required=True, help="output of `dedup clusters`")


def run(args: argparse.Namespace) -> int:
    if args.step == "signatures":
        run_signatures(args.input, output=args.output, buckets=args.buckets, manifest=args.manifest,
                       config=args.config)
    elif args.step == "band":
        run_band(args.input, args.band, upstream=args.upstream, output=args.output, manifest=args.manifest,
                 config=args.config)
    elif args.step == "clusters":
        run_clusters(args.input, args.pairs, output=args.output, manifest=args.manifest, config=args.config)
    else:
        run_filter(args.input, args.clusters, output=args.output, removed=args.removed,
                   manifest=args.manifest, config=args.config)
    return 0

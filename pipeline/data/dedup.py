"""dedup: exact, then MinHash-LSH near-duplicate removal (datasketch), in four steps whose memory
does not grow with the crawl (the clusters job: ~26 bytes per paired document).

1. `signatures` (one job per shard): normalize each document's text (lowercase, accents and
   punctuation stripped, digits folded to 0, whitespace collapsed), hash it for exact matching,
   and MinHash its word n-grams (`ngram`, 5) with `bands x rows` permutations (14 x 8 = 112, the
   FineWeb setting) using datasketch's vectorized `MinHash.bulk`, `batch_size` documents at a
   time streamed from the parquet. Beside the signatures it writes the shard's bucket index: per
   LSH band, (band key, document) sorted by key, and the same keyed by the exact text hash.
2. `band` (one job per band, plus one for exact matches, in parallel): reads that band of every
   shard's bucket index a row group at a time, splits it by key range into parts that fit
   `memory_mb` (through temporary files when there are several), sorts each part and writes the
   candidate pairs of every bucket that more than one document shares. Within a band bucket only
   the first document of each exact-text group takes part (equal texts share every bucket); every
   pair of those is a candidate, as a `MinHashLSH` query returns, or with `min_jaccard: null`
   each pairs with the bucket's first only (linear in the bucket, the same clusters). The exact
   job pairs each document with the first of its text.
3. `clusters` (one global job): numbers every paired document by its key, drops band pairs whose
   band values differ (a 64-bit key shared by chance) or, with `min_jaccard` set, whose estimated
   Jaccard similarity is below it, and joins the rest with the exact pairs (union-find over
   numpy arrays). Signatures, ids and urls are read shard by shard, only for the documents that
   need them, and joined through temporary files. It writes each shard's removed documents to a
   file of that shard's own.
4. `filter` (one job per shard): drops every non-representative as `exact_duplicate` or
   `near_duplicate`, recording `duplicate_of`; what stays is the clean text.

Document keys: pairs name a document by `shard << 32 | row`, its shard's place among the shards
in name order and its row. Each cluster keeps one representative, its first document in (id,
shard, row) order, the key breaking ties of equal ids; so the choice depends neither on how
documents are split into shards nor on the order of bands or jobs.

Results equal those of one datasketch `MinHashLSH` over all signatures (tests/dedup_reference.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
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

from pipeline.artifacts import atomic_path, check_file, read_manifest, write_manifest
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
FRAME_ROW_GROUP = 8192  # rows per row group of signature files: what the clusters job reads at a time
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
# document keys, and what the band and clusters jobs set aside

def shard_name(path: str | os.PathLike) -> str:
    return Path(path).name.removesuffix(".parquet")


def by_shard(paths: Iterable[str]) -> list[str]:
    """Paths in shard-name order: a shard's number in document keys is its place in this list."""
    return sorted(paths, key=shard_name)


def shards_digest(names: list[str]) -> str:
    """What a pair file records of the shard list that numbers its keys (`clusters` checks it)."""
    return hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()


def doc_keys(shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """A document's key: its shard's number and its row in one uint64, so keys sort as (shard, row)."""
    return (shard.astype(np.uint64) << np.uint64(32)) | row.astype(np.uint64)


def key_shard(keys: np.ndarray) -> np.ndarray:
    return (keys >> np.uint64(32)).astype(np.int64)


def key_row(keys: np.ndarray) -> np.ndarray:
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """A file that cannot be parsed stops the job naming it."""
    try:
        yield
    except (pa.ArrowException, pl.exceptions.PolarsError, OSError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from e


@contextlib.contextmanager
def scratch(path: str | os.PathLike) -> Iterator[Path]:
    """A folder for a job's temporary files beside its output `path`: emptied first (what a killed
    run left there), removed after."""
    folder = Path(path).with_name(f".{Path(path).name}.tmp")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Spill:
    """Frames set aside in numbered parts and taken back a part at a time: held in memory when
    there is one part, else appended to an Arrow IPC file per part in `folder` as they come."""

    def __init__(self, parts: int, folder: Path):
        self.parts, self.folder = parts, folder
        self.held: list[pl.DataFrame] = []
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def add(self, part: int, frame: pl.DataFrame) -> None:
        if self.parts == 1:
            self.held.append(frame)
            return
        table = frame.to_arrow()
        if part not in self.writers:
            self.writers[part] = pa.ipc.new_stream(str(self.folder / f"{part}.arrow"), table.schema)
        self.writers[part].write_table(table)

    def take(self, part: int) -> pl.DataFrame | None:
        """Part `part` whole (its file removed), or None if nothing was set aside for it."""
        if self.parts == 1:
            frames, self.held = self.held, []
            return pl.concat(frames) if frames else None
        writer = self.writers.pop(part, None)
        if writer is None:
            return None
        writer.close()
        path = self.folder / f"{part}.arrow"
        frame = pl.read_ipc_stream(path)
        path.unlink()
        return frame


MAX_PARTS = 512  # files a job writes at once; beyond, a part outgrows dedup.memory_mb


def parts_of(rows: int, row_bytes: int, config: dict[str, Any]) -> int:
    """How many parts `rows` rows of ~`row_bytes` each are split into to fit `dedup.memory_mb`."""
    return min(MAX_PARTS, max(1, math.ceil(rows * row_bytes / (config["memory_mb"] * 1e6))))


# ---------------------------------------------------------------------------------------------
# band jobs: buckets -> candidate pairs

BAND_COLUMNS = ["hash", "id", "row", "text_hash"]
BAND_ORDER = ["hash", "id", "shard", "row"]  # a bucket's documents in representative order
BAND_ROW_BYTES = 500  # a bucket row in a band job's part, with the sort's copies and allocator slack (measured)
PAIR_SCHEMA = pa.schema([("a", pa.uint64()), ("b", pa.uint64())])  # document keys, a before b
PAIR_ROW_GROUP = 1 << 20  # pairs per row group: what the clusters job reads at a time
PAIRS_META = b"wetstone.pairs"  # metadata key: the band, and the shards that number the keys


def band_row_groups(index: pq.ParquetFile, path: str, band: int) -> range:
    groups = json.loads(index.schema_arrow.metadata[BAND_GROUPS])
    if band >= len(groups):
        raise ValueError(f"{path}: bucket index has {len(groups)} bands, no band {band}: written with other "
                         "dedup.bands? rerun dedup signatures")
    return range(sum(groups[:band]), sum(groups[:band + 1]))


def band_rows(path: str, band: int) -> int:
    with reading(path):
        index = pq.ParquetFile(path)
        return sum(index.metadata.row_group(g).num_rows for g in band_row_groups(index, path, band))


def read_band(path: str, band: int) -> Iterator[pl.DataFrame]:
    """Band `band` of one bucket index, a row group at a time."""
    with reading(path):
        index = pq.ParquetFile(path)
        groups = band_row_groups(index, path, band)
        starts = np.cumsum([0, *(index.metadata.row_group(g).num_rows for g in range(groups.stop))])
        scan = pl.scan_parquet(path).select(BAND_COLUMNS)
        for group in groups:  # polars reads only the row groups of a slice
            yield scan.slice(starts[group], starts[group + 1] - starts[group]).collect()


def band_parts(paths: list[str], band: int, parts: int, folder: Path) -> Iterator[pl.DataFrame]:
    """Band `band` of every shard's bucket index (a shard numbered by its place in `paths`) in
    `parts` frames of consecutive key ranges: whole buckets, every row once. The rows are read a
    row group at a time, and with several parts first set aside by part, so a job holds one part
    however many shards there are."""
    spill = Spill(parts, folder)
    for shard, path in enumerate(paths):
        for frame in read_band(path, band):
            frame = frame.with_columns(shard=pl.lit(shard, dtype=pl.UInt32))
            part = ((frame["hash"].to_numpy() >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)
            cuts = [0, *(np.flatnonzero(np.diff(part)) + 1), frame.height]  # the band is sorted by key
            for start, stop in zip(cuts, cuts[1:]):
                if stop > start:  # an empty band is one empty row group
                    spill.add(int(part[start]), frame.slice(start, stop - start))
    for part in range(parts):
        if (frame := spill.take(part)) is not None:
            yield frame


def shared_buckets(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows of buckets that several documents share (most buckets hold one), in representative
    order."""
    hashes = frame["hash"].to_numpy()
    order = np.argsort(hashes, kind="stable")
    hashes = hashes[order]
    same = hashes[1:] == hashes[:-1]
    return frame[order[np.r_[same, False] | np.r_[False, same]]].sort(BAND_ORDER)


def bucket_pairs(frame: pl.DataFrame, exact: bool, linear: bool) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (a, b) of document keys, a before b in representative order, of the buckets
    of `frame` (whole buckets, in representative order).

    Exact: each document pairs with the first of its text. A band: only the first document of
    each text takes part (its exact group's representative: equal texts share every bucket); each
    pairs with every later one, as a datasketch `MinHashLSH` query returns them, or, `linear`,
    only with the bucket's first: a bucket of n makes n - 1 pairs, not n(n - 1)/2, and when every
    pair is joined (`min_jaccard: null`) the clusters are the same."""
    keys = doc_keys(frame["shard"].to_numpy(), frame["row"].to_numpy())
    first = frame.with_row_index("at").select(pl.col("at").first().over("hash", "text_hash"))["at"].to_numpy()
    own = np.arange(len(first))
    if exact:
        later = first != own
        return keys[first[later]], keys[later]
    heads = np.flatnonzero(first == own)
    hashes = frame["hash"].to_numpy()[heads]
    start = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])  # each bucket's first head
    size = np.diff(np.r_[start, len(heads)])
    if linear:
        lead = np.repeat(start, size)
        later = lead != np.arange(len(heads))
        return keys[heads[lead[later]]], keys[heads[later]]
    after = np.repeat(start + size, size) - np.arange(len(heads)) - 1  # later heads in the same bucket
    i = np.repeat(np.arange(len(heads)), after)
    j = i + 1 + np.arange(len(i)) - np.repeat(np.cumsum(after) - after, after)
    return keys[heads[i]], keys[heads[j]]


def write_pairs(path: str, pairs: Iterable[tuple[np.ndarray, np.ndarray]], meta: dict[str, Any]) -> int:
    """Write pairs in row groups of PAIR_ROW_GROUP, cut by count only and each one contiguous, so
    the bytes do not depend on how the pairs came (parquet pages follow the chunks); return how many."""
    schema = PAIR_SCHEMA.with_metadata({PAIRS_META: json.dumps(meta, sort_keys=True)})
    held, count = [], 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=3,
                                                    write_statistics=False) as writer:
        for a, b in pairs:
            held.append(pa.table([a, b], schema=schema))
            count += len(a)
            if sum(t.num_rows for t in held) >= PAIR_ROW_GROUP:
                table = pa.concat_tables(held)
                whole = table.num_rows - table.num_rows % PAIR_ROW_GROUP
                writer.write_table(table.slice(0, whole).combine_chunks(), row_group_size=PAIR_ROW_GROUP)
                held = [table.slice(whole)]
        if count % PAIR_ROW_GROUP:
            writer.write_table(pa.concat_tables(held).combine_chunks(), row_group_size=PAIR_ROW_GROUP)
    return count


# ---------------------------------------------------------------------------------------------
# the clusters job: pairs -> checked pairs -> union-find -> representatives -> each shard's removed

REMOVED_SCHEMA = {"source": pl.String, "row": pl.Int64, "id": pl.String, "url": pl.String,
                  "duplicate_of": pl.String, "duplicate_of_url": pl.String, "reason": pl.String,
                  "similarity": pl.Float64}
EXAMPLE_COLUMNS = ["id", "url", "duplicate_of", "duplicate_of_url", "reason", "similarity"]
JOIN_ROW_BYTES = 4000  # a joined pair of documents with both signatures, ids and urls, and copies (measured)
NODE = np.int32  # a paired document's number in the clusters job: 2^31 of them at most
DOC_COLUMNS = ["id", "url", "text_hash", "signature"]


class Shards:
    """The signature files in shard-name order, checked against their manifests. The clusters
    job reads their columns for the rows document keys name, a row group at a time."""

    def __init__(self, paths: Iterable[str]):
        self.paths = by_shard(paths)
        self.names = [shard_name(p) for p in self.paths]
        self.groups = []  # per shard: the first row of each row group, then its row count
        for path in self.paths:
            check_file(path)
            with reading(path):
                meta = pq.ParquetFile(path).metadata
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.groups.append(np.cumsum([0, *sizes]))
        self.rows = np.array([starts[-1] for starts in self.groups], dtype=np.int64)
        self._cached: tuple[tuple, pl.DataFrame] | None = None

    def read(self, shard: int, rows: np.ndarray, columns: list[str]) -> pl.DataFrame:
        """`columns` of the given (sorted) rows of one shard."""
        starts = self.groups[shard]
        group = np.searchsorted(starts, rows, side="right") - 1
        cuts = [0, *(np.flatnonzero(np.diff(group)) + 1), len(rows)]
        frame = pl.concat([self._group(shard, int(group[lo]), columns)[rows[lo:hi] - starts[group[lo]]]
                           for lo, hi in zip(cuts, cuts[1:])])
        if not np.array_equal(frame["row"].to_numpy(), rows):
            raise ValueError(f"{self.paths[shard]}: rows not numbered by their place; not a file "
                             "`dedup signatures` wrote")
        return frame.drop("row")

    def _group(self, shard: int, group: int, columns: list[str]) -> pl.DataFrame:
        """One row group's columns (the last one read stays cached)."""
        key = (shard, group, tuple(columns))
        if self._cached is None or self._cached[0] != key:
            self._cached = None  # freed before the next is read
            start, stop = self.groups[shard][group:group + 2]
            with reading(self.paths[shard]):  # polars reads only the row groups of a slice
                frame = pl.scan_parquet(self.paths[shard]).slice(start, stop - start).select("row", *columns).collect()
            self._cached = (key, frame)
        return self._cached[1]

    def fetch(self, keys: np.ndarray, columns: list[str]) -> pl.DataFrame:
        """`columns` of the documents of sorted `keys`, in their order."""
        return pl.concat([self.read(shard, key_row(keys[lo:hi]), columns) for shard, lo, hi in shard_runs(keys)])


def shard_runs(keys: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(shard, start, stop) of each run of one shard in sorted document keys."""
    shard = key_shard(keys)
    cuts = [0, *(np.flatnonzero(np.diff(shard)) + 1), len(keys)]
    for start, stop in zip(cuts, cuts[1:]):
        if stop > start:
            yield int(shard[start]), start, stop


def pair_files(paths: Iterable[str], shards: Shards) -> tuple[list[str], list[str]]:
    """The exact job's pair file and the LSH bands', each checked against its manifest and against
    the shards its keys number."""
    exact, bands = [], []
    digest = shards_digest(shards.names)
    for path in sorted(paths):
        check_file(path)
        with reading(path):
            meta = json.loads(pq.ParquetFile(path).schema_arrow.metadata[PAIRS_META])
        if meta["shards_sha256"] != digest:
            raise ValueError(f"{path}: pairs numbered over other shards ({meta['shards']}) than the "
                             f"{len(shards.names)} signature files given; rerun dedup band")
        (exact if meta["band"] == EXACT else bands).append(path)
    return exact, bands


def read_pairs(path: str, shards: Shards) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The pairs of one pair file, a row group at a time; a key naming no document stops the job."""
    with reading(path):
        scan = pl.scan_parquet(path)
        for start in range(0, pq.ParquetFile(path).metadata.num_rows, PAIR_ROW_GROUP):
            pairs = scan.slice(start, PAIR_ROW_GROUP).collect()
            a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
            for keys in (a, b):
                shard, row = key_shard(keys), key_row(keys)
                bad = (shard >= len(shards.rows)) | (row >= shards.rows[np.minimum(shard, len(shards.rows) - 1)])
                if bad.any():
                    raise ValueError(f"{path}: pair names shard {shard[bad][0]} row {row[bad][0]}, which no "
                                     "signature file holds; rerun dedup band")
            yield a, b


def sorted_union(chunks: Iterable[np.ndarray]) -> np.ndarray:
    """The distinct values of all chunks, sorted. Chunks are merged in whenever those waiting
    reach a quarter of the merged set: memory stays ~2.5 times the result (20 bytes a value),
    the work O(n log n)."""
    arrays, waiting = [np.zeros(0, np.uint64)], 0
    for chunk in chunks:
        arrays.append(np.unique(chunk))
        waiting += len(arrays[-1])
        if waiting >= max(len(arrays[0]) // 4, 1 << 20):
            arrays, waiting = [distinct(arrays)], 0
    return distinct(arrays)


def distinct(arrays: list[np.ndarray]) -> np.ndarray:
    """The sorted distinct values of `arrays`, which it empties (so each is freed once copied)."""
    values = np.concatenate(arrays)
    arrays.clear()
    values.sort()
    first = np.ones(len(values), bool)
    first[1:] = values[1:] != values[:-1]
    return values[first]


def nodes_of(keys: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """The node numbers of documents (keys all in the sorted `keys`)."""
    return np.searchsorted(keys, doc).astype(NODE)


def find(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """The root of each node in the forest `parent`."""
    root = parent[nodes]
    while not np.array_equal(up := parent[root], root):
        root = up
    return root


def union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[i] and b[i] for every i, in place. A root is only ever hooked under a
    smaller one, so a set's root is its smallest node, whatever the order of the pairs."""
    while len(a):
        ra, rb = find(parent, a), find(parent, b)
        parent[a], parent[b] = ra, rb  # shorten the paths walked
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def join_rows(x: np.ndarray, y: np.ndarray, keys: np.ndarray, shards: Shards, x_columns: list[str],
              y_columns: list[str], config: dict[str, Any],
              folder: Path) -> Iterator[tuple[np.ndarray, pl.DataFrame, pl.DataFrame | None]]:
    """Record i joins documents x[i] and y[i] (indices into the sorted document `keys`). Yields
    (records, x's columns, y's columns or None if none asked) in y order, a part at a time: x's
    columns are read shard by shard in x order and set aside by y's part, then each part is read
    back and joined with y's columns. Memory holds a part (`dedup.memory_mb`) and a row group of
    one shard."""
    if len(x) == 0:
        return
    parts = min(len(x), parts_of(len(x), JOIN_ROW_BYTES, config))
    part = np.empty(len(x), np.int32)
    part[np.argsort(y, kind="stable")] = np.repeat(np.arange(parts, dtype=np.int32), np.diff(
        np.arange(parts + 1) * len(x) // parts))  # y's place in y order, cut into `parts` equal runs
    spill = Spill(parts, folder)
    by_x = np.argsort(x, kind="stable").astype(np.int32)
    shard_start = np.searchsorted(keys, np.arange(len(shards.paths) + 1, dtype=np.uint64) << np.uint64(32))
    cuts, step = np.searchsorted(x[by_x], shard_start), -(-len(x) // parts)
    for shard in range(len(shards.paths)):
        for start in range(cuts[shard], cuts[shard + 1], step):
            records = by_x[start:min(cuts[shard + 1], start + step)]
            frame = shards.read(shard, key_row(keys[x[records]]), x_columns).with_columns(record=records)
            order = np.argsort(part[records], kind="stable")
            bounds = [0, *(np.flatnonzero(np.diff(part[records][order])) + 1), len(records)]
            for begin, end in zip(bounds, bounds[1:]):
                spill.add(int(part[records[order[begin]]]), frame[order[begin:end]])
    del by_x, part
    for p in range(parts):
        frame = spill.take(p)
        records = frame["record"].to_numpy()
        order = np.argsort(y[records], kind="stable")
        records = records[order]
        yield (records, frame[order].drop("record"),
               shards.fetch(keys[y[records]], y_columns) if y_columns else None)


def check_pairs(a: np.ndarray, b: np.ndarray, keys: np.ndarray, shards: Shards, config: dict[str, Any],
                folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(checked, joined) for each LSH pair: checked when the two signatures agree in a whole band
    (not just its 64-bit key, which two bands can share by chance), joined when checked and their
    estimated Jaccard similarity reaches `min_jaccard` (null: always)."""
    checked, joined = np.zeros(len(a), bool), np.zeros(len(a), bool)
    for records, first, later in join_rows(a, b, keys, shards, ["signature"], ["signature"], config, folder):
        equal = first["signature"].to_numpy() == later["signature"].to_numpy()
        same_band = equal.reshape(len(records), config["bands"], config["rows"]).all(axis=2).any(axis=1)
        checked[records] = same_band
        similar = True if config["min_jaccard"] is None else np.mean(equal, axis=1) >= config["min_jaccard"]
        joined[records] = same_band & similar
    return checked, joined


def representatives(label: np.ndarray, later: np.ndarray, keys: np.ndarray, shards: Shards,
                    config: dict[str, Any], folder: Path) -> np.ndarray:
    """Each document's representative: the first of its cluster in (id, shard, row) order. Pairs
    name their documents in that order, so the first is never the later end of a joined pair: only
    such documents are candidates, and ids are read only where a cluster has several, joined to
    their cluster a part at a time."""
    candidate = np.flatnonzero(~later).astype(NODE)
    cluster = np.sort(label[candidate])
    several = np.zeros(len(label), bool)  # clusters with several candidates
    several[cluster[1:][cluster[1:] == cluster[:-1]]] = True
    del cluster
    rep = np.empty(len(label), NODE)
    alone = candidate[~several[label[candidate]]]
    rep[label[alone]] = alone
    tied = candidate[several[label[candidate]]]
    del candidate, alone, several
    best = pl.DataFrame(schema={"label": pl.Int32, "id": pl.String, "node": pl.Int32})  # a cluster that may go on
    for records, ids, _ in join_rows(tied, label[tied], keys, shards, ["id"], [], config, folder):
        frame = pl.concat([best, pl.DataFrame({"label": label[tied[records]], "id": ids["id"], "node": tied[records]})])
        first = frame.sort("label", "id", "node").group_by("label", maintain_order=True).first()
        rep[first["label"].to_numpy()] = first["node"].to_numpy()
        best = pl.DataFrame(first.tail(1).to_dicts(), schema=best.schema)  # a copy: a slice keeps every buffer
    return rep[label]


def removed_rows(rep: np.ndarray, keys: np.ndarray, shards: Shards, config: dict[str, Any],
                 folder: Path) -> Iterator[tuple[int, pl.DataFrame]]:
    """(shard, its removed documents) in (shard, row) order, a part at a time: every document that
    is not its cluster's representative, with the representative it duplicates, `exact_duplicate`
    when their texts are equal, and their estimated Jaccard similarity."""
    members = np.flatnonzero(rep != np.arange(len(rep), dtype=NODE)).astype(NODE)
    for records, kept, gone in join_rows(rep[members], members, keys, shards, DOC_COLUMNS, DOC_COLUMNS, config,
                                         folder):
        node_keys = keys[members[records]]
        same = (kept["text_hash"] == gone["text_hash"]).to_numpy()
        similarity = np.where(same, 1.0, np.mean(kept["signature"].to_numpy() == gone["signature"].to_numpy(), axis=1))
        frame = pl.DataFrame({
            "shard": key_shard(node_keys), "row": key_row(node_keys),
            "id": gone["id"], "url": gone["url"], "duplicate_of": kept["id"], "duplicate_of_url": kept["url"],
            "reason": pl.Series(np.where(same, "exact_duplicate", "near_duplicate"), dtype=pl.String),
            "similarity": pl.Series(similarity, dtype=pl.Float64),
        })
        for shard, lo, hi in shard_runs(node_keys):
            part = frame[lo:hi].drop("shard")
            yield shard, part.select(pl.lit(shards.names[shard]).alias("source"), pl.all())


def write_clusters(removed: Iterator[tuple[int, pl.DataFrame]], shards: Shards, output: str,
                   config: dict[str, Any]) -> dict[str, int]:
    """Each shard's removed documents as `<output>/<shard>.parquet` with its own manifest (what
    its dedup filter job checks), also for a shard with none; return path -> rows."""
    written: dict[str, int] = {}

    def write(shard: int, frames: list[pl.DataFrame]) -> None:
        frame = pl.concat(frames, rechunk=True) if frames else pl.DataFrame(schema=REMOVED_SCHEMA)  # see write_pairs
        path = str(Path(output) / f"{shards.names[shard]}.parquet")
        write_frame(path, frame)
        write_manifest(Path(output) / f"{shards.names[shard]}.manifest.json", stage="dedup", config=config,
                       inputs=[], outputs={path: frame.height}, counts={"removed": frame.height})
        written[path] = frame.height

    shard, held = 0, []
    for at, frame in removed:
        while shard < at:
            write(shard, held)
            shard, held = shard + 1, []
        held.append(frame)
    for shard in range(shard, len(shards.names)):
        write(shard, held)
        held = []
    return written


def run_clusters(signature_files: list[str], pair_paths: list[str], *, output: str, manifest: str,
                 config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shards = Shards(signature_files)
    docs = int(shards.rows.sum())
    if docs == 0:
        log.warning("dedup: no documents reached dedup (every one was dropped upstream)")
    exact, bands = pair_files(pair_paths, shards)
    # every paired document, numbered in key order: the union-find's nodes
    keys = sorted_union(np.concatenate(pair) for path in exact + bands for pair in read_pairs(path, shards))
    parent = np.arange(len(keys), dtype=NODE)
    later = np.zeros(len(keys), bool)  # the later end of a joined pair: not its cluster's representative
    for path in exact:
        for a, b in read_pairs(path, shards):
            a, b = nodes_of(keys, a), nodes_of(keys, b)
            union(parent, a, b)
            later[b] = True
    edges = sorted_union((nodes_of(keys, a).astype(np.uint64) << np.uint64(32)) | nodes_of(keys, b).astype(np.uint64)
                         for path in bands for a, b in read_pairs(path, shards))  # once, however many bands
    a, b = (edges >> np.uint64(32)).astype(NODE), (edges & np.uint64(0xFFFFFFFF)).astype(NODE)
    del edges
    with scratch(output) as folder:
        checked, joined = check_pairs(a, b, keys, shards, config, folder)
        union(parent, a[joined], b[joined])
        later[b[joined]] = True
        del a, b, joined
        label = find(parent, np.arange(len(keys), dtype=NODE))
        del parent
        rep = representatives(label, later, keys, shards, config, folder)
        del later
        size = np.bincount(label)
        sizes = Counter(size[size > 0].tolist())
        del label, size
        reasons: Counter = Counter()
        shown = pl.DataFrame(schema={k: REMOVED_SCHEMA[k] for k in EXAMPLE_COLUMNS})

        def tally(removed: Iterator[tuple[int, pl.DataFrame]]) -> Iterator[tuple[int, pl.DataFrame]]:
            nonlocal shown
            for shard, frame in removed:
                reasons.update(frame["reason"].to_list())
                shown = example_frame(pl.concat([shown, frame.select(EXAMPLE_COLUMNS)]), config["example_pairs"])
                shown = pl.DataFrame(shown.to_dicts(), schema=shown.schema)  # a copy: a slice keeps every buffer
                yield shard, frame

        written = write_clusters(tally(removed_rows(rep, keys, shards, config, folder)), shards, output, config)
    sizes[1] += docs - len(keys)  # documents in no pair are clusters of one
    removed = sum(reasons.values())
    stats = {
        "docs": docs,
        "clusters": docs - removed,
        "lsh_pairs_checked": int(checked.sum()),
        "removed": dict(sorted(reasons.items())),
        "cluster_sizes": {str(size): n for size, n in sorted(sizes.items()) if n},
        "example_pairs": shown.to_dicts(),
    }
    log.info("dedup: %d docs in %d clusters, removed %s", stats["docs"], stats["clusters"], stats["removed"])
    write_manifest(manifest, stage="dedup", config=config, inputs=[*shards.paths, *sorted(pair_paths)],
                   outputs=written, counts={"docs": docs, "removed": stats["removed"]}, metrics=stats)


def example_frame(removed: pl.DataFrame, n: int) -> pl.DataFrame:
    """The least similar near duplicates (the interesting ones to eyeball), then exact ones; ties
    in the order given (a stable sort, so taking these from each part in turn gives the same)."""
    return (removed.sort(["reason", "similarity", "id"], descending=[True, False, False], maintain_order=True)
            .select(EXAMPLE_COLUMNS).head(n))


def cluster(table: pl.DataFrame, config: dict[str, Any]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Every step on one signature table (tests, benchmarks), as the workflow runs them: a signature
    file and bucket index per `source`, the band jobs, then the clusters job. Returns the removed
    documents in (source, row) order and the statistics."""
    config = section_config("dedup", config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for (name,), part in sorted(table.partition_by("source", as_dict=True).items()):
            part = part.sort("row")
            sig, buckets = root / f"signatures/{name}.parquet", root / f"buckets/{name}.parquet"
            write_frame(str(sig), part)
            write_buckets(str(buckets), bucket_tables(part, config))
            write_manifest(root / f"signatures/{name}.manifest.json", stage="dedup_signatures", config=config,
                           inputs=[], outputs={sig: part.height, buckets: None})
        shards = by_shard(str(p) for p in (root / "signatures").glob("*.parquet"))
        upstream = [str(Path(p).with_suffix(".manifest.json")) for p in shards]
        pairs = []
        for band in [*map(str, range(config["bands"])), EXACT]:
            pairs.append(str(root / f"pairs/{band}.parquet"))
            run_band([p.replace("/signatures/", "/buckets/") for p in shards], band, upstream=upstream,
                     output=pairs[-1], manifest=str(root / f"pairs/{band}.manifest.json"), config=config)
        run_clusters(shards, pairs, output=str(root / "clusters"), manifest=str(root / "manifest.json"), config=config)
        removed = [pl.read_parquet(root / f"clusters/{shard_name(p)}.parquet") for p in shards]
        stats = read_manifest(root / "manifest.json")["metrics"]
    return pl.concat(removed) if removed else pl.DataFrame(schema=REMOVED_SCHEMA), stats


# ---------------------------------------------------------------------------------------------
# the commands

def write_frame(path: str, frame: pl.DataFrame) -> None:
    """In row groups of FRAME_ROW_GROUP rows: the clusters job reads signatures a row group at a time."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, compression="zstd", compression_level=3, statistics=False,
                            row_group_size=FRAME_ROW_GROUP)


def run_signatures(docs_in: str, *, output: str, buckets: str, manifest: str, config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    shard = shard_name(docs_in)
    parts, row = [], 0
    batches = iter_batches(docs_in, config["batch_size"], columns=["id", "url", "text"])  # only what dedup needs
    for docs in tqdm(batches, desc=f"dedup signatures {shard}", unit="batch", disable=None):
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
    manifests = {shard_name(m).removesuffix(".manifest.json"): m for m in upstream}
    paths = by_shard(bucket_files)
    for path in paths:
        if shard_name(path) not in manifests:
            raise ValueError(f"dedup band: no --upstream manifest {shard_name(path)}.manifest.json for {path}")
        check_file(path, manifests[shard_name(path)])
    parts = parts_of(sum(band_rows(p, number) for p in paths), BAND_ROW_BYTES, config)
    names = [shard_name(p) for p in paths]
    with scratch(output) as folder:
        tables = tqdm(band_parts(paths, number, parts, folder), total=parts, desc=f"dedup band {band}",
                      unit="part", disable=None)
        count = write_pairs(output, (bucket_pairs(shared_buckets(table), exact=band == EXACT,
                                                  linear=config["min_jaccard"] is None) for table in tables),
                            {"band": band, "shards": len(names), "shards_sha256": shards_digest(names)})
    write_manifest(manifest, stage="dedup_band", config=config, inputs=paths,
                   outputs={output: count}, counts={"pairs": count}, metrics={"band": band})


def run_filter(docs_in: str, clusters: str, *, output: str, removed: str, manifest: str,
               config: dict[str, Any]) -> None:
    config = section_config("dedup", config)
    if shard_name(clusters) != shard_name(docs_in):
        raise ValueError(f"dedup filter: --clusters {clusters} is not the clusters file of {docs_in}")
    mine = read_frame(clusters, columns=["row", "id", "duplicate_of", "reason"])  # this shard's, checked
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
    clu.add_argument("--output", required=True, help="a folder: each shard's removed documents with their "
                     "representative, <shard>.parquet and <shard>.manifest.json")
    for step in (sig, band, clu):
        step.add_argument("--manifest", required=True)
        step.add_argument("--config", type=json_arg, default={}, help="the `dedup` config section as JSON")
    fil = steps.add_parser("filter", help="drop one shard's duplicates")
    add_stage_arguments(fil, config_help="the `dedup` config section as JSON")
    fil.add_argument("--clusters", required=True, help="this shard's file of `dedup clusters`")


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

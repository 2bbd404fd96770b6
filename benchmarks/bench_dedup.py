"""Dedup at crawl scale: peak memory and time of every clustering job on synthetic signatures.

    .venv/bin/python -m benchmarks.bench_dedup --docs 1000000 10000000   # writes `Dedup at scale` in docs/benchmarks.md

No text is MinHashed (signatures of 1 M documents would take ~20 min): each shard job draws
`--shard-docs` signatures, with `--exact` of the documents exact copies and `--near` near copies
(each permutation kept with probability U(0.75, 0.95), so a near copy shares a band with its
original with probability ~0.2-0.7) of a random earlier document of any shard, then writes the
signatures, the bucket index and the manifest with the code `dedup signatures` runs. Then the
band jobs and the clusters job run as `python -m pipeline dedup ...`, one process each, one at a
time; peak RSS is each process's own (wait4), so the figures are per job.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import machine, write_section
from pipeline.artifacts import read_manifest, write_manifest
from pipeline.config import section_config
from pipeline.data.dedup import EXACT, bucket_tables, write_buckets, write_frame

MASK64 = (1 << 64) - 1


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a document's values are a pure function of its number, so any shard job can
    rebuild the original of a copy without the other shards."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def original(doc: np.ndarray, perm: int) -> np.ndarray:
    """The signatures of documents numbered `doc`, as drawn: (len(doc), perm) uint32."""
    return (mix(doc[:, None].astype(np.uint64) * np.uint64(perm) + np.arange(perm, dtype=np.uint64))
            >> np.uint64(32)).astype(np.uint32)


def kind(doc: np.ndarray) -> np.ndarray:
    """A uniform draw per document number: under `exact` an exact copy, then under `exact + near`
    a near copy, else an original (a pure function, so any job knows which documents are originals)."""
    return (mix(doc.astype(np.uint64) + np.uint64(1 << 42)) >> np.uint64(11)).astype(np.float64) / 2.0**53


def make_shard(root: Path, shard: int, docs: int, exact: float, near: float, config: dict) -> None:
    """One shard's signatures, bucket index and manifest (what `dedup signatures` writes)."""
    perm = config["bands"] * config["rows"]
    rng = np.random.default_rng(shard)
    number = np.arange(shard * docs, (shard + 1) * docs, dtype=np.int64)
    draw = kind(number)
    copy = draw < exact + near
    source = number.copy()  # a copy's original: a random earlier document that is an original
    for _ in range(30):
        redo = copy & ((source == number) | (kind(source) < exact + near))
        source[redo] = rng.integers(0, np.maximum(number[redo], 1))
    copy &= (source != number) & (kind(source) >= exact + near)  # the few left without one stay originals
    is_near = copy & (draw >= exact)
    values = original(source, perm)
    redraw = rng.random((docs, perm)) > rng.uniform(0.75, 0.95, (docs, 1))
    values = np.where(is_near[:, None] & redraw, original(number + (1 << 40), perm), values)
    text = np.where(is_near, number, source)  # an exact copy has its original's text hash
    name = f"shard{shard:05d}"
    frame = pl.DataFrame({
        "source": pl.Series([name] * docs, dtype=pl.String),
        "row": np.arange(docs, dtype=np.int64),
        "id": [f"<urn:uuid:{h:032x}>" for h in mix(number.astype(np.uint64) + np.uint64(1 << 41)).tolist()],
        "url": [f"https://example.com/{n}" for n in number.tolist()],
        "text_hash": [f"{h:016x}{n:016x}" for h, n in zip(mix(text.astype(np.uint64)).tolist(), text.tolist())],
        "has_signature": np.ones(docs, dtype=bool),
        "signature": pl.Series(values, dtype=pl.Array(pl.UInt32, perm)),
    })
    output, buckets = root / f"signatures/{name}.parquet", root / f"buckets/{name}.parquet"
    write_frame(str(output), frame)
    write_buckets(str(buckets), bucket_tables(frame, config))
    write_manifest(root / f"signatures/{name}.manifest.json", stage="dedup_signatures", config=config,
                   inputs=[], outputs={output: docs, buckets: None}, counts={"docs": docs})


def timed_job(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({status})")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def run_scale(root: Path, docs: int, shard_docs: int, exact: float, near: float) -> list[tuple]:
    """Rows of (job, count, seconds each (mean), total seconds, max peak MB) for one crawl size."""
    config = section_config("dedup", {})
    py = [sys.executable, "-m"]
    shards = docs // shard_docs
    shard_runs = [timed_job([*py, "benchmarks.bench_dedup", "--make-shard", str(s), "--root", str(root),
                             "--shard-docs", str(shard_docs), "--exact", str(exact), "--near", str(near)])
                  for s in range(shards)]
    buckets = sorted(str(p) for p in (root / "buckets").glob("*.parquet"))
    manifests = sorted(str(p) for p in (root / "signatures").glob("*.manifest.json"))
    bands = [*map(str, range(config["bands"])), EXACT]
    band_runs = [timed_job([*py, "pipeline", "dedup", "band", "--band", band, "--input", *buckets,
                            "--upstream", *manifests, "--output", str(root / f"pairs/{band}.parquet"),
                            "--manifest", str(root / f"pairs/{band}.manifest.json")]) for band in bands]
    signatures = sorted(str(p) for p in (root / "signatures").glob("*.parquet"))
    pairs = [str(root / f"pairs/{band}.parquet") for band in bands]
    cluster_run = timed_job([*py, "pipeline", "dedup", "clusters", "--input", *signatures, "--pairs", *pairs,
                             "--output", str(root / "clusters.parquet"), "--manifest", str(root / "manifest.json")])
    metrics = read_manifest(root / "manifest.json")["metrics"]
    pair_rows = sum(read_manifest(root / f"pairs/{band}.manifest.json")["counts"]["pairs"] for band in bands)
    disk = {folder: sum(p.stat().st_size for p in (root / folder).glob("*.parquet")) / 1e6
            for folder in ("signatures", "buckets", "pairs")}

    def row(job, runs):
        seconds = [s for s, _ in runs]
        return (job, len(runs), sum(seconds) / len(runs), sum(seconds), max(mb for _, mb in runs))
    return [row(f"shard ({shard_docs:,} docs: signatures + bucket index written)", shard_runs),
            row("band (14 LSH + exact)", band_runs), row("clusters (union-find)", [cluster_run]),
            {"pair_rows": pair_rows, "lsh_pairs_checked": metrics["lsh_pairs_checked"],
             "removed": metrics["removed"], "disk_mb": disk}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--shard-docs", type=int, default=100_000, help="documents per shard (a WET file has ~30-40k)")
    parser.add_argument("--exact", type=float, default=0.10, help="fraction of documents that are exact copies")
    parser.add_argument("--near", type=float, default=0.10, help="fraction that are near copies")
    parser.add_argument("--make-shard", type=int, help=argparse.SUPPRESS)  # one shard job (run by this script)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.make_shard is not None:
        make_shard(Path(args.root), args.make_shard, args.shard_docs, args.exact, args.near,
                   section_config("dedup", {}))
        return
    lines = [f"`python -m benchmarks.bench_dedup --docs {' '.join(map(str, args.docs))}` on {machine()}; "
             f"synthetic signatures, {args.exact:.0%} exact and {args.near:.0%} near copies of a random earlier "
             f"document, {args.shard_docs:,} documents per shard; each job a process of its own, run one at a time.",
             "", "| documents | job | jobs | s per job | s total | peak RSS per job (MB) |", "|---|---|---|---|---|---|"]
    notes = []
    for docs in args.docs:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            *rows, info = run_scale(Path(tmp), docs, args.shard_docs, args.exact, args.near)
        for job, n, each, total, mb in rows:
            lines.append(f"| {docs:,} | {job} | {n} | {each:.1f} | {total:.0f} | {mb:,.0f} |")
        notes.append(f"- {docs:,} documents: {info['pair_rows']:,} candidate pair rows over the 15 band files, "
                     f"{info['lsh_pairs_checked']:,} distinct LSH pairs checked, removed {info['removed']}; on disk "
                     + ", ".join(f"{k} {v:,.0f} MB" for k, v in info["disk_mb"].items()) + ".")
        print("\n".join(lines + notes), flush=True)
    if not args.no_write:
        write_section("Dedup at scale", "\n".join(lines + [""] + notes))


if __name__ == "__main__":
    main()

"""Dedup at crawl scale: peak memory and time of every clustering job on synthetic signatures.

    .venv/bin/python -m benchmarks.bench_dedup --docs 1000000 10000000
    # writes `Dedup at scale` in docs/benchmarks.md
    .venv/bin/python -m benchmarks.bench_dedup --docs 1000000 --shards 100 1000 3000
    # writes `Dedup band jobs and shard count`

No text is MinHashed (signatures of 1 M documents would take ~20 min): each shard draws
`--shard-docs` signatures, with `--exact` of the documents exact copies and `--near` near copies
(each permutation kept with probability U(0.75, 0.95), so a near copy shares a band with its
original with probability ~0.2-0.7) of a random earlier document of any shard, then writes the
signatures, the bucket index and the manifest with the code `dedup signatures` runs. One process
writes every shard (the first is also timed as a job of its own). Then the band jobs and the
clusters job run as `python -m pipeline dedup ...`, one process each, one at a time; peak RSS is
each process's own (wait4), so the figures are per job.

Paired documents are the distinct documents named by any candidate pair. "Per paired document"
is the clusters job's peak RSS above its start-up (the same job's peak on one shard of 10,000
documents), divided by the paired documents.

`--baseline PATH` also runs the band and clusters jobs of another checkout (e.g. `git worktree add
/tmp/base <commit>`) on the same shards, right after ours (`--baseline-docs`: up to that size),
and says whether both remove the same documents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from benchmarks.common import machine, write_section
from pipeline.artifacts import read_manifest, write_manifest
from pipeline.config import section_config
from pipeline.data.dedup import EXACT, bucket_tables, sorted_union, write_buckets, write_frame

MASK64 = (1 << 64) - 1
ROOT = Path(__file__).resolve().parent.parent


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


def shard_frame(shard: int, docs: int, exact: float, near: float, perm: int) -> pl.DataFrame:
    """One shard's signature table, as `dedup signatures` would write it."""
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
    return pl.DataFrame({
        "source": pl.Series([f"shard{shard:05d}"] * docs, dtype=pl.String),
        "row": np.arange(docs, dtype=np.int64),
        "id": [f"<urn:uuid:{h:032x}>" for h in mix(number.astype(np.uint64) + np.uint64(1 << 41)).tolist()],
        "url": [f"https://example.com/{n}" for n in number.tolist()],
        "text_hash": [f"{h:016x}{n:016x}" for h, n in zip(mix(text.astype(np.uint64)).tolist(), text.tolist())],
        "has_signature": np.ones(docs, dtype=bool),
        "signature": pl.Series(values, dtype=pl.Array(pl.UInt32, perm)),
    })


def make_shard(root: Path, shard: int, docs: int, exact: float, near: float, config: dict) -> None:
    """One shard's signatures, bucket index and manifest (what `dedup signatures` writes)."""
    frame = shard_frame(shard, docs, exact, near, config["bands"] * config["rows"])
    name = f"shard{shard:05d}"
    output, buckets = root / f"signatures/{name}.parquet", root / f"buckets/{name}.parquet"
    write_frame(str(output), frame)
    write_buckets(str(buckets), bucket_tables(frame, config))
    write_manifest(root / f"signatures/{name}.manifest.json", stage="dedup_signatures", config=config,
                   inputs=[], outputs={output: docs, buckets: None}, counts={"docs": docs})


def make_shards(root: Path, shards: range, shard_docs: int, exact: float, near: float) -> Job:
    """Write `shards` in one child process."""
    return timed_job([sys.executable, "-m", "benchmarks.bench_dedup", "--make-shards", str(shards.start),
                      str(shards.stop), "--root", str(root), "--shard-docs", str(shard_docs), "--exact", str(exact),
                      "--near", str(near)], cwd=ROOT)


class Job(NamedTuple):
    seconds: float  # wall
    cpu: float  # user + system seconds: what other load on a shared machine inflates less
    mb: float  # peak RSS


def timed_job(cmd: list[str], cwd: Path) -> Job:
    """Wall and CPU seconds and peak RSS of one child process, as /usr/bin/time reports them: a
    child forked from this process would count this process's pages in its peak too (Linux keeps
    the high-water mark across exec)."""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        result = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", report.name, *cmd], cwd=cwd,
                                stdout=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({result.returncode})")
        user, system, kb = report.read().split()[-3:]
        return Job(time.perf_counter() - start, float(user) + float(system), int(kb) / 1024)


def dedup_jobs(root: Path, out: Path, checkout: Path, old: bool, memory_mb: int | None = None) -> dict:
    """The 15 band jobs, then the clusters job, of the code in `checkout` (`old`: clusters writes one
    file), one process each; their times and peaks, and the removed ids. `memory_mb` overrides
    `dedup.memory_mb` in every job."""
    py = [sys.executable, "-m", "pipeline", "dedup"]
    job_config = ["--config", json.dumps({"memory_mb": memory_mb})] if memory_mb else []
    buckets = sorted(str(p) for p in (root / "buckets").glob("*.parquet"))
    manifests = sorted(str(p) for p in (root / "signatures").glob("*.manifest.json"))
    signatures = sorted(str(p) for p in (root / "signatures").glob("*.parquet"))
    config = section_config("dedup", {})
    bands = [*map(str, range(config["bands"])), EXACT]
    band_runs = [timed_job([*py, "band", "--band", band, "--input", *buckets, "--upstream", *manifests,
                            "--output", str(out / f"pairs/{band}.parquet"),
                            "--manifest", str(out / f"pairs/{band}.manifest.json"), *job_config], checkout)
                 for band in bands]
    pairs = [str(out / f"pairs/{band}.parquet") for band in bands]
    clusters = out / ("clusters.parquet" if old else "clusters")
    cluster_run = timed_job([*py, "clusters", "--input", *signatures, "--pairs", *pairs, "--output", str(clusters),
                             "--manifest", str(out / "manifest.json"), *job_config], checkout)
    removed = pl.read_parquet(clusters if old else clusters / "*.parquet")["id"].sort()
    return {"bands": band_runs, "clusters": cluster_run, "removed": removed,
            "metrics": read_manifest(out / "manifest.json")["metrics"],
            "pair_rows": sum(read_manifest(out / f"pairs/{b}.manifest.json")["counts"]["pairs"] for b in bands),
            "paired": None if old else paired_documents(pairs)}


def paired_documents(pair_files: list[str]) -> int:
    return len(sorted_union(np.concatenate([frame["a"].to_numpy(), frame["b"].to_numpy()])
                            for frame in map(pl.read_parquet, pair_files)))


def start_up(shard_docs: int, exact: float, near: float, memory_mb: int | None) -> float:
    """The clusters job's peak RSS on one shard of 10,000 documents: what it holds whatever the size."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        make_shards(root, range(1), 10_000, exact, near)
        return dedup_jobs(root, root / "new", ROOT, old=False, memory_mb=memory_mb)["clusters"].mb


def run_size(root: Path, docs: int, shard_docs: int, exact: float, near: float, baseline: Path | None,
             memory_mb: int | None) -> dict:
    """Every job on `docs` documents in shards of `shard_docs` (written to `root` unless already there)."""
    shards = docs // shard_docs
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        first = make_shards(Path(tmp), range(1), shard_docs, exact, near)
    if not (root / f"signatures/shard{shards - 1:05d}.manifest.json").exists():
        make_shards(root, range(shards), shard_docs, exact, near)
    ours = dedup_jobs(root, root / "new", ROOT, old=False, memory_mb=memory_mb)
    theirs = dedup_jobs(root, root / "old", baseline, old=True) if baseline else None
    disk = {folder: sum(p.stat().st_size for p in (root / folder).glob("*.parquet")) / 1e6
            for folder in ("signatures", "buckets", "new/pairs")}
    return {"docs": docs, "shards": shards, "shard_job": first, "ours": ours, "theirs": theirs, "disk": disk}


def peak(runs: list[Job]) -> str:
    """Mean wall and CPU seconds per job, and the largest peak."""
    return (f"{sum(r.seconds for r in runs) / len(runs):.1f} | {sum(r.cpu for r in runs) / len(runs):.1f} | "
            f"{max(r.mb for r in runs):,.0f}")


def scale_section(results: list[dict], startup: float, args: argparse.Namespace) -> str:
    memory = f" --memory-mb {args.memory_mb}" if args.memory_mb else ""
    lines = [f"`python -m benchmarks.bench_dedup --docs {' '.join(map(str, args.docs))}{memory}` on {machine()}; "
             f"synthetic signatures, {args.exact:.0%} exact and {args.near:.0%} near copies of a random earlier "
             f"document, {args.shard_docs:,} documents per shard; each job a process of its own, run one at a "
             f"time. The clusters job's start-up (its peak on 10,000 documents): {startup:,.0f} MB.", "",
             "| documents | paired documents | job | jobs | s per job | CPU s per job | peak RSS per job (MB) "
             "| per paired document |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        ours, docs = r["ours"], f"{r['docs']:,}"
        paired = ours["paired"]
        per_doc = (ours["clusters"].mb - startup) * 2**20 / paired
        lines += [f"| {docs} | | shard (signatures + bucket index written) | 1 | {peak([r['shard_job']])} | |",
                  f"| {docs} | | band (14 LSH + exact) | 15 | {peak(ours['bands'])} | |",
                  f"| {docs} | {paired:,} | clusters | 1 | {peak([ours['clusters']])} | {per_doc:.0f} B |"]
        if r["theirs"]:
            theirs = r["theirs"]
            lines += [f"| {docs} | | band, baseline | 15 | {peak(theirs['bands'])} | |",
                      f"| {docs} | | clusters, baseline | 1 | {peak([theirs['clusters']])} | "
                      f"{(theirs['clusters'].mb - startup) * 2**20 / paired:.0f} B |"]
        same = "" if not r["theirs"] else (", the same documents as the baseline" if r["theirs"]["removed"].equals(
            ours["removed"]) else ", NOT the same documents as the baseline")
        notes.append(f"- {docs} documents: {ours['pair_rows']:,} candidate pair rows over the 15 band files, "
                     f"{ours['metrics']['lsh_pairs_checked']:,} distinct LSH pairs checked, removed "
                     f"{ours['metrics']['removed']}{same}; on disk "
                     + ", ".join(f"{k} {v:,.0f} MB" for k, v in r["disk"].items()) + ".")
    return "\n".join(lines + [""] + notes)


def shards_section(results: list[dict], args: argparse.Namespace) -> str:
    lines = [f"`python -m benchmarks.bench_dedup --docs {args.docs[0]} --shards {' '.join(map(str, args.shards))}` "
             f"on {machine()}; synthetic documents drawn as in `Dedup at scale` (the same rates; each shard draws "
             "its own), in more, smaller shards; each job a process of its own, run one at a time.", "",
             "| shards | documents per shard | band: s per job | band: CPU s | band: peak RSS (MB) | clusters: s "
             "| clusters: CPU s | clusters: peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for who, name in (("ours", ""), ("theirs", " (baseline)")):
            if r[who]:
                lines.append(f"| {r['shards']:,}{name} | {r['docs'] // r['shards']:,} | {peak(r[who]['bands'])} | "
                             f"{peak([r[who]['clusters']])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--shard-docs", type=int, default=100_000, help="documents per shard (a WET file has ~30-40k)")
    parser.add_argument("--shards", type=int, nargs="+", help="split the first --docs into so many shards instead")
    parser.add_argument("--exact", type=float, default=0.10, help="fraction of documents that are exact copies")
    parser.add_argument("--near", type=float, default=0.10, help="fraction that are near copies")
    parser.add_argument("--baseline", type=Path, help="a checkout whose band and clusters jobs also run")
    parser.add_argument("--baseline-docs", type=int, help="run the baseline only up to this many documents")
    parser.add_argument("--data", type=Path, help="keep the synthetic shards here, a folder per size, for later runs")
    parser.add_argument("--make-shards", type=int, nargs=2, help=argparse.SUPPRESS)  # run by this script
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--memory-mb", type=int, help="dedup.memory_mb for our jobs (default: the config's)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.make_shards is not None:
        for shard in range(*args.make_shards):
            make_shard(Path(args.root), shard, args.shard_docs, args.exact, args.near, section_config("dedup", {}))
        return
    sizes = [(args.docs[0], args.docs[0] // n) for n in args.shards] if args.shards else \
        [(docs, args.shard_docs) for docs in args.docs]
    results = []
    for docs, shard_docs in sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            root = args.data / f"{docs}-{shard_docs}" if args.data else Path(tmp)
            baseline = args.baseline if docs <= (args.baseline_docs or docs) else None
            results.append(run_size(root, docs, shard_docs, args.exact, args.near, baseline, args.memory_mb))
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("ours", "theirs")}), flush=True)
    if args.shards:
        title, body = "Dedup band jobs and shard count", shards_section(results, args)
    else:
        title, body = "Dedup at scale", scale_section(results, start_up(args.shard_docs, args.exact, args.near,
                                                                                  args.memory_mb), args)
    print(body)
    if not args.no_write:
        write_section(title, body)


if __name__ == "__main__":
    main()

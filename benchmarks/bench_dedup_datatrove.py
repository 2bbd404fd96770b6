"""Dedup's band, clusters and filter jobs against DataTrove's MinHash stages 2-4 (buckets, cluster,
filter) on the same synthetic documents.

    .venv/bin/python -m benchmarks.bench_dedup_datatrove --datatrove-python /work/peers/datatrove/bin/python
    # writes `Dedup vs DataTrove` in docs/benchmarks.md

DataTrove lives in a venv of its own (`python3 -m venv /work/peers/datatrove &&
/work/peers/datatrove/bin/pip install datatrove==0.10.1`); this file also runs under that
interpreter (`--run-datatrove`), which has none of this project's dependencies, so the project's
imports sit in the functions that run under ours.

The documents are `bench_dedup`'s synthetic signatures (`--docs`, 10% exact and 10% near copies,
100,000 a shard); no text is MinHashed. DataTrove's stage 1 output is written from the same
signatures: per shard and band, (the band's 8 values, document) records sorted, as
`MinhashDedupSignature` writes them with 32-bit hashes (`HashConfig(precision=32)`), so both sides
start from the same 14 bands of 8 values. For the filter step each document gets a short text
(parquet with its manifest for ours, jsonl for DataTrove, whose writers gzip as they do by
default). Ours runs with `min_jaccard: null`, FineWeb's setting: every bucket collision joins, as
in DataTrove.

Every job is a process of its own, run one at a time (DataTrove: `LocalPipelineExecutor` with
one task per process), timed with its peak RSS by /usr/bin/time; the two sides alternate, ours
first, `--repeats` times each. Then the decisions are compared: the clusters (DataTrove's are the
connected components of its `.dups` pairs) and which documents each side removes (each keeps one
document per cluster, but not the same one: ours the first by id, DataTrove's union-find root,
chosen by cluster size).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANDS, ROWS = 14, 8


# --- theirs: runs under DataTrove's interpreter
def run_datatrove(stage: str, rank: int, root: Path, shards: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    config = MinhashConfig(n_grams=5, num_buckets=BANDS, hashes_per_bucket=ROWS,
                           hash_config=HashConfig(precision=32, hash_fc="sha1"))  # stages 2-4 hash no text
    out = root / "datatrove"
    steps = {
        "buckets": (BANDS, [MinhashDedupBuckets(input_folder=str(out / "signatures"),
                                                output_folder=str(out / "buckets"), config=config)]),
        "cluster": (1, [MinhashDedupCluster(input_folder=str(out / "buckets"), output_folder=str(out / "remove_ids"),
                                            config=config)]),
        "filter": (shards, [JsonlReader(str(root / "docs_jsonl")),
                            MinhashDedupFilter(input_folder=str(out / "remove_ids"),
                                               exclusion_writer=JsonlWriter(str(out / "removed"))),
                            JsonlWriter(str(out / "deduped"))]),
    }
    tasks, pipeline = steps[stage]
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, local_tasks=1, local_rank_offset=rank,
                          logging_dir=str(out / "logs" / stage)).run()


# --- the comparison: runs under this project's interpreter
def prepare(root: Path, docs: int, shard_docs: int) -> int:
    """The synthetic shards (reused if there), each shard's documents for both filters, and
    DataTrove's stage 1 output; returns the shard count."""
    import numpy as np
    import polars as pl

    from benchmarks.bench_dedup import make_shards
    from pipeline.artifacts import write_manifest
    from pipeline.data.docs import DOC_COLUMNS, write_docs

    shards = docs // shard_docs
    if not (root / f"signatures/shard{shards - 1:05d}.manifest.json").exists():
        make_shards(root, range(shards), shard_docs, 0.1, 0.1)
    record = np.dtype([*((f"v{i}", "<u4") for i in range(ROWS)), ("doc", "<u4")])
    for shard in range(shards):
        name = f"shard{shard:05d}"
        if (root / f"quality/{name}.manifest.json").exists():
            continue
        frame = pl.read_parquet(root / f"signatures/{name}.parquet", columns=["id", "url", "signature"])
        values = frame["signature"].to_numpy()
        for band in range(BANDS):
            records = np.empty(len(values), record)
            for i in range(ROWS):
                records[f"v{i}"] = values[:, band * ROWS + i]
            records["doc"] = np.arange(len(values))
            records.sort(order=record.names)
            path = root / f"datatrove/signatures/bucket_{band:03d}/{shard:05d}.minhash.sig"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(records.tobytes())
        rows = [{"id": i, "url": u, "date": "2020-11-30", "source": name, "text": f"document {u}", "input": "wet",
                 "extractor": "synthetic", "lang": "en", "lang_score": 1.0}
                for i, u in zip(frame["id"], frame["url"])]
        (root / "docs_jsonl").mkdir(exist_ok=True)
        with open(root / f"docs_jsonl/{shard:05d}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)
        path = root / f"quality/{name}.parquet"
        write_docs(path, rows, {**DOC_COLUMNS, "lang": pl.String, "lang_score": pl.Float64})
        write_manifest(root / f"quality/{name}.manifest.json", stage="quality", config={}, inputs=[],
                       outputs={path: len(rows)})
    return shards


def ours(root: Path, shards: int) -> dict[str, list]:
    """Our 15 band jobs, the clusters job and a filter job per shard, each timed."""
    import shutil

    from benchmarks.bench_dedup import timed_job

    out = root / "ours"
    shutil.rmtree(out, ignore_errors=True)
    py, config = [sys.executable, "-m", "pipeline", "dedup"], ["--config", json.dumps({"min_jaccard": None})]
    names = [f"shard{s:05d}" for s in range(shards)]
    bands = [*map(str, range(BANDS)), "exact"]
    runs = {"buckets": [timed_job([*py, "band", "--band", band, "--input", *(str(root / f"buckets/{n}.parquet") for n in names),
                                   "--upstream", *(str(root / f"signatures/{n}.manifest.json") for n in names),
                                   "--output", str(out / f"pairs/{band}.parquet"),
                                   "--manifest", str(out / f"pairs/{band}.manifest.json"), *config], ROOT)
                        for band in bands]}
    runs["cluster"] = [timed_job([*py, "clusters", "--input", *(str(root / f"signatures/{n}.parquet") for n in names),
                                  "--pairs", *(str(out / f"pairs/{b}.parquet") for b in bands),
                                  "--output", str(out / "clusters"), "--manifest", str(out / "manifest.json"),
                                  *config], ROOT)]
    runs["filter"] = [timed_job([*py, "filter", "--input", str(root / f"quality/{n}.parquet"),
                                 "--clusters", str(out / f"clusters/{n}.parquet"),
                                 "--output", str(out / f"deduped/{n}.parquet"),
                                 "--removed", str(out / f"removed/{n}.parquet"),
                                 "--manifest", str(out / f"deduped/{n}.manifest.json"), *config], ROOT)
                      for n in names]
    return runs


def theirs(root: Path, shards: int, python: Path) -> dict[str, list]:
    import shutil

    from benchmarks.bench_dedup import timed_job

    for folder in ("buckets", "remove_ids", "removed", "deduped", "logs"):
        shutil.rmtree(root / "datatrove" / folder, ignore_errors=True)
    run = [str(python), "-m", "benchmarks.bench_dedup_datatrove", "--root", str(root), "--shards", str(shards)]
    return {stage: [timed_job([*run, "--run-datatrove", stage, str(rank)], ROOT) for rank in range(tasks)]
            for stage, tasks in (("buckets", BANDS), ("cluster", 1), ("filter", shards))}


def decisions(root: Path, shards: int) -> dict[str, int]:
    """Clusters and removed documents of both sides, compared (documents as (shard, row) keys)."""
    import numpy as np
    import polars as pl

    from pipeline.data.dedup import doc_keys, find, union

    names = [f"shard{s:05d}" for s in range(shards)]
    frames = [pl.read_parquet(root / f"signatures/{n}.parquet", columns=["id", "row"]).with_columns(shard=s)
              for s, n in enumerate(names)]
    docs = pl.concat(frames)
    keys = doc_keys(docs["shard"].to_numpy(), docs["row"].to_numpy())  # in key order, so a document's index
    key_of_id = dict(zip(docs["id"].to_list(), range(len(keys))))

    ours = pl.concat([pl.read_parquet(root / f"ours/clusters/{n}.parquet").with_columns(shard=s)
                      for s, n in enumerate(names)])
    our_removed = np.searchsorted(keys, doc_keys(ours["shard"].to_numpy(), ours["row"].to_numpy()))
    our_label = np.arange(len(keys))
    our_label[our_removed] = [key_of_id[i] for i in ours["duplicate_of"].to_list()]

    dups = np.concatenate([np.fromfile(p, dtype="<u4").reshape(-1, 4)
                           for p in sorted((root / "datatrove/buckets").glob("*.dups"))])
    parent = np.arange(len(keys), dtype=np.int32)
    union(parent, np.searchsorted(keys, doc_keys(dups[:, 0], dups[:, 1])),
          np.searchsorted(keys, doc_keys(dups[:, 2], dups[:, 3])))
    their_label = find(parent, np.arange(len(keys), dtype=np.int32))  # the smallest key of each cluster
    removed = [np.fromfile(root / f"datatrove/remove_ids/{s:06d}.remove", dtype="<u4") for s in range(shards)]
    their_removed = np.searchsorted(keys, np.concatenate([doc_keys(np.full(len(r), s), r)
                                                         for s, r in enumerate(removed)]))

    # our labels name each cluster's representative; as the smallest document of the cluster, they compare
    smallest = np.full(len(keys), len(keys))
    np.minimum.at(smallest, our_label, np.arange(len(keys)))
    our_label = smallest[our_label]
    ours_out, theirs_out = np.zeros(len(keys), bool), np.zeros(len(keys), bool)
    ours_out[our_removed], theirs_out[their_removed] = True, True
    in_cluster = (np.bincount(our_label, minlength=len(keys))[our_label] > 1) | \
        (np.bincount(their_label, minlength=len(keys))[their_label] > 1)
    return {"documents": len(keys), "in_clusters": int(in_cluster.sum()),
            "same_cluster": int((in_cluster & (our_label == their_label)).sum()),
            "removed_ours": int(ours_out.sum()), "removed_theirs": int(theirs_out.sum()),
            "removed_both": int((ours_out & theirs_out).sum()),
            "decisions_agree": int((ours_out == theirs_out).sum())}


def summary(runs: list[dict[str, list]]) -> dict[str, tuple[float, float, float, float]]:
    """Per stage, medians over the repeats of: wall and CPU seconds of all its jobs, the slowest
    job's wall seconds; and the largest peak MB."""
    return {stage: (statistics.median(sum(job.seconds for job in r[stage]) for r in runs),
                    statistics.median(sum(job.cpu for job in r[stage]) for r in runs),
                    statistics.median(max(job.seconds for job in r[stage]) for r in runs),
                    max(job.mb for r in runs for job in r[stage])) for stage in runs[0]}


def report(ours_runs: list, theirs_runs: list, agree: dict, args: argparse.Namespace, loads: list[float]) -> str:
    from benchmarks.common import machine

    mine, yours = summary(ours_runs), summary(theirs_runs)
    shards = args.docs // 100_000
    jobs = {"buckets": (f"{BANDS} band + exact", f"{BANDS} buckets"), "cluster": ("1 clusters", "1 cluster"),
            "filter": (f"{shards} filter", f"{shards} filter")}
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_dedup_datatrove --datatrove-python {args.datatrove_python} "
             f"--docs {args.docs} --repeats {args.repeats}`  ",
             f"Machine: {machine()}; DataTrove 0.10.1; {time.strftime('%Y-%m-%d')}; load average (1 min) during "
             f"the runs {min(loads):.1f}-{max(loads):.1f}", "",
             f"{args.docs:,} synthetic documents (`bench_dedup`'s: 10% exact and 10% near copies, 100,000 a shard), "
             f"the same signatures on both sides, 14 bands of 8; ours with `min_jaccard: null`. Each job a "
             f"process, one at a time; medians of {args.repeats} alternating runs. CPU seconds (user + system) "
             "are what the load of other work on the machine inflates least.", "",
             "| stage | jobs: ours / DataTrove | ours: s / CPU s | DataTrove: s / CPU s | slowest job s: ours / "
             "DataTrove | peak RSS MB: ours / DataTrove |", "|---|---|---:|---:|---:|---:|"]
    for stage, (mine_jobs, their_jobs) in jobs.items():
        m, y = mine[stage], yours[stage]
        lines.append(f"| {stage} | {mine_jobs} / {their_jobs} | {m[0]:.1f} / {m[1]:.1f} | {y[0]:.1f} / {y[1]:.1f} | "
                     f"{m[2]:.1f} / {y[2]:.1f} | {m[3]:,.0f} / {y[3]:,.0f} |")
    a = agree
    lines += ["", f"Decisions: of {a['documents']:,} documents, {a['in_clusters']:,} are in a cluster of two or more "
              f"on either side, {a['same_cluster']:,} of them in the same cluster on both. Ours removes "
              f"{a['removed_ours']:,}, DataTrove {a['removed_theirs']:,}, both {a['removed_both']:,}; "
              f"{a['decisions_agree']:,} documents ({a['decisions_agree'] / a['documents']:.2%}) get the same "
              "decision (kept or removed). Where the clusters agree, the removed documents differ only in which "
              "member each side keeps: ours the first by id, DataTrove the root of its union by size."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datatrove-python", type=Path, help="the interpreter of a venv with datatrove")
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, help="keep the documents here for later runs (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--run-datatrove", nargs=2, metavar=("STAGE", "RANK"), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_datatrove:
        run_datatrove(args.run_datatrove[0], int(args.run_datatrove[1]), args.root, args.shards)
        return
    import tempfile

    from benchmarks.common import write_section

    if not args.datatrove_python or not args.datatrove_python.exists():
        sys.exit(f"no DataTrove interpreter at {args.datatrove_python}: see this file's docstring")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = args.data or Path(tmp)
        shards = prepare(root, args.docs, 100_000)
        ours_runs, theirs_runs, loads = [], [], []
        for _ in range(args.repeats):
            loads.append(os.getloadavg()[0])
            ours_runs.append(ours(root, shards))
            loads.append(os.getloadavg()[0])
            theirs_runs.append(theirs(root, shards, args.datatrove_python))
        agree = decisions(root, shards)
    body = report(ours_runs, theirs_runs, agree, args, loads)
    print(body)
    if not args.no_write:
        write_section("Dedup vs DataTrove", body)


if __name__ == "__main__":
    main()

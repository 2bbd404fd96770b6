"""The data half against DataTrove's FineWeb recipe, on 1x, 10x and 40x copies of the sample WET file.

    .venv/bin/python -m benchmarks.bench_datatrove --datatrove-python /work/dtvenv/bin/python --copies 1 10 40
    # writes `Data half vs DataTrove` in docs/benchmarks.md

DataTrove lives in a venv of its own (`python3 -m venv /work/dtvenv && /work/dtvenv/bin/pip install
'datatrove[processing,io]==0.10.1' spacy`); without that interpreter the benchmark says so and exits.
Each size is one WET file (the sample's gzip members repeated, as `bench_data_rss` builds it); on it,
interleaved (ours, theirs, ours, theirs, ... `--repeats` each):

- ours: `snakemake --cores N data` from a fresh results folder (ingest -> langid -> quality ->
  dedup signatures -> 15 band jobs -> union-find -> dedup filter -> decontaminate -> pii -> report);
- theirs: the FineWeb recipe (examples/fineweb.py) for WET input under `LocalPipelineExecutor`,
  `--cores` workers: WarcReader -> LanguageFilter(en) -> GopherRepetition -> GopherQuality ->
  C4Quality -> FineWebQuality -> JsonlWriter, every filter with its exclusion writer; MinHash stage 1
  (signatures, one task), 2 (buckets, 14 tasks), 3 (clusters, one task), 4 (filter + PIIFormatter +
  JsonlWriter). lid.176 is the .ftz our langid uses (DataTrove would download lid.176.bin).

Each run is timed as a process tree: wall seconds, and CPU seconds (user + sys of every waited
descendant, from `getrusage(RUSAGE_CHILDREN)`), which other load on a shared machine inflates far
less than wall time. This file also runs under DataTrove's interpreter (`--run-datatrove`), which
has neither torch nor this project's dependencies: the project's imports sit in the functions that
run under ours.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# --- theirs: runs under DataTrove's interpreter
def run_datatrove(wet: Path, out: Path, lid_model: Path, workers: int) -> None:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    removed = lambda name: JsonlWriter(str(out / "removed" / name))  # noqa: E731
    language = LanguageFilter(languages=["en"], exclusion_writer=removed("2_non_english"))
    language.model.MODEL_URL = str(lid_model)  # offline: "downloaded" (copied) from the local file
    minhash = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)  # FineWeb's, 64-bit hashes
    stages = [
        ("filter", 1, [WarcReader(str(wet.parent), glob_pattern=wet.name), language,
                       GopherRepetitionFilter(exclusion_writer=removed("3_gopher_rep")),
                       GopherQualityFilter(exclusion_writer=removed("4_gopher_qual")),
                       C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=removed("5_c4")),
                       FineWebQualityFilter(exclusion_writer=removed("6_fineweb_qual")),
                       JsonlWriter(str(out / "filtered"))]),
        ("signatures", 1, [JsonlReader(str(out / "filtered")),
                           MinhashDedupSignature(output_folder=str(out / "signatures"), config=minhash)]),
        ("buckets", minhash.num_buckets, [MinhashDedupBuckets(input_folder=str(out / "signatures"),
                                                              output_folder=str(out / "buckets"), config=minhash)]),
        ("clusters", 1, [MinhashDedupCluster(input_folder=str(out / "buckets"),
                                             output_folder=str(out / "remove_ids"), config=minhash)]),
        ("dedup_filter", 1, [JsonlReader(str(out / "filtered")),
                             MinhashDedupFilter(input_folder=str(out / "remove_ids"),
                                                exclusion_writer=removed("7_minhash")),
                             PIIFormatter(), JsonlWriter(str(out / "clean"))]),
    ]
    for name, tasks, pipeline in stages:
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                              logging_dir=str(out / "logs" / name)).run()


# --- the comparison: runs under this project's interpreter
def timed_tree(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float, float]:
    """fn's result, wall seconds and CPU seconds of the processes it ran (and waited for)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = fn(*args, **kwargs)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def ours(copies: int, cores: int, tmp: Path) -> dict:
    from benchmarks.bench_data_rss import run_copies
    from pipeline.artifacts import read_manifest

    rules, wall, cpu = timed_tree(run_copies, copies, ROOT, tmp, cores=cores)
    clean = read_manifest(tmp / "results" / f"x{copies}" / "data" / "clean" / "manifest.json")
    return {"wall": wall, "cpu": cpu, "kept": clean["counts"]["docs_out"], "rules": rules}


def theirs(copies: int, cores: int, tmp: Path, python: Path) -> dict:
    from benchmarks.bench_data_rss import SAMPLE
    from pipeline.data.langid import bundled_model_path

    wet = tmp / "input" / f"x{copies}.warc.wet.gz"
    wet.parent.mkdir()
    wet.write_bytes(SAMPLE.read_bytes() * copies)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp / "hf")}  # lid model copy stays in tmp
    cmd = [str(python), "-m", "benchmarks.bench_datatrove", "--run-datatrove", str(wet), str(tmp / "out"),
           "--lid-model", str(bundled_model_path()), "--cores", str(cores)]
    _, wall, cpu = timed_tree(subprocess.run, cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    kept = sum(sum(1 for _ in gzip.open(f, "rt")) for f in (tmp / "out" / "clean").glob("*.jsonl.gz"))
    return {"wall": wall, "cpu": cpu, "kept": kept}


def report(results: dict, args: argparse.Namespace, loads: list[float]) -> str:
    from benchmarks.common import machine

    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_datatrove --datatrove-python {args.datatrove_python} "
             f"--copies {' '.join(map(str, args.copies))} --repeats {args.repeats} --cores {args.cores}`  ",
             f"Machine: {machine()}; DataTrove 0.10.1 (spaCy word tokenizer for English); "
             f"{time.strftime('%Y-%m-%d')}; load average (1 min) during the runs "
             f"{min(loads):.1f}-{max(loads):.1f}", "",
             "Median of the runs; records/CPU-s = input records over CPU seconds of the whole process tree.", "",
             "| copies (records) | ours wall s | ours CPU s | DataTrove wall s | DataTrove CPU s "
             "| ours rec/CPU-s | DataTrove rec/CPU-s | throughput ratio (CPU) | ratio (wall) | kept: ours / DataTrove |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for copies, runs in results.items():
        med = {side: {key: statistics.median(run[key] for run in runs[side]) for key in ("wall", "cpu")}
               for side in ("ours", "theirs")}
        records = 318 * copies
        lines.append(f"| {copies}x ({records:,}) | {med['ours']['wall']:.1f} | {med['ours']['cpu']:.1f} "
                     f"| {med['theirs']['wall']:.1f} | {med['theirs']['cpu']:.1f} "
                     f"| {records / med['ours']['cpu']:,.0f} | {records / med['theirs']['cpu']:,.0f} "
                     f"| **{med['theirs']['cpu'] / med['ours']['cpu']:.2f}x** "
                     f"| {med['theirs']['wall'] / med['ours']['wall']:.2f}x "
                     f"| {runs['ours'][0]['kept']} / {runs['theirs'][0]['kept']} |")
    lines += ["", "Every run, in the order taken (wall s / CPU s):", ""]
    lines += [f"- {copies}x: " + ", ".join(f"{side} {run['wall']:.1f} / {run['cpu']:.1f}" for side, run in runs["order"])
              for copies, runs in results.items()]
    biggest = max(results)
    rules = results[biggest]["ours"][-1]["rules"]
    total = sum(cpu for _, _, cpu, _ in rules.values())
    lines += ["", f"Where our CPU goes at {biggest}x (last run; Snakemake's per-job `cpu_time`, sampled):", ""]
    lines += [f"- {rule} ({jobs} jobs): {cpu:.1f} CPU s ({100 * cpu / total:.0f}%)"
              for rule, (_, _, cpu, jobs) in sorted(rules.items(), key=lambda item: -item[1][2])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datatrove-python", type=Path, default=Path("/work/dtvenv/bin/python"),
                        help="an interpreter with datatrove[processing,io]==0.10.1 and spacy installed")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side per size, interleaved")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores and DataTrove workers")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--run-datatrove", nargs=2, type=Path, metavar=("WET", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--lid-model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_datatrove:
        run_datatrove(*args.run_datatrove, lid_model=args.lid_model, workers=args.cores)
        return
    if not args.datatrove_python.exists():
        print(f"skipped: no DataTrove interpreter at {args.datatrove_python} (see --help to make one)")
        return
    results: dict = {}
    loads = [os.getloadavg()[0]]
    for copies in args.copies:
        runs: dict = {"ours": [], "theirs": [], "order": []}
        for _ in range(args.repeats):
            for side in ("ours", "theirs"):
                with tempfile.TemporaryDirectory() as tmp:
                    run = (ours(copies, args.cores, Path(tmp)) if side == "ours"
                           else theirs(copies, args.cores, Path(tmp), args.datatrove_python))
                runs[side].append(run)
                runs["order"].append((side, run))
                loads.append(os.getloadavg()[0])
                print(f"{copies}x {side}: wall {run['wall']:.1f} s, CPU {run['cpu']:.1f} s, kept {run['kept']}",
                      flush=True)
        results[copies] = runs
    body = report(results, args, loads)
    print(body)
    if not args.no_write:
        from benchmarks.common import write_section
        write_section("Data half vs DataTrove", body)


if __name__ == "__main__":
    main()

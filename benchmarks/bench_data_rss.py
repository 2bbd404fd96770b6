"""Peak RSS and time of every data job at 1x, 10x and 40x copies of the bundled sample WET file.

    .venv/bin/python -m benchmarks.bench_data_rss --copies 1 10 40   # writes `Data: memory per job` in docs/benchmarks.md

Each size is one WET file: the sample's gzip members repeated (a valid multi-member WET of
318 x copies records, every copy an exact duplicate). `snakemake --cores 2 data` runs on it from a
fresh results folder and each rule's Snakemake benchmark file gives its job's peak RSS
(`max_rss`), wall time and CPU time (`cpu_time`, which other load on the machine does not inflate). The goal is a flat line: every per-shard job streams its documents
(1,024 at a time) and dedup signatures its batches; `--source` runs another checkout (e.g. main) for comparison.
Snakemake samples memory a few times a second, so jobs of a second or two are under-counted.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = next((ROOT / "resources" / "commoncrawl").glob("*.warc.wet.gz"))


def job_figures(bench: Path) -> dict[str, tuple[float, float, float, int]]:
    """rule -> (max peak RSS MB over its jobs, total wall seconds, total CPU seconds, jobs) from
    Snakemake's benchmark files."""
    figures: dict[str, tuple[float, float, float, int]] = {}
    for tsv in sorted(bench.rglob("*.tsv")):
        rule = tsv.relative_to(bench).parts[0].removesuffix(".tsv")  # <rule>/<wildcards>.tsv or <rule>.tsv
        with open(tsv) as f:
            row = next(csv.DictReader(f, delimiter="\t"))
        number = lambda key: float(row[key]) if row.get(key) not in (None, "", "NA", "-") else 0.0  # noqa: E731
        mb, seconds, cpu, jobs = figures.get(rule, (0.0, 0.0, 0.0, 0))
        figures[rule] = (max(mb, number("max_rss")), seconds + number("s"), cpu + number("cpu_time"), jobs + 1)
    return figures


def run_copies(copies: int, source: Path, tmp: Path, cores: int = 2) -> dict[str, tuple[float, float, float, int]]:
    wet = tmp / f"x{copies}.warc.wet.gz"
    wet.write_bytes(SAMPLE.read_bytes() * copies)  # gzip members back to back: one valid WET file
    configfile = tmp / f"x{copies}.yaml"
    configfile.write_text(yaml.safe_dump({"inputs": {"wet": [str(wet)], "warc": []},
                                          "results": str(tmp / "results"), "run": f"x{copies}"}))
    env = {**os.environ, "PYTHONPATH": str(source)}
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", str(cores), "data", "--quiet",
                    "--configfile", str(configfile)], cwd=source, env=env, check=True, capture_output=True)
    return job_figures(tmp / "results" / f"x{copies}" / "benchmarks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10, 40])
    parser.add_argument("--source", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    results = {}
    for copies in args.copies:
        with tempfile.TemporaryDirectory() as tmp:
            results[copies] = run_copies(copies, args.source.resolve(), Path(tmp))
        print(copies, results[copies], flush=True)
    rules = sorted({rule for figures in results.values() for rule in figures})
    head = " | ".join(f"{c}x MB | {c}x s (CPU s)" for c in args.copies)
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_data_rss --copies {' '.join(map(str, args.copies))}`"
             f"{'' if args.source.resolve() == ROOT else ' --source ' + str(args.source)}  ",
             f"Machine: {machine()}; records: " + ", ".join(f"{c}x = {318 * c:,}" for c in args.copies), "",
             f"| rule (jobs) | {head} |", "|---|" + "---:|" * (2 * len(args.copies))]
    for rule in rules:
        jobs = max(results[c].get(rule, (0, 0, 0, 0))[3] for c in args.copies)
        cells = " | ".join(f"{results[c][rule][0]:,.0f} | {results[c][rule][1]:.1f} ({results[c][rule][2]:.1f})"
                           if rule in results[c] else "- | -" for c in args.copies)
        lines.append(f"| {rule} ({jobs}) | {cells} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Data: memory per job", body)


if __name__ == "__main__":
    main()

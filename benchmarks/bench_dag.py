"""How long Snakemake takes to build the whole DAG (`snakemake -n`) for a crawl's worth of inputs.

    .venv/bin/python -m benchmarks.bench_dag --inputs 1000 10000 100000 --batch-size 1 100
        # writes the `DAG build` section of docs/benchmarks.md
    .venv/bin/python -m benchmarks.bench_dag --kind warc --inputs 1000 10000 100000 --batch-size 100 10
        # WARC files (inputs.warc_batch_size): the `DAG build, WARC inputs` section
    .venv/bin/python -m benchmarks.bench_dag --kind warc --urls --inputs 10000 --batch-size 10
        # WARC URLs in a list file (inputs.warc_list), a fetch_warc job each: `DAG build, WARC inputs, URLs`

For each number of input files, that many empty files (named like Common Crawl's) go into a temporary
folder, a config names them with one glob (or, with --urls, a list file names that many URLs), and
`snakemake -n --quiet rules` (every target of the default run, nothing executed) runs once per
batch size. A dry run reads no input, so empty files cost what real ones would. Figures: wall and CPU seconds and peak memory of the Snakemake
process, and the jobs it planned. A run past `--timeout` is stopped (one whose estimate is past it
is not started, nor one larger than a run that was stopped) and reported with an estimate of its CPU seconds: a power law through the two
largest finished runs of that batch size (CPU, less disturbed than wall time by other work).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
STEM = "CC-MAIN-20240301000000-20240301010000-{:06d}"
SUFFIX = {"wet": ".warc.wet.gz", "warc": ".warc.gz"}
URL = "https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-10/segments/0/{kind}/"


def make_inputs(folder: Path, n: int, kind: str, urls: bool) -> dict:
    """The `inputs` keys naming n files of `kind`: a glob over n empty files in `folder`, or with
    `urls` a list file (inputs.<kind>_list) of n URLs."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [STEM.format(i) + SUFFIX[kind] for i in range(n)]
    if urls:
        (folder / "paths.txt").write_text("".join(URL.format(kind=kind) + name + "\n" for name in names))
        return {kind: [], f"{kind}_list": str(folder / "paths.txt")}
    for name in names:
        (folder / name).touch()
    return {kind: [str(folder / ("*" + SUFFIX[kind]))]}


def dry_run(inputs: dict, kind: str, batch_size: int, results: Path, timeout: float) -> dict:
    """One `snakemake -n` of the default targets over `inputs` in batches of `batch_size`: wall and
    CPU seconds, peak RSS (MB) and planned jobs; `timed_out` when it ran past `timeout` seconds."""
    config = results / f"bs{batch_size}.yaml"
    size_key = "batch_size" if kind == "wet" else "warc_batch_size"
    config.write_text(yaml.safe_dump({"inputs": {"wet": [], **inputs, size_key: batch_size},
                                      "results": str(results / "results")}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--configfile", str(config)]
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        timed_out = False
        while True:  # poll, so the child's own resource usage comes back from wait4
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.2)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode(errors="replace")
    if not timed_out and os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    total = re.search(r"^total\s+(\d+)$", text, re.M)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "jobs": int(total.group(1)) if total else None, "timed_out": timed_out}


def estimate(points: list[tuple[int, float]], n: int) -> float:
    """CPU seconds at n inputs from a power law through the two largest finished runs."""
    (n1, t1), (n2, t2) = points[-2:]
    slope = math.log(t2 / t1) / math.log(n2 / n1)
    return t2 * (n / n2) ** slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["wet", "warc"], default="wet", help="inputs.wet or inputs.warc files")
    parser.add_argument("--urls", action="store_true", help="name the inputs as URLs in a list file")
    parser.add_argument("--inputs", type=int, nargs="+", default=[1000, 10000, 100000], help="input files per run")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 100],
                        help="inputs.batch_size (WET) or inputs.warc_batch_size (WARC) values")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a dry run is stopped")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_size:
            finished: list[tuple[int, float]] = []
            stopped = False
            for n in sorted(args.inputs):
                folder = Path(tmp) / str(n)
                inputs = make_inputs(folder / args.kind, n, args.kind, args.urls)
                if stopped or len(finished) >= 2 and estimate(finished, n) > args.timeout:
                    run = {"wall_s": None, "cpu_s": None, "rss_mb": None, "jobs": None, "timed_out": True}
                else:
                    run = dry_run(inputs, args.kind, batch_size, folder, args.timeout)
                stopped = run["timed_out"]
                if not run["timed_out"]:
                    finished.append((n, run["cpu_s"]))
                elif len(finished) >= 2:
                    run["estimate_s"] = estimate(finished, n)
                rows.append({"inputs": n, "batch_size": batch_size, **run})
                print(rows[-1], flush=True)

    def cell(row: dict) -> str:
        if not row["timed_out"]:
            return f"{row['wall_s']:,.0f} | {row['cpu_s']:,.0f} | {row['rss_mb']:,.0f} | {row['jobs']:,}"
        guess = f"~{row['estimate_s'] / 60:,.0f} CPU min (estimate)" if "estimate_s" in row else "?"
        ran = f"stopped at {args.timeout:,.0f} s" if row["wall_s"] else "not run"
        return f"{ran}; {guess} | | |"

    kind = {"wet": "WET", "warc": "WARC"}[args.kind]
    flags = f"{' --kind warc' if args.kind == 'warc' else ''}{' --urls' if args.urls else ''}"
    size_key = "inputs.batch_size" if args.kind == "wet" else "inputs.warc_batch_size"
    named = (f"URLs named in a list file (`inputs.{args.kind}_list`), each downloaded by a fetch_{args.kind} job"
             if args.urls else f"empty {kind} files")
    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_dag{flags} --inputs {' '.join(map(str, args.inputs))} "
        f"--batch-size {' '.join(map(str, args.batch_size))} --timeout {args.timeout:g}`  ",
        f"Machine: {machine()}; wall and CPU seconds move with other work on the machine: compare rows "
        "of one run, not runs on different days.",
        "",
        f"`snakemake -n` of every default target over N {named} (the bundled tinystories text "
        f"source included). `{size_key}` 1 is one job per file per data stage; a larger batch makes one "
        "shard of that many files. Estimates are a power law through the two largest finished runs of "
        "that batch size, in CPU seconds.",
        "",
        f"| {kind} {'URLs' if args.urls else 'files'} | batch size | wall s | CPU s | peak RSS MB | jobs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r['inputs']:,} | {r['batch_size']} | {cell(r)} |" for r in rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        title = "DAG build" + {"wet": "", "warc": ", WARC inputs"}[args.kind] + (", URLs" if args.urls else "")
        write_section(title, "\n".join(lines))

if __name__ == "__main__":
    main()

"""How long Snakemake takes to build the whole DAG (`snakemake -n`) for a crawl's worth of inputs.

    .venv/bin/python -m benchmarks.bench_dag --inputs 1000 10000 100000 --batch-size 1 100
        # writes the `DAG build` section of docs/benchmarks.md

For each number of WET files, that many empty files (named like Common Crawl's) go into a temporary
folder, a config names them with one glob, and `snakemake -n --quiet rules` (every target of the
default run, nothing executed) runs once per `inputs.batch_size`. A dry run reads no input, so empty
files cost what real ones would. Figures: wall and CPU seconds and peak memory of the Snakemake
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
WET_NAME = "CC-MAIN-20240301000000-20240301010000-{:06d}.warc.wet.gz"


def make_inputs(folder: Path, n: int) -> str:
    """n empty WET files in `folder`; the glob that names them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / WET_NAME.format(i)).touch()
    return str(folder / "*.warc.wet.gz")


def dry_run(glob: str, batch_size: int, results: Path, timeout: float) -> dict:
    """One `snakemake -n` of the default targets over the files of `glob`: wall and CPU seconds,
    peak RSS (MB) and planned jobs; `timed_out` when it ran past `timeout` seconds."""
    config = results / f"bs{batch_size}.yaml"
    config.write_text(yaml.safe_dump({"inputs": {"wet": [glob], "batch_size": batch_size},
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
    parser.add_argument("--inputs", type=int, nargs="+", default=[1000, 10000, 100000], help="WET files per run")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 100], help="inputs.batch_size values")
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
                glob = make_inputs(folder / "wet", n)
                if stopped or len(finished) >= 2 and estimate(finished, n) > args.timeout:
                    run = {"wall_s": None, "cpu_s": None, "rss_mb": None, "jobs": None, "timed_out": True}
                else:
                    run = dry_run(glob, batch_size, folder, args.timeout)
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

    lines = [
        f"Command: `.venv/bin/python -m benchmarks.bench_dag --inputs {' '.join(map(str, args.inputs))} "
        f"--batch-size {' '.join(map(str, args.batch_size))} --timeout {args.timeout:g}`  ",
        f"Machine: {machine()}; the 2 cores were shared with other work, which inflates wall and CPU "
        "seconds alike: compare rows of one run, not runs on different days.",
        "",
        "`snakemake -n` of every default target over N empty WET files (the bundled tinystories text "
        "source included). `inputs.batch_size` 1 is one job per WET file per data stage (the design "
        "before batching); a larger batch makes one shard of that many files. Estimates are a power "
        "law through the two largest finished runs of that batch size, in CPU seconds.",
        "",
        "| WET files | batch_size | wall s | CPU s | peak RSS MB | jobs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {r['inputs']:,} | {r['batch_size']} | {cell(r)} |" for r in rows),
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("DAG build", "\n".join(lines))


if __name__ == "__main__":
    main()

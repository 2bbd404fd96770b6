"""Documents per second of each web-data stage, and the whole data DAG's wall time.

    .venv/bin/python -m benchmarks.bench_data            # writes the `Data` section of docs/benchmarks.md

Each stage runs as its Python entry point (the same code `python -m pipeline <stage>` runs), on
the bundled sample; the sample is small (318 records), so langid and MinHash signatures are also
timed on the sample's ingested documents repeated `--scale` times, which is where their per-doc
cost shows. Then `snakemake --cores 2 data` runs from a clean results folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_section
from pipeline.config import section_config
from pipeline.data.dedup import EXACT, cluster, run_band, run_clusters, run_filter, run_signatures, signatures
from pipeline.data.docs import read_docs
from pipeline.data.ingest import ingest
from pipeline.data.langid import load_model, predict
from pipeline.data.langid import langid as run_langid
from pipeline.data.quality import quality

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = next((ROOT / "resources" / "commoncrawl").glob("*.warc.wet.gz"))


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def stage_rows(tmp: Path) -> list[tuple[str, int, float]]:
    """(stage, documents in, seconds) for every stage on the sample, in DAG order."""
    p = {name: str(tmp / f"{name}.parquet") for name in ("ingest", "langid", "quality", "clean")}
    rm = lambda name: str(tmp / f"removed_{name}.parquet")  # noqa: E731
    mf = lambda name: str(tmp / f"{name}.manifest.json")  # noqa: E731
    rows = [("ingest (records)", 318, timed(ingest, str(SAMPLE), output=p["ingest"], removed=rm("ingest"),
                                          manifest=mf("ingest"), config={}))]
    n = len(read_docs(p["ingest"]))
    rows.append(("langid", n, timed(run_langid, p["ingest"], output=p["langid"], removed=rm("langid"),
                                    manifest=mf("langid"), config={})))
    n = len(read_docs(p["langid"]))
    rows.append(("quality", n, timed(quality, p["langid"], output=p["quality"], removed=rm("quality"),
                                     manifest=mf("quality"), config={})))
    n = len(read_docs(p["quality"]))
    sig, buckets = str(tmp / "sig" / "quality.parquet"), str(tmp / "buckets" / "quality.parquet")  # the shard's name
    rows.append(("dedup signatures", n, timed(run_signatures, p["quality"], output=sig, buckets=buckets,
                                              manifest=str(tmp / "sig" / "quality.manifest.json"), config={})))
    bands = [*map(str, range(section_config("dedup", {})["bands"])), EXACT]
    pairs = [str(tmp / "pairs" / f"{band}.parquet") for band in bands]
    rows.append((f"dedup bands ({len(bands)} jobs)", n, sum(
        timed(run_band, [buckets], band, upstream=[str(tmp / "sig" / "quality.manifest.json")], output=out,
              manifest=out.replace(".parquet", ".manifest.json"), config={}) for band, out in zip(bands, pairs))))
    rows.append(("dedup clusters", n, timed(run_clusters, [sig], pairs, output=str(tmp / "clusters"),
                                            manifest=mf("clusters"), config={})))
    rows.append(("dedup filter", n, timed(run_filter, p["quality"], str(tmp / "clusters" / "quality.parquet"),
                                          output=p["clean"], removed=rm("dedup"), manifest=mf("clean"), config={})))
    return rows


def scaled_rows(tmp: Path, scale: int) -> list[tuple[str, int, float]]:
    """langid and MinHash on the sample's ingested documents repeated `scale` times."""
    docs = read_docs(tmp / "ingest.parquet") * scale
    docs = [{**d, "id": f"{d['id']}#{i}"} for i, d in enumerate(docs)]
    model = load_model(None)[0]
    config = section_config("dedup", {})
    rows = [("langid predict (all languages)", len(docs), timed(predict, model, [d["text"] for d in docs]))]
    start = time.perf_counter()
    table = signatures(docs, "bench", config)
    rows.append(("MinHash signatures (112 perm)", len(docs), time.perf_counter() - start))
    rows.append(("exact + LSH clustering (bands + union-find, in one process)", len(docs), timed(cluster, table, config)))
    return rows


def dag_seconds() -> float:
    with tempfile.TemporaryDirectory() as results:
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "data", "--quiet",
               "--config", f"results={results}", "run=bench"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10, help="repeat the sample this often for the scaled rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = stage_rows(Path(tmp))
        scaled = scaled_rows(Path(tmp), args.scale)
    wall = dag_seconds()
    sample_mb = 2.35  # uncompressed text of the 318 records (drop_report.md)
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_data --scale {args.scale}`  ",
             f"Machine: {machine()}", "",
             "| work | documents | seconds | docs/s |", "| --- | ---: | ---: | ---: |"]
    for name, n, seconds in rows + scaled:
        lines.append(f"| {name} | {n} | {seconds:.3f} | {n / seconds:,.0f} |")
    lines += ["", f"Whole data DAG (`snakemake --cores 2 data`, fresh results folder, {sample_mb} MB of "
              f"text, 13 jobs incl. Snakemake start-up): **{wall:.1f} s**.", "",
              "Per-stage rows on the sample include reading and writing parquet and the manifest "
              "(sha256 of inputs and outputs); the scaled rows time only the computation, on "
              f"{args.scale} copies of the 317 ingested documents (web pages of all languages, "
              "median ~2.5 kB). MinHash uses datasketch's `MinHash.bulk`."]
    body = "\n".join(lines)
    print(body)
    write_section("Data", body)


if __name__ == "__main__":
    main()

"""What checking a stage's inputs against their upstream manifest costs (sha256 before use).

    .venv/bin/python -m benchmarks.bench_input_checks --tokens results/sample/tokens
        # writes the `Input checks` section of docs/benchmarks.md

Two inputs, each at the sample's size and 40 times it: a document parquet as langid reads it
(the sample's ingested documents; x40: 40 copies, each copy's words shuffled per document so
zstd cannot fold the copies together), read plain with polars and read
checked (`read_frame`: one read, sha256 of the bytes, parse from memory); and the train token
shards as training lists them (`split_shards`, which hashes every .bin and .idx; x40: one shard
holding the sample's train tokens 40 times), against memory-mapping them (`TokenWindows`). Each
figure is the fastest of `--repeat` runs, with the files in the page cache, as a rerun finds them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import machine, write_section
from pipeline.artifacts import write_manifest
from pipeline.data.docs import DOC_COLUMNS, read_frame, write_docs
from pipeline.data.ingest import ingest
from pipeline.token_shards import TokenWindows, index_path, read_tokens_manifest, split_shards, write_shard

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = next((ROOT / "resources" / "commoncrawl").glob("*.warc.wet.gz"))
SCALE = 40


def fastest(repeat: int, fn, *args) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)


def parquet_inputs(tmp: Path) -> dict[str, Path]:
    ingest(str(SAMPLE), output=str(tmp / "x1.parquet"), removed=str(tmp / "r.parquet"),
           manifest=str(tmp / "x1.manifest.json"), config={})
    rng = np.random.default_rng(0)
    docs = [{**doc, "text": " ".join(rng.permutation(doc["text"].split())) if k else doc["text"]}
            for k in range(SCALE) for doc in read_frame(tmp / "x1.parquet").to_dicts()]
    n = write_docs(tmp / f"x{SCALE}.parquet", docs, DOC_COLUMNS)
    write_manifest(tmp / f"x{SCALE}.manifest.json", stage="bench", config={}, inputs=[],
                   outputs={tmp / f"x{SCALE}.parquet": n})
    return {"sample": tmp / "x1.parquet", f"x{SCALE}": tmp / f"x{SCALE}.parquet"}


def token_inputs(tokens: Path, tmp: Path) -> dict[str, Path]:
    meta = read_tokens_manifest(tokens)
    train = np.concatenate([np.fromfile(p, dtype=np.uint16 if meta["dtype"] == "uint16" else np.uint32)
                            for p in split_shards(tokens, "train")])
    big = tmp / "tokens"
    write_shard(big / "train" / "all.bin", [train] * SCALE, meta["vocab_size"])
    bins = [big / "train" / "all.bin", index_path(big / "train" / "all.bin")]
    write_manifest(big / "manifest.json", stage="bench", config={}, inputs=[], outputs={p: None for p in bins},
                   metrics=meta)
    return {"sample": tokens, f"x{SCALE}": big}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=Path, default=ROOT / "results" / "sample" / "tokens",
                        help="a tokens folder from the default run (tokens/manifest.json and shards)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in parquet_inputs(Path(tmp)).items():
            plain = fastest(args.repeat, pl.read_parquet, path)
            checked = fastest(args.repeat, read_frame, path)
            rows.append((f"document parquet, {name}", path.stat().st_size, plain, checked))
        for name, folder in token_inputs(args.tokens, Path(tmp)).items():
            vocab = read_tokens_manifest(folder)["vocab_size"]
            paths = split_shards(folder, "train")
            size = sum(p.stat().st_size + index_path(p).stat().st_size for p in paths)
            plain = fastest(args.repeat, TokenWindows, paths, vocab, 256)
            checked = fastest(args.repeat, lambda: TokenWindows(split_shards(folder, "train"), vocab, 256))
            rows.append((f"train token shards, {name}", size, plain, checked))
    lines = [f"Command: `.venv/bin/python -m benchmarks.bench_input_checks --tokens {args.tokens}`  ",
             f"Machine: {machine()}", "",
             "| input | MB on disk | read plain (ms) | read checked (ms) | the check (ms) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, size, plain, checked in rows:
        lines.append(f"| {name} | {size / 1e6:.2f} | {1e3 * plain:.1f} | {1e3 * checked:.1f} "
                     f"| {1e3 * (checked - plain):.1f} |")
    lines += ["", "Plain: what the stage did before (polars reads the file; training memory-maps the shards "
              "and reads pages as batches need them). Checked: the same after the sha256 check against the "
              "upstream manifest. The check is one sequential read plus sha256: "
              f"{max(r[1] / (r[3] - r[2]) for r in rows if r[3] > r[2]) / 1e6:,.0f} MB/s at best here."]
    body = "\n".join(lines)
    print(body)
    write_section("Input checks", body)


if __name__ == "__main__":
    main()

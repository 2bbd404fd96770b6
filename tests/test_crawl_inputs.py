"""A crawl's worth of inputs: WET files named by a list file (inputs.wet_list), batched into shards
(inputs.batch_size) with one ingest over a batch and the same clean documents whatever the batch
size, and SLURM seeing one group job per shard's chain."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import sys

import polars as pl
import pytest
import yaml

from conftest import ROOT, write_wet
from pipeline.config import ConfigError, input_shards, wet_batches
from pipeline.data.ingest import ingest

GOOD = "A perfectly ordinary paragraph of English text about gardens.\n".encode() * 3


def test_a_list_file_names_wet_files_after_inputs_wet(tmp_path):
    (tmp_path / "mirror").mkdir()
    for name in ["a", "b", "c"]:
        (tmp_path / "mirror" / f"{name}.warc.wet.gz").touch()
    with gzip.open(tmp_path / "wet.paths.gz", "wt") as f:  # like Common Crawl's wet.paths.gz
        f.write("# a comment\nb.warc.wet.gz\n\nhttps://data.commoncrawl.org/x/u.warc.wet.gz\n"
                f"{tmp_path / 'mirror' / 'c.warc.wet.gz'}\n")
    inputs = {"wet": ["mirror/a.warc.wet.gz"], "wet_list": "wet.paths.gz", "wet_list_prefix": "mirror/"}
    wet, _ = input_shards(inputs, base=tmp_path)
    assert wet == {"a": str(tmp_path / "mirror" / "a.warc.wet.gz"), "b": str(tmp_path / "mirror" / "b.warc.wet.gz"),
                   "u": "https://data.commoncrawl.org/x/u.warc.wet.gz", "c": str(tmp_path / "mirror" / "c.warc.wet.gz")}
    (tmp_path / "more.txt").write_text("missing.warc.wet.gz\n")
    with pytest.raises(ConfigError, match="inputs.wet_list.*missing.warc.wet.gz"):
        input_shards({**inputs, "wet_list": "more.txt"}, base=tmp_path)
    (tmp_path / "again.txt").write_text("a.warc.wet.gz\n")
    with pytest.raises(ConfigError, match="inputs.wet_list.*makes shard 'a'"):
        input_shards({**inputs, "wet_list": "again.txt"}, base=tmp_path)
    with pytest.raises(ConfigError, match="inputs.wet_list.*nowhere.txt"):
        input_shards({**inputs, "wet_list": "nowhere.txt"}, base=tmp_path)


def test_batches_are_consecutive_runs_named_after_their_first_file():
    wet = {name: f"{name}.warc.wet.gz" for name in ["a", "b", "c", "d", "e"]}
    assert wet_batches(wet, 1) == {name: [name] for name in wet}
    assert wet_batches(wet, 2) == {"a.x2": ["a", "b"], "c.x2": ["c", "d"], "e": ["e"]}
    assert wet_batches(wet, 10) == {"a.x5": ["a", "b", "c", "d", "e"]}


def test_a_batch_name_taken_by_another_input_is_a_config_error():
    with pytest.raises(ConfigError, match="inputs.batch_size.*'a.x2'"):
        wet_batches({"a": "a.gz", "b": "b.gz"}, 2, taken={"a.x2": "a.x2.warc.gz"})
    with pytest.raises(ConfigError, match="inputs.batch_size.*'a.x2'"):
        wet_batches({"a": "a.gz", "b": "b.gz", "a.x2": "a.x2.gz"}, 2)  # the last batch: a.x2 alone


def test_one_ingest_over_a_batch_is_its_files_ingested_one_by_one(tmp_path):
    first = write_wet(tmp_path / "first.warc.wet.gz", [GOOD, b"  \n", GOOD])
    second = write_wet(tmp_path / "second.warc.wet.gz", [b"\xff\xfe bad", GOOD])

    def run(paths, name):
        manifest = ingest(paths, output=str(tmp_path / f"{name}.parquet"), removed=str(tmp_path / f"{name}.r.parquet"),
                          manifest=str(tmp_path / f"{name}.json"), config={})
        return manifest, pl.read_parquet(tmp_path / f"{name}.parquet"), pl.read_parquet(tmp_path / f"{name}.r.parquet")

    batch, kept, removed = run([str(first), str(second)], "batch")
    one, kept1, removed1 = run(str(first), "one")
    two, kept2, removed2 = run(str(second), "two")
    assert kept.equals(pl.concat([kept1, kept2])) and removed.equals(pl.concat([removed1, removed2]))
    assert kept["source"].to_list() == ["first", "first", "second"]  # each document names its own file
    assert batch["counts"]["dropped"] == {"empty": 1, "invalid_utf8": 1}
    assert [entry["path"] for entry in batch["inputs"]] == [entry["path"] for entry in one["inputs"] + two["inputs"]]


def clean_docs(tmp_path, batch_size: int) -> tuple[pl.DataFrame, list[str]]:
    """The `data` DAG over two copies of the sample WET file: every clean document, and the shards."""
    config = tmp_path / f"bs{batch_size}.yaml"
    config.write_text(yaml.safe_dump({"inputs": {"wet": [str(tmp_path / "wet" / "*.warc.wet.gz")], "text": [],
                                                 "batch_size": batch_size},
                                      "results": str(tmp_path / "results"), "run": f"bs{batch_size}"}))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "data", "--configfile", str(config)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    clean = sorted((tmp_path / "results" / f"bs{batch_size}" / "data" / "clean").glob("*.parquet"))
    docs = pl.concat([pl.read_parquet(path) for path in clean]).sort(["id", "source"])
    return docs, [path.name.removesuffix(".parquet") for path in clean]


def test_the_batch_size_changes_the_jobs_not_the_clean_documents(tmp_path, sample_wet):
    (tmp_path / "wet").mkdir()
    for name in ["a", "b"]:  # the same records twice: dedup must keep one of each, batched or not
        shutil.copy(sample_wet, tmp_path / "wet" / f"{name}.warc.wet.gz")
    per_file, shards = clean_docs(tmp_path, 1)
    batched, batches = clean_docs(tmp_path, 2)
    assert shards == ["a", "b"] and batches == ["a.x2"]
    assert batched.height > 0 and batched.equals(per_file)


def slurm_dry_run(tmp_path, *extra: str) -> str:
    for i in range(5):
        write_wet(tmp_path / f"f{i}.warc.wet.gz", [GOOD])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"inputs": {"wet": [str(tmp_path / "*.warc.wet.gz")], "batch_size": 2},
                                      "results": str(tmp_path / "results")}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "data", "--workflow-profile", "workflow/profiles/slurm",
           *extra, "--configfile", str(config)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_slurm_sees_one_group_job_per_shard_chain_and_group_components_packs_shards(tmp_path):
    out = slurm_dry_run(tmp_path)
    assert re.search(r"^ingest\s+3$", out, re.M)  # 5 files in batches of 2: 3 shards
    assert out.count("Group job signatures") == 3 and out.count("Group job clean") == 3
    packed = slurm_dry_run(tmp_path, "--group-components", "signatures=3", "clean=2")
    assert packed.count("Group job signatures") == 1 and packed.count("Group job clean") == 2


def test_a_batch_of_urls_is_fetched_file_by_file_into_one_ingest(tmp_path):
    config = tmp_path / "c.yaml"
    urls = [f"https://data.commoncrawl.org/x/CC-{i}.warc.wet.gz" for i in range(3)]
    config.write_text(yaml.safe_dump({"inputs": {"wet": urls, "batch_size": 2}, "results": str(tmp_path / "r")}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "data", "--configfile", str(config)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^fetch_wet\s+3$", result.stdout, re.M) and re.search(r"^ingest\s+2$", result.stdout, re.M)
    downloads = tmp_path / "r" / "sample" / "fetch"
    assert f"input: {downloads}/CC-0.warc.wet.gz, {downloads}/CC-1.warc.wet.gz\n" in result.stdout

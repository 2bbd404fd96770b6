"""WARC inputs in batches (inputs.warc_batch_size): batch names that never meet a WET shard's,
url_filter -> extract over a batch equal to its files one by one, WARC list files, and the DAG
Snakemake plans (locally and under the SLURM profile)."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys

import polars as pl
import pytest
import yaml

from conftest import ROOT, write_warc
from pipeline.config import ConfigError, input_shards, warc_batches, wet_batches
from pipeline.data.extract import extract
from pipeline.data.url_filter import url_filter

TEST_LIST = ROOT / "tests" / "data" / "url_blocklist.txt"
HTML = [("Content-Type", "text/html; charset=utf-8")]


def page(topic: str) -> bytes:
    paragraphs = "".join(f"<p>The {topic} of the town was rebuilt in the spring of year {i}, after two winters "
                         f"of storms had broken the eastern wall and filled the inner basin with sand.</p>"
                         for i in range(4))
    return (f"<html><head><title>{topic}</title></head><body><nav><a href='/'>Home</a></nav>"
            f"<article><h1>News of the {topic}</h1>{paragraphs}</article></body></html>").encode()


def test_warc_batches_are_consecutive_runs_named_after_their_first_file():
    warc = {f"{name}.warc": f"{name}.warc.gz" for name in ["a", "b", "c", "d", "e"]}
    assert warc_batches(warc, 1) == {name: [name] for name in warc}
    assert warc_batches(warc, 2) == {"a.x2.warc": ["a.warc", "b.warc"], "c.x2.warc": ["c.warc", "d.warc"],
                                     "e.warc": ["e.warc"]}
    assert list(warc_batches(warc, 10).items()) == [("a.x5.warc", ["a.warc", "b.warc", "c.warc", "d.warc", "e.warc"])]
    # the same stems as WET files, batched alike: the names stay apart
    wet = {name: f"{name}.warc.wet.gz" for name in ["a", "b", "c"]}
    assert set(wet_batches(wet, 2, taken=warc_batches(warc, 2))) == {"a.x2", "c"}
    # only a one-file WET shard ending in .warc (a WET file named a.x2.warc.wet) can take a WARC batch's name
    with pytest.raises(ConfigError, match="inputs.batch_size.*'a.x2.warc'"):
        wet_batches({"a.x2.warc": "a.x2.warc.wet"}, 1, taken=warc_batches(warc, 2))


def test_a_list_file_names_warc_files_after_inputs_warc(tmp_path):
    (tmp_path / "mirror").mkdir()
    for name in ["a", "b"]:
        (tmp_path / "mirror" / f"{name}.warc.gz").touch()
    with gzip.open(tmp_path / "warc.paths.gz", "wt") as f:  # like Common Crawl's warc.paths.gz
        f.write("# a comment\nb.warc.gz\nhttps://data.commoncrawl.org/x/u.warc.gz\n")
    inputs = {"wet": [], "warc": ["mirror/a.warc.gz"], "warc_list": "warc.paths.gz", "warc_list_prefix": "mirror/"}
    _, warc = input_shards(inputs, base=tmp_path)
    assert warc == {"a.warc": str(tmp_path / "mirror" / "a.warc.gz"), "b.warc": str(tmp_path / "mirror" / "b.warc.gz"),
                    "u.warc": "https://data.commoncrawl.org/x/u.warc.gz"}
    (tmp_path / "again.txt").write_text("a.warc.gz\n")
    with pytest.raises(ConfigError, match="inputs.warc_list.*makes shard 'a.warc'"):
        input_shards({**inputs, "warc_list": "again.txt"}, base=tmp_path)
    with pytest.raises(ConfigError, match="inputs.warc_list.*nowhere.txt"):
        input_shards({**inputs, "warc_list": "nowhere.txt"}, base=tmp_path)


def run_batch(out, paths: list[str]) -> dict[str, tuple[dict, pl.DataFrame, pl.DataFrame]]:
    """url_filter then extract over `paths` as one shard: {stage: (counts, kept, removed)}."""
    url_config = {"lists": [{"name": "demo", "path": "tests/data/url_blocklist.txt"}]}
    url_filter(paths, output=str(out / "url_filter" / "s.parquet"), removed=str(out / "url_filter" / "r.parquet"),
               manifest=str(out / "url_filter" / "s.manifest.json"), config=url_config,
               lists={"demo": str(TEST_LIST)})
    extract(paths, str(out / "url_filter" / "s.parquet"), output=str(out / "extract" / "s.parquet"),
            removed=str(out / "extract" / "r.parquet"), manifest=str(out / "extract" / "s.manifest.json"), config={})
    return {stage: (yaml.safe_load((out / stage / "s.manifest.json").read_text())["counts"],
                    pl.read_parquet(out / stage / "s.parquet"), pl.read_parquet(out / stage / "r.parquet"))
            for stage in ("url_filter", "extract")}


def test_a_batch_is_its_warc_files_filtered_and_extracted_one_by_one(tmp_path):
    # a page three times (trafilatura drops a paragraph seen more than twice, within a file) ...
    first = write_warc(tmp_path / "first.warc.gz", [*[(f"http://news.example/a{i}", "200 OK", HTML, page("harbour"))
                                                      for i in range(3)],
                                                    ("http://www.blocked.example/x", "200 OK", HTML, page("spam")),
                                                    ("http://news.example/b", "404 Not Found", HTML, b"gone")])
    # ... and once more in the next file: its dedup cache must start afresh per file, or this text shrinks
    second = write_warc(tmp_path / "second.warc.gz", [("http://news.example/a", "200 OK", HTML, page("harbour")),
                                                      ("http://news.example/c", "200 OK", HTML, page("bridge"))])
    batch = run_batch(tmp_path / "batch", [str(first), str(second)])
    ones = [run_batch(tmp_path / name, [str(path)]) for name, path in (("one", first), ("two", second))]
    for stage in ("url_filter", "extract"):
        counts, kept, removed = batch[stage]
        assert kept.equals(pl.concat([one[stage][1] for one in ones])), stage
        assert removed.equals(pl.concat([one[stage][2] for one in ones])), stage
        for key in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
            assert counts[key] == sum(one[stage][0][key] for one in ones), (stage, key)
    assert batch["url_filter"][0]["dropped"] == {"url_blocklist:demo": 1}
    assert batch["extract"][0]["dropped"] == {"http_status": 1}
    kept = batch["extract"][1]
    assert kept["source"].to_list() == ["first.warc"] * 3 + ["second.warc"] * 2  # each names its own file
    assert kept["text"][0] == kept["text"][3]


def dry_run(tmp_path, inputs: dict, *extra: str) -> str:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"inputs": {"wet": [], "text": [], **inputs}, "results": str(tmp_path / "r")}))
    cmd = [sys.executable, "-m", "snakemake", "-n", "data", *extra, "--configfile", str(config)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def jobs(out: str, rule: str) -> int:
    found = re.search(rf"^{rule}\s+(\d+)$", out, re.M)
    return int(found.group(1)) if found else 0


def test_a_dry_run_plans_one_chain_per_warc_batch(tmp_path):
    for i in range(5):
        write_warc(tmp_path / f"f{i}.warc.gz", [("http://news.example/a", "200 OK", HTML, page("harbour"))])
    wet = tmp_path / "w.warc.wet.gz"
    wet.touch()  # a dry run reads no input
    inputs = {"warc": [str(tmp_path / "*.warc.gz")], "warc_batch_size": 2, "wet": [str(wet)]}
    out = dry_run(tmp_path, inputs)
    for rule, n in [("url_filter", 3), ("extract", 3), ("ingest", 1), ("langid", 4), ("pii", 4), ("fetch_warc", 0)]:
        assert jobs(out, rule) == n, (rule, out[-2000:])
    assert f"input: {tmp_path}/f0.warc.gz, {tmp_path}/f1.warc.gz\n" in out
    assert "extract/f0.x2.warc.parquet" in out and "extract/f4.warc.parquet" in out
    # under the SLURM profile a shard's chain is one group job; group-components packs several
    slurm = dry_run(tmp_path, inputs, "--workflow-profile", "workflow/profiles/slurm")
    assert slurm.count("Group job signatures") == 4 and slurm.count("Group job clean") == 4
    packed = dry_run(tmp_path, inputs, "--workflow-profile", "workflow/profiles/slurm", "--group-components",
                     "signatures=4")
    assert packed.count("Group job signatures") == 1


def test_a_batch_of_warc_urls_is_fetched_file_by_file_into_one_url_filter(tmp_path):
    urls = [f"https://data.commoncrawl.org/x/CC-{i}.warc.gz" for i in range(3)]
    out = dry_run(tmp_path, {"warc": urls, "warc_batch_size": 2})
    assert jobs(out, "fetch_warc") == 3 and jobs(out, "url_filter") == 2 and jobs(out, "extract") == 2
    downloads = tmp_path / "r" / "sample" / "fetch" / "warc"
    assert f"input: {downloads}/CC-0.warc.gz, {downloads}/CC-1.warc.gz" in out

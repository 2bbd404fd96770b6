"""The warc preset through Snakemake: WARC and WET inputs in one run, both entry points adding up at
langid in the drop report, provenance in clean/, and every artifact verifying."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from conftest import ROOT
from pipeline.artifacts import verify


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    results = tmp_path_factory.mktemp("warc")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "data", "--configfile", "workflow/configs/warc.yaml",
           "--config", f"results={results}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return results / "warc" / "data"


@pytest.mark.slow
def test_both_entry_points_add_up_at_langid(data):
    report = json.loads((data / "drop_report.json").read_text())
    assert report["entries"] == ["wet", "warc"]
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["ingest", "url_filter", "extract", "langid", "quality", "dedup", "decontaminate", "pii"]
    assert stages["ingest"]["docs_in"] == 1                       # the whirlwind WET record
    assert stages["url_filter"]["docs_in"] == 17                  # 16 sample responses + whirlwind's
    assert stages["url_filter"]["dropped"] == {"url_blocklist:demo": 1}
    assert stages["extract"]["docs_in"] == stages["url_filter"]["docs_out"] == 16
    assert stages["langid"]["docs_in"] == stages["ingest"]["docs_out"] + stages["extract"]["docs_out"]
    assert "| url_filter (WARC) |" in (data / "drop_report.md").read_text()


@pytest.mark.slow
def test_shards_provenance_and_verify(data):
    shards = sorted(p.name for p in (data / "clean").glob("*.parquet"))
    assert sorted(p.name for p in (data / "decontaminated").glob("*.parquet")) == shards  # WARC shards too
    assert shards == ["CC-MAIN-20200808165417-20200808195417-00395.head.warc.parquet", "whirlwind.parquet",
                      "whirlwind.warc.parquet"]  # the same stem as WET and as WARC: two shards
    entered = pl.concat([pl.read_parquet(data / folder / shard, columns=["input", "extractor"]) for folder, shard in
                         [("ingest", shards[1]), ("extract", shards[0]), ("clean", shards[0])]])  # clean/ keeps them
    assert sorted(set(entered.select("input", "extractor").iter_rows())) == [
        ("warc", "trafilatura 2.3.1"), ("wet", "commoncrawl-wet")]
    removed = pl.read_parquet(data / "removed" / "url_filter" / shards[0])
    assert removed["url"].to_list() == ["http://035.psb556.com/24/i/u_1090813/article.html"]
    assert verify(data.parent)[1] == []

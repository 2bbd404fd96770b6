"""The web-data DAG end to end through Snakemake on the bundled sample: the drop-report contract,
byte-identical reruns, and `verify`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest
import yaml

from conftest import ROOT
from pipeline.artifacts import verify
from pipeline.data.report import data_report

STAGES = ["ingest", "langid", "quality", "dedup", "decontaminate", "pii"]


def snakemake_data(results, run="it"):
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "data", "--config", f"results={results}", f"run={run}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return results / run / "data"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    return snakemake_data(root / "a"), snakemake_data(root / "b")


def test_drop_report_contract(two_runs):
    data, _ = two_runs
    report = json.loads((data / "drop_report.json").read_text())
    stages = report["stages"]
    assert [s["name"] for s in stages] == STAGES
    assert stages[0]["docs_in"] == 318
    for prev, stage in zip([None, *stages], stages):
        assert stage["docs_in"] == stage["docs_out"] + sum(stage["dropped"].values())
        if prev:
            assert stage["docs_in"] == prev["docs_out"]
    for name in ("funnel", "drop_reasons", "languages"):
        assert (data / "plots" / f"{name}.png").stat().st_size > 1000
    assert "| quality |" in (data / "drop_report.md").read_text()
    # contamination is counted by decontaminate (decontaminated/), which runs before pii
    found = report["contamination"]
    assert sorted(found["overlapping_docs"]) == ["arithmetic", "gsm8k", "mmlu"] and found["removed"] is True
    decontaminate = stages[STAGES.index("decontaminate")]
    assert all(n <= found["overlapping_docs"][reason.removeprefix("contamination:")]
               for reason, n in decontaminate["dropped"].items())


def test_clean_and_removed_documents(two_runs):
    data, _ = two_runs
    clean = pl.concat([pl.read_parquet(p) for p in sorted((data / "clean").glob("*.parquet"))])
    assert {"id", "url", "text", "lang", "lang_score", "input", "extractor"} <= set(clean.columns)
    assert clean["input"].unique().to_list() == ["wet"]
    assert clean["lang"].unique().to_list() == ["en"] and clean["id"].is_unique().all()
    report = json.loads((data / "drop_report.json").read_text())
    for stage in report["stages"]:
        removed = pl.concat([pl.read_parquet(p) for p in (data / "removed" / stage["name"]).glob("*.parquet")])
        assert {"id", "url", "reason", "text"} <= set(removed.columns)
        assert removed.height == sum(stage["dropped"].values())
        assert dict(removed["reason"].value_counts().iter_rows()) == stage["dropped"]
    dedup_removed = pl.read_parquet(next((data / "removed" / "dedup").glob("*.parquet")))
    assert "duplicate_of" in dedup_removed.columns


def test_rerun_is_byte_identical(two_runs):
    a, b = two_runs
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert any(str(f).startswith("clean/") for f in files)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_verify_catches_a_changed_byte(two_runs, tmp_path):
    data, _ = two_runs
    assert verify(data.parent)[1] == []
    clean = next((data / "clean").glob("*.parquet"))
    original = clean.read_bytes()
    try:
        clean.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        problems = verify(data.parent)[1]
        assert len(problems) >= 1 and all(str(clean) in p for p in problems)
    finally:
        clean.write_bytes(original)


def test_the_report_counts_the_sealed_shards_not_a_stale_manifest_left_in_the_folder(two_runs, tmp_path):
    data, _ = two_runs
    report = (data / "drop_report.json").read_bytes()
    shard = next((data / "langid").glob("*.head.manifest.json"))
    stale = data / "langid" / "CC-MAIN-old-config.manifest.json"  # a shard of an earlier inputs.wet
    shutil.copy(shard, stale)
    try:
        data_report(data)
        assert (data / "drop_report.json").read_bytes() == report
    finally:
        stale.unlink()


def test_conda_environment_pins_what_pyproject_pins():
    """envs/wetstone.yaml (rules under --software-deployment-method conda) must install every
    dependency of pyproject.toml with the same pin (torch comes from conda-forge as pytorch)."""
    import tomllib
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "envs" / "wetstone.yaml").read_text())["dependencies"]
    conda_pip = {line.strip() for entry in env if isinstance(entry, dict) for line in entry["pip"]}
    missing = [pin for pin in pins if not pin.startswith("torch") and pin not in conda_pip]
    assert not missing, f"envs/wetstone.yaml lacks (or pins differently) {missing}"

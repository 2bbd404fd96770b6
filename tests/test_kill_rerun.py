"""SIGKILL of `snakemake` during the data and tokenizer stages, then the README's rerun, ends with
the same bytes as an uninterrupted run and no process left behind.

One run is killed twice (the whole process group, as a closed terminal or an OOM killer would):
once when langid starts writing, once when the tokenizer is trained and the tokenize jobs run.
Each time the README's rerun command (`snakemake --unlock`, then `snakemake --cores all
--rerun-incomplete`) picks it up. Each run works in its own folder (a copy of config.yaml, the
Snakefile from this checkout), so `.snakemake/` locks and markers are the test's own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.artifacts import verify

pytestmark = pytest.mark.slow
TARGETS = ["tokens"]  # the data stages to clean/, the tokenizer, tokenize; not the report (plots) or pretraining
POLL_S = 0.05


def snakemake(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *args]


def workdir(tmp_path: Path, name: str) -> Path:
    work = tmp_path / name
    work.mkdir()
    shutil.copy(ROOT / "config.yaml", work)
    return work


def run(work: Path, *args: str) -> None:
    result = subprocess.run(snakemake(*args), cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def processes_in(work: Path) -> list[str]:
    """Command lines of live processes whose working folder is `work` (every job's is)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd") == str(work):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def kill_when(work: Path, ready, *args: str) -> None:
    """Start the DAG in its own process group; SIGKILL the group as soon as `ready()`."""
    proc = subprocess.Popen(snakemake("--cores", "2", *args, *TARGETS), cwd=work, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready() and proc.poll() is None:
        time.sleep(POLL_S)
    assert proc.poll() is None, "the run ended before the kill point: the test killed nothing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(100):  # the kernel reaps the group's children just after
        if not processes_in(work):
            break
        time.sleep(POLL_S)
    assert processes_in(work) == []


def rerun_as_readme_says(work: Path) -> None:
    run(work, "--unlock")
    run(work, "--cores", "all", "--rerun-incomplete", *TARGETS)


def results(work: Path) -> dict[str, bytes]:
    """Every file of the run but logs and timings (manifests included: their paths are relative)."""
    root = work / "results" / "sample"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in ("logs", "benchmarks")}


def test_sigkill_then_readme_rerun_gives_the_uninterrupted_bytes(tmp_path):
    clean = workdir(tmp_path, "uninterrupted")
    run(clean, "--cores", "2", *TARGETS)

    killed = workdir(tmp_path, "killed")
    data, tokens = killed / "results/sample/data", killed / "results/sample/tokens"
    kill_when(killed, lambda: any((data / "langid").glob("*")))
    run(killed, "--unlock")  # the README's rerun, killed in its turn
    kill_when(killed, lambda: (killed / "results/sample/tokenizer/tokenizer.json").exists(), "--rerun-incomplete")
    assert not (tokens / "manifest.json").exists()
    rerun_as_readme_says(killed)

    expected, got = results(clean), results(killed)
    assert any(name.startswith("data/clean/") for name in expected) and "tokenizer/tokenizer.json" in expected
    assert any(name.startswith("tokens/train/") and name.endswith(".bin") for name in expected)
    assert sorted(got) == sorted(expected)  # nothing missing, no temporary left over
    assert [name for name in expected if got[name] != expected[name]] == []
    assert verify(killed / "results" / "sample")[1] == []

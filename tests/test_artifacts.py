"""Atomic writes, manifests and `verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.__main__ import main
from pipeline.artifacts import (ChangedInput, atomic_path, atomic_write_text, check_file, read_checked, seal, verify,
                                write_manifest)


def test_atomic_path_leaves_old_file_when_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def make_stage(tmp_path):
    (tmp_path / "stage").mkdir()
    data = tmp_path / "stage" / "a.bin"
    data.write_bytes(b"payload")
    write_manifest(tmp_path / "stage" / "manifest.json", stage="s", config={"k": 1},
                   inputs=[], outputs={data: 1})
    return data


def test_verify_passes_then_names_a_changed_byte(tmp_path):
    data = make_stage(tmp_path)
    assert verify(tmp_path) == (1, [])
    data.write_bytes(b"paylaod")
    checked, problems = verify(tmp_path)
    assert len(problems) == 1 and "changed" in problems[0] and str(data) in problems[0]


def test_verify_names_a_missing_file_and_cli_exits_nonzero(tmp_path, capsys):
    data = make_stage(tmp_path)
    assert main(["verify", str(tmp_path)]) == 0
    data.unlink()
    assert main(["verify", str(tmp_path)]) == 1
    assert "missing" in capsys.readouterr().err


def test_seal_sums_shard_counts_and_refuses_mixed_configs(tmp_path):
    for name, n in [("a", 3), ("b", 4)]:
        out = tmp_path / f"{name}.bin"
        out.write_bytes(name.encode())
        write_manifest(tmp_path / f"{name}.manifest.json", stage="s", config={"k": 1}, inputs=[],
                       outputs={out: n}, counts={"docs_in": n, "dropped": {"x": 1}})
    sealed = seal(tmp_path / "manifest.json", sorted(tmp_path.glob("*.manifest.json")))
    assert sealed["counts"] == {"docs_in": 7, "dropped": {"x": 2}}
    assert [o["path"] for o in sealed["outputs"]] == ["a.bin", "b.bin"]
    assert verify(tmp_path)[1] == []
    write_manifest(tmp_path / "c.manifest.json", stage="s", config={"k": 2}, inputs=[], outputs={})
    with pytest.raises(ValueError, match="disagree"):
        seal(tmp_path / "manifest.json", sorted(tmp_path.glob("?.manifest.json")))
    assert json.loads((tmp_path / "manifest.json").read_text())["counts"]["docs_in"] == 7


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "out.parquet"
    leftover = tmp_path / f".out.parquet.tmp-{int(dead.stdout)}"  # what SIGKILL mid-write leaves
    leftover.write_bytes(b"half")
    alive = tmp_path / f".out.parquet.tmp-{os.getppid()}"  # a writer still running: left alone
    alive.write_bytes(b"busy")
    atomic_write_text(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out.parquet"]


@pytest.mark.parametrize("named", ["/dev/zero", "../../outside.bin", "link.bin", "/etc/hostname"])
def test_verify_reads_only_regular_files_under_the_root(tmp_path, named):
    root = tmp_path / "results"
    (root / "stage").mkdir(parents=True)
    (tmp_path / "outside.bin").write_bytes(b"x")
    (root / "stage" / "link.bin").symlink_to("/dev/zero")
    (root / "stage" / "manifest.json").write_text(json.dumps(
        {"outputs": [{"path": named, "sha256": "0" * 64, "bytes": 1}]}))
    checked, problems = verify(root)  # /dev/zero would never end
    assert checked == 1 and len(problems) == 1 and "not read" in problems[0]


def test_a_fifo_under_the_root_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.bin")  # reading it would block forever
    (tmp_path / "manifest.json").write_text(json.dumps({"outputs": [{"path": "pipe.bin", "sha256": "0", "bytes": 0}]}))
    assert verify(tmp_path)[1] == [f"not a regular file: {tmp_path / 'pipe.bin'} (named by "
                                   f"{tmp_path / 'manifest.json'}); not read"]


def test_read_checked_names_a_changed_file_and_one_no_manifest_names(tmp_path):
    data, manifest = make_stage(tmp_path), tmp_path / "stage" / "manifest.json"
    assert read_checked(data) == b"payload"  # found through the folder's manifest.json
    data.write_bytes(b"pazload")
    with pytest.raises(ChangedInput, match=f"{data}: sha256 differs from {manifest}"):
        read_checked(data)
    with pytest.raises(ChangedInput, match=f"{data}: sha256 differs"):
        check_file(data)
    stray = tmp_path / "stage" / "stray.bin"
    stray.write_bytes(b"payload")
    with pytest.raises(ChangedInput, match="stray.bin: not an output named by"):
        read_checked(stray)
    with pytest.raises(ChangedInput, match="no manifest beside it"):
        read_checked(tmp_path / "outside.bin")


def test_seal_merges_metrics_like_stats(tmp_path):
    for name, langs in {"a": {"en": 3, "fr": 1}, "b": {"en": 2, "de": 5}}.items():
        write_manifest(tmp_path / f"{name}.manifest.json", stage="langid", config={}, inputs=[], outputs={},
                       counts={"docs_in": 4, "errors": [name]},
                       metrics={"languages_in": langs, "model": "lid.176.ftz", "groups": ["x", "y"]})
    metrics = seal(tmp_path / "manifest.json", sorted(tmp_path.glob("?.manifest.json")))["metrics"]
    assert metrics["languages_in"] == {"en": 5, "fr": 1, "de": 5}
    assert metrics["model"] == "lid.176.ftz" and metrics["groups"] == ["x", "y"]  # agreed on: kept once
    assert metrics["shards"] == 2

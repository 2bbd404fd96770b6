"""Atomic writes, manifests and `verify`."""

from __future__ import annotations

import json

import pytest

from pipeline.__main__ import main
from pipeline.artifacts import atomic_path, atomic_write_text, verify, write_manifest
from pipeline.seal import seal


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

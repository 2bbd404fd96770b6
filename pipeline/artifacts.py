"""Artifacts: atomic writes, sha256 checksums, stage manifests and `verify`.

Every stage writes its files through `atomic_path` (temp file beside the target, fsync, rename), so
a crash never leaves a half file under a final name. Every job then writes a manifest naming its
config slice (and that slice's hash), the code version, its inputs and its outputs with sha256,
bytes and record counts, and its counts and metrics. Output paths in a manifest are relative to
the manifest's folder, so a results tree can be moved and still verify.

Manifests hold no timestamps: the same config and inputs give the same manifest bytes.

A stage reads only files an upstream manifest names (never a folder's glob, which would pick up
files of an earlier config), and checks their sha256 against that manifest before it uses them
(`read_checked`, `check_file`, and `check_inputs` for models, tokenizers and export folders): a
changed byte fails the job naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pipeline

MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove `.<name>.tmp-<pid>` files beside `path` whose writer is gone (a killed job's)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it onto
    `path`. On failure the temporary file is removed and `path` is left as it was. Temporaries
    that a killed writer of `path` left behind are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """Stable JSON: sorted keys, two-space indent, trailing newline (same object, same bytes)."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of a config slice: the key that says 'same settings'."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


@functools.cache  # two git calls; a job writing a manifest per shard (dedup clusters) asks once
def code_version() -> str:
    """Package version plus the git commit when the code runs from a checkout (`+dirty` when the
    tracked files differ from it)."""
    root = Path(pipeline.__file__).resolve().parent.parent
    version = pipeline.__version__
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def file_entry(path: str | os.PathLike, relative_to: Path | None = None,
               records: int | None = None) -> dict[str, Any]:
    path = Path(path)
    entry: dict[str, Any] = {
        "path": os.path.relpath(path, relative_to) if relative_to else str(path),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    if records is not None:
        entry["records"] = records
    return entry


def write_manifest(path: str | os.PathLike, *, stage: str, config: Any,
                   inputs: Iterable[str | os.PathLike],
                   outputs: dict[str | os.PathLike, int | None],
                   counts: dict[str, Any] | None = None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash `inputs` and `outputs` (path -> record count or None) and write the manifest atomically.

    Outputs are recorded relative to the manifest's folder (`../removed/x.parquet` is fine)."""
    path = Path(path)
    folder = path.parent.resolve()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stage,
        "config": config,
        "config_sha256": config_hash(config),
        "code_version": code_version(),
        "inputs": [file_entry(p) for p in inputs],
        "outputs": sorted((file_entry(Path(p).resolve(), folder, n) for p, n in outputs.items()),
                          key=lambda entry: entry["path"]),
        "counts": counts or {},
        "metrics": metrics or {},
    }
    atomic_write_json(path, manifest)
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable manifest ({e})") from e
    if not isinstance(manifest, dict) or "outputs" not in manifest:
        raise ValueError(f"{path}: not a manifest (no 'outputs')")
    return manifest


class ChangedInput(ValueError):
    """An input whose bytes are not those its upstream manifest recorded."""


def _manifest_beside(path: Path) -> Path | None:
    for candidate in (path.with_name(f"{path.stem}.manifest.json"), path.with_name("manifest.json")):
        if candidate.is_file():
            return candidate
    return None


def upstream_manifest(path: str | os.PathLike) -> Path:
    """The manifest of the job that wrote `path`: `<stem>.manifest.json` beside it (a per-shard
    job), else the folder's `manifest.json` (tokenizer.json, clusters.parquet)."""
    path = Path(path)
    if manifest := _manifest_beside(path):
        return manifest
    raise ChangedInput(f"{path}: no manifest beside it ({path.stem}.manifest.json or manifest.json) "
                       "names it; inputs must come from the stage that writes them")


def manifest_entry(path: str | os.PathLike, manifest_path: str | os.PathLike) -> dict[str, Any]:
    """The output entry of `manifest_path` that names `path`."""
    manifest_path = Path(manifest_path)
    target = Path(path).resolve()
    for entry in read_manifest(manifest_path)["outputs"]:
        if (manifest_path.parent / entry["path"]).resolve() == target:
            return entry
    raise ChangedInput(f"{path}: not an output named by {manifest_path} (a file of another run or config?)")


def _changed(path: str | os.PathLike, manifest_path: str | os.PathLike) -> ChangedInput:
    return ChangedInput(f"{path}: sha256 differs from {manifest_path}, which its stage wrote with it; "
                        "the file changed since: rerun that stage (snakemake --forcerun <rule>)")


def read_checked(path: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> bytes:
    """The bytes of `path`, read once and checked against the manifest naming it (by default
    `upstream_manifest(path)`), so the stage parses exactly the bytes that were hashed."""
    manifest_path = manifest_path or upstream_manifest(path)
    entry = manifest_entry(path, manifest_path)
    data = Path(path).read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _changed(path, manifest_path)
    return data


def check_file(path: str | os.PathLike, manifest_path: str | os.PathLike | None = None) -> None:
    """Check `path` against the manifest naming it without keeping its bytes (memory-mapped
    token shards, which the stage reads piecewise later)."""
    manifest_path = manifest_path or upstream_manifest(path)
    entry = manifest_entry(path, manifest_path)
    if os.path.getsize(path) != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise _changed(path, manifest_path)


def check_inputs(*paths: str | os.PathLike | None, required: bool = True) -> list[Path]:
    """Check each input against the manifest of the stage that wrote it before a stage loads it: a
    file (final.pt, tokenizer.json) with `check_file`, a folder (an export-hf folder) file by file
    against its own manifest.json. None is skipped. With `required=False` (serve, which also takes
    files made by hand) an input with no manifest beside it passes unchecked. Returns those checked."""
    checked = []
    for path in map(Path, filter(None, paths)):
        folder = path.is_dir()
        manifest = path / "manifest.json" if folder else _manifest_beside(path)
        if not required and not (manifest and manifest.is_file()):
            continue
        if folder:
            for entry in read_manifest(manifest)["outputs"]:
                check_file(path / entry["path"], manifest)
        else:
            check_file(path)  # without a manifest beside it, the error says so
        checked.append(path)
    return checked


def find_manifests(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.rglob("*.json")
                  if p.name == "manifest.json" or p.name.endswith(".manifest.json"))


def verify(root: str | os.PathLike) -> tuple[int, list[str]]:
    """Re-hash every output named by every manifest under `root`.

    Only regular files under `root` are read: a manifest naming an absolute path, a `..` path
    out of `root`, a link leading out of it, or a device (/dev/zero) is a problem, not a read.
    Returns (files checked, problems); each problem names the manifest and the file."""
    real_root = Path(root).resolve()
    manifests = find_manifests(root)
    if not manifests:
        return 0, [f"{root}: no manifest.json found"]
    checked, problems = 0, []
    for manifest_path in manifests:
        try:
            manifest = read_manifest(manifest_path)
        except ValueError as e:
            problems.append(str(e))
            continue
        for entry in manifest["outputs"]:
            target = manifest_path.parent / entry["path"]
            checked += 1
            if not target.resolve().is_relative_to(real_root):
                problems.append(f"outside {root}: {entry['path']!r} (named by {manifest_path}); not read")
            elif not target.exists():
                problems.append(f"missing: {target} (named by {manifest_path})")
            elif not stat.S_ISREG(target.stat().st_mode):
                problems.append(f"not a regular file: {target} (named by {manifest_path}); not read")
            elif target.stat().st_size != entry["bytes"] or sha256_file(target) != entry["sha256"]:
                problems.append(f"changed: {target} (sha256 differs from {manifest_path})")
    return checked, problems


def add_numbers(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Merge one shard's counts or metrics into the total: numbers are summed (nested dicts key by
    key); a string, flag or list every shard agrees on is kept once; lists that differ (one error
    list per file) are concatenated, and strings that differ become the sorted list of values."""
    out = dict(total)
    for key, value in part.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = add_numbers(out[key], value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out[key] + value
        elif out[key] == value:
            continue
        elif isinstance(value, list):
            out[key] = out[key] + value
        else:
            seen = out[key] if isinstance(out[key], list) else [out[key]]
            out[key] = sorted({*seen, value}, key=str)
    return out


def seal(out_path: str | os.PathLike, shard_manifests: list[str | os.PathLike]) -> dict[str, Any]:
    """Merge the per-shard manifests of one stage folder into `out_path` (pipeline/seal.py says how)."""
    out_path = Path(out_path)
    folder = out_path.parent.resolve()
    shards = [(Path(p), read_manifest(p)) for p in sorted(shard_manifests, key=str)]
    if not shards:
        raise ValueError(f"{out_path}: no shard manifests to seal")
    stages = {m["stage"] for _, m in shards}
    hashes = {m["config_sha256"] for _, m in shards}
    if len(stages) != 1 or len(hashes) != 1:
        raise ValueError(f"{out_path}: shard manifests disagree on stage or config "
                         f"({sorted(stages)}, {len(hashes)} config hashes): rerun the stage")
    counts: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    outputs = []
    for path, manifest in shards:
        counts = add_numbers(counts, manifest["counts"])
        metrics = add_numbers(metrics, manifest["metrics"])
        for entry in manifest["outputs"]:
            moved = dict(entry, path=os.path.relpath((path.parent / entry["path"]).resolve(), folder))
            outputs.append(moved)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": stages.pop(),
        "config": shards[0][1]["config"],
        "config_sha256": config_hash(shards[0][1]["config"]),
        "code_version": code_version(),
        "inputs": [file_entry(p) for p, _ in shards],
        "outputs": sorted(outputs, key=lambda e: e["path"]),
        "counts": counts,
        "metrics": {**metrics, "shards": len(shards), "by_shard": {p.name.removesuffix(".manifest.json"): m["counts"]
                                                       for p, m in shards}},
    }
    atomic_write_json(out_path, manifest)
    return manifest

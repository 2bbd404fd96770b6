"""Checkpoints: atomic, verified on load, sharded with torch.distributed.checkpoint (DCP).

Layout of `<out>/checkpoints/`:

    run.json              the run identity these checkpoints belong to
    metrics.jsonl         the run's metrics history (here, where Snakemake never deletes it)
    step_000200/          one checkpoint:
        *.distcp, .metadata   model and optimizer state, written by DCP (each rank its own shard)
        extra.json            step, run identity, the stage's state (data position, watchdog, ...)
                              and the RNG states of every rank, all as JSON
        meta.json             sha256 and size of every other file; written last
    best.json             step and val loss of the best-by-val checkpoint (never pruned)

One format for every `parallel` mode: the state dicts come from
`torch.distributed.checkpoint.state_dict.get_state_dict`, keyed by parameter name whatever the
wrapper, and DCP reshards on load, so a checkpoint written by 2 FSDP ranks loads into 1 process.
(`final.pt`, the stage's model export, is a plain consolidated `torch.save`.)

save: rank 0 makes `.tmp-step_000200/`, every rank writes its shard there, then rank 0 writes
extra.json and meta.json, fsyncs every file and renames the folder into place. A crash before the
rename leaves only a `.tmp-` folder, which is never loaded and is cleared by the next save.
load: newest first; a checkpoint without meta.json, or whose files differ from it, is skipped
with a warning, so a damaged latest checkpoint falls back to the previous good one. A checkpoint
whose run identity differs from the loading run's is refused with an error naming what differs
(a trainer of another config that wrote into this folder must not be resumed silently).

Trust: our own files are JSON (extra.json, meta.json, run.json), so loading them runs no code.
DCP's `.metadata` is a pickle that `dcp.load` unpickles: a checkpoint folder must be trusted like
code. meta.json's sha256s catch damage, not tampering (whoever can write `.metadata` can rewrite
meta.json), so never load a checkpoint folder from someone you would not run code from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pipeline.artifacts import atomic_write_json, canonical_json, fsync_path, sha256_file

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{6,})$")
META, EXTRA, RUN, BEST = "meta.json", "extra.json", "run.json", "best.json"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _one_process_is_intended() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: it may."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*assuming the intent is to (save|load) in a single process")
        yield


# --- RNG states -----------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This rank's RNG states as JSON-able data (torch's byte states as hex)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().numpy().tobytes().hex()}
    if torch.cuda.is_initialized():
        # this rank's device only: get_rng_state_all() would open a context on every GPU
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes().hex()
    return state


def _byte_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_byte_state(state["torch"]))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(_byte_state(state["cuda"]))


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (each rank draws its own dropout masks)."""
    if not _distributed():
        return [rng_state()]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


# --- finding a good checkpoint -----------------------------------------------------------------------

def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every renamed-into-place checkpoint, newest first (`.tmp-` ones never)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def problem(folder: Path) -> str | None:
    """Why this checkpoint cannot be trusted, or None when every file matches its meta.json."""
    meta_path = folder / META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"no readable {META} ({type(e).__name__})"
    if EXTRA not in meta.get("files", {}):
        return f"{EXTRA} is not listed in {META}"
    for name, entry in meta["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            return f"{name} differs from its sha256 in {META}"
    return None


def latest_good(root: Path) -> Path | None:
    """The newest checkpoint that verifies; each damaged newer one is named in a warning."""
    for step, folder in list_checkpoints(root):
        reason = problem(folder)
        if reason is None:
            return folder
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", folder, reason)
    return None


# --- run identity ---------------------------------------------------------------------------------

def claim(root: Path, run_config: dict[str, Any]) -> None:
    """Make `root` the checkpoint folder of this run config. Checkpoints written under another
    config are not resumed: their folder is moved aside to `<root>.stale-N` (never deleted)."""
    if _is_main():
        run_path = root / RUN
        if run_path.exists() and run_path.read_text(encoding="utf-8") != canonical_json(run_config):
            n = 1
            while root.with_name(f"{root.name}.stale-{n}").exists():
                n += 1
            stale = root.with_name(f"{root.name}.stale-{n}")
            log.warning("%s holds checkpoints of a different config; moved to %s, starting fresh", root, stale)
            root.rename(stale)
        if not run_path.exists():
            atomic_write_json(run_path, run_config)
    _barrier()


# --- save and load ---------------------------------------------------------------------------------

def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], keep: int, protect: set[int] = frozenset()) -> Path:
    """Write the checkpoint of `step` atomically (every rank calls this), then keep only the
    `keep` newest ones plus the steps in `protect` (the best one)."""
    final, tmp = step_dir(root, step), root / f".tmp-step_{step:06d}"
    if _is_main():
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale)  # a save cut off earlier
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _one_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    rng_states = gather_rng_states()
    _barrier()  # every rank's shard is on disk
    if _is_main():
        atomic_write_json(tmp / EXTRA, {**extra, "step": step, "rng": rng_states})
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for path in files:
            fsync_path(path)
        atomic_write_json(tmp / META, {"step": step, "files": {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files}})
        fsync_path(tmp)
        if final.exists():  # the same step saved again (after a watchdog restore)
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_path(root)
        for old_step, folder in list_checkpoints(root)[keep:]:
            if old_step not in protect:
                shutil.rmtree(folder)
    _barrier()
    return final


def identity_differences(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    """`key: saved -> expected` for every leaf that differs between two run identities."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        return [d for key in sorted(set(saved) | set(expected))
                for d in identity_differences(saved.get(key), expected.get(key), f"{prefix}{key}.")]
    return [] if saved == expected else [f"{prefix.rstrip('.')}: {saved!r} -> {expected!r}"]


class IdentityMismatch(ValueError):
    """A checkpoint written under another run identity (config, size, data)."""


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
         identity: dict[str, Any]) -> dict[str, Any]:
    """Check the checkpoint's run identity against `identity`, load model and optimizer state
    (resharded to this job's layout), set this rank's RNG state when the world size matches, and
    return the extra state (step, the stage's state, ...)."""
    extra = json.loads((folder / EXTRA).read_text(encoding="utf-8"))
    differences = identity_differences(extra.get("identity"), identity)
    if differences:
        raise IdentityMismatch(f"{folder} was written by a run of another config, refusing to resume it "
                               f"(checkpoint -> this run): " + "; ".join(differences)
                               + f". Move {folder.parent} aside to start afresh.")
    model_state, optim_state = get_state_dict(model, optimizer)  # templates DCP loads into
    state = {"model": model_state, "optimizer": optim_state}
    with _one_process_is_intended():
        dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    world_size = dist.get_world_size() if _distributed() else 1
    if len(extra["rng"]) == world_size:
        set_rng_state(extra["rng"][rank])
    else:
        log.warning("%s was written by %d ranks, this job has %d: RNG states not restored "
                    "(data order and weights are)", folder, len(extra["rng"]), world_size)
    return extra


def find_resumable(root: Path) -> Path | None:
    """The checkpoint every rank resumes from (rank 0 verifies, the others follow)."""
    return _broadcast(latest_good(root) if _is_main() else None)


def best_step(root: Path) -> int | None:
    path = root / BEST
    return json.loads(path.read_text(encoding="utf-8"))["step"] if path.exists() else None


def mark_best(root: Path, step: int, val_loss: float) -> None:
    if _is_main():
        atomic_write_json(root / BEST, {"step": step, "val_loss": val_loss})

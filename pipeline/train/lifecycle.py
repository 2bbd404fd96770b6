"""A trainer's life: it dies with its job, stops cleanly on a signal, and is alone in its folder.

Why each piece is needed: torchrun starts its workers in a new session, so killing Snakemake's
process group (Ctrl-C, or a scheduler killing the job) reaches torchrun but not the trainer, which
then trained on beside the rerun and wrote checkpoints of the old config into the new run's folder.

- `StopSignals`: the first SIGTERM / SIGINT asks the loop to stop after the current step (it saves
  a checkpoint, so a preempted job loses nothing); a second one exits at once.
- `watch_parent()`: the kernel sends SIGHUP when the parent dies (PR_SET_PDEATHSIG, Linux), and a
  thread polls os.getppid() as well (other systems, and a parent that died before the prctl);
  either asks for the same clean stop.
- `RunLock`: an fcntl.flock on `<out>/train.lock`, held by rank 0 for the whole run. The kernel
  drops it when the holder dies, however it dies, so a stale lock never blocks a rerun, and a
  live one makes the second trainer fail at once, naming the first one's pid.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LOCK_NAME = "train.lock"
PARENT_POLL_S = 1.0
_START_PPID = os.getppid()  # at import, as early as we can: the parent may die before watch_parent()


class RunLocked(RuntimeError):
    """Another live trainer holds the output folder."""


class RunLock:
    """An exclusive flock on `<folder>/train.lock`; the file holds the holder's pid (for the error)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise RunLocked(f"{self.path} is held by a running trainer (pid {holder}); stop it first, "
                            f"or use another output folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


_watched: StopSignals | None = None  # the current run's; the polling thread is started once per process


def watch_parent(signals: StopSignals) -> None:
    """Make `signals` see SIGHUP when this process's parent dies: the kernel sends it
    (PR_SET_PDEATHSIG, Linux), and a thread polling os.getppid() requests the same stop."""
    global _watched
    first = _watched is None
    _watched = signals
    if os.getppid() != _START_PPID:  # orphaned already, before anything could watch
        signals.request("SIGHUP")
    if not first:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the parent only", ctypes.get_errno())

    def poll() -> None:
        while not threading.Event().wait(PARENT_POLL_S):
            if os.getppid() != _START_PPID:
                _watched.request("SIGHUP")
                return

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


class StopSignals:
    """A stop request: SIGTERM / SIGINT (a scheduler, Ctrl-C) and SIGHUP (the parent died) set
    `requested`, and the loop stops after its step. A second SIGTERM / SIGINT exits at once; a
    parent's death never does (the kernel and the polling thread may both report it)."""

    ESCALATING = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (*self.ESCALATING, signal.SIGHUP)}

    def request(self, name: str) -> None:
        if self.requested is None:
            self.requested = name
            log.warning("%s: stopping after this step (its checkpoint is saved)%s", name,
                        "" if name == "SIGHUP" else "; send again to exit now")

    def restore(self) -> None:
        """Put back the handlers found at start (a run inside a longer-lived process, e.g. tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum in self.ESCALATING:
            raise SystemExit(128 + signum)  # asked twice: do not wait for the step to end
        self.request(signal.Signals(signum).name)

"""Watchdog: a step whose loss or gradient norm is NaN/inf does not update the weights.

One bad step is skipped and counted (a bad batch, an overflow). `patience` bad steps in a row mean
the weights or optimizer state have gone bad: the loop restores the last good checkpoint and
multiplies the learning rate by `lr_backoff` from then on (the usual response to a loss spike,
e.g. OPT-175B's logbook, https://arxiv.org/abs/2205.01068 section 2.5). More than `max_restores`
restores stop the run with an error rather than loop for ever.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK, SKIP, RESTORE = "ok", "skip", "restore"


class TrainingDiverged(RuntimeError):
    """The watchdog ran out of restores."""


@dataclass
class Watchdog:
    section: str  # the config section its keys belong to, for the error (not state)
    patience: int = 3
    lr_backoff: float = 0.5
    max_restores: int = 3
    lr_scale: float = 1.0  # multiplies the schedule's learning rate; lowered at each restore
    skipped: int = 0  # non-finite steps seen (all skipped)
    restores: int = 0
    in_a_row: int = 0

    def observe(self, finite: bool) -> str:
        """OK (apply the update), SKIP (drop it) or RESTORE (drop it and reload the checkpoint)."""
        if finite:
            self.in_a_row = 0
            return OK
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row < self.patience:
            return SKIP
        self.in_a_row = 0
        self.restores += 1
        if self.restores > self.max_restores:
            raise TrainingDiverged(f"{self.patience} non-finite steps in a row after {self.max_restores} "
                                   f"restores ({self.section}.nan_max_restores); lower {self.section}.lr")
        self.lr_scale *= self.lr_backoff
        return RESTORE

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "section"}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

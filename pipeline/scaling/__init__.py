"""Scaling laws: the sweep (sweep.py; `scaling-plan` prints it, plan.py), the law fits (laws.py), plots
and the scaling-fit stage (fit.py)."""

from pipeline.scaling.laws import bootstrap, compute_optimal, fit_loss, isoflop_fit

__all__ = ["bootstrap", "compute_optimal", "fit_loss", "isoflop_fit"]

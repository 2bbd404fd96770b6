"""Scaling laws: the sweep plan (plan.py), the fits (fit.py), plots and the scaling-fit stage."""

from pipeline.scaling.fit import bootstrap, compute_optimal, fit_loss, isoflop_fit

__all__ = ["bootstrap", "compute_optimal", "fit_loss", "isoflop_fit"]

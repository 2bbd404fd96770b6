"""The scaling fit's plots: the sweep's losses with both fits' curves, and the compute-optimal frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.report import plt, save_figure
from pipeline.scaling.fit import PUBLISHED, compute_optimal, predict


def _colors(budgets: list[float]) -> dict[float, Any]:
    cmap = plt.get_cmap("viridis")
    return {c: cmap(i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}


def plot_isoflop(points: list[dict[str, Any]], isoflop: dict[str, Any], path: Path) -> None:
    """Final loss against N per budget, each budget's parabola in log N, and its minimum (approach 2)."""
    budgets = sorted({p["flops"] for p in points if p["flops"] is not None})
    colors = _colors(budgets)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in isoflop["minima"]:
        c = m["flops"]
        ns = np.array([p["N"] for p in points if p["flops"] == c])
        ax.scatter(ns, [p["loss"] for p in points if p["flops"] == c], color=colors[c], label=f"C = {c:.2g}")
        grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 100)
        ax.plot(grid, np.polyval(m["coef"], np.log(grid)), color=colors[c], alpha=0.6)
        if m["N"] is not None:
            ax.scatter([m["N"]], [m["loss"]], marker="*", s=180, color=colors[c], edgecolor="black", zorder=3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss (nats/token)",
           title="IsoFLOP curves: a parabola in log N per budget, minima starred")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_fit(points: list[dict[str, Any]], params: dict[str, float], path: Path) -> None:
    """Final loss against N per budget with approach 3's L(N, D = C / 6N) curves; excluded points hollow."""
    budgets = sorted({p["flops"] for p in points if p["flops"] is not None})
    colors = _colors(budgets)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in budgets:
        at = [p for p in points if p["flops"] == c]
        ns = np.array([p["N"] for p in at])
        kept = [p for p in at if not p["excluded"]]
        ax.scatter([p["N"] for p in kept], [p["loss"] for p in kept], color=colors[c], label=f"C = {c:.2g}")
        dropped = [p for p in at if p["excluded"]]
        if dropped:
            ax.scatter([p["N"] for p in dropped], [p["loss"] for p in dropped], facecolor="none",
                       edgecolor=colors[c])
        grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 100)
        ax.plot(grid, predict(params, grid, c / (6 * grid)), color=colors[c], alpha=0.6)
    other = [p for p in points if p["flops"] is None]  # explicit (size, tokens) runs
    if other:
        ax.scatter([p["N"] for p in other], [p["loss"] for p in other], marker="x", color="gray",
                   label="explicit runs")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss (nats/token)",
           title=(f"Approach 3: L = {params['E']:.2f} + {params['A']:.3g}/N^{params['alpha']:.2f}"
                  f" + {params['B']:.3g}/D^{params['beta']:.2f}"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_frontier(params: dict[str, float], boot: dict[str, Any], isoflop: dict[str, Any],
                  points: list[dict[str, Any]], path: Path) -> None:
    """N*(C): approach 3 with its bootstrap band, approach 2's minima and power law, the runs, and
    Chinchilla's published frontier for scale."""
    C = np.array(boot["budgets"])
    grid = np.geomspace(C.min() / 3, C.max() * 3, 100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, compute_optimal(params, grid)["N"], color="tab:blue", label="approach 3 (our fit)")
    lo, hi = zip(*boot["optimal"]["N"])
    order = np.argsort(C)
    ax.fill_between(C[order], np.array(lo)[order], np.array(hi)[order], color="tab:blue", alpha=0.2,
                    label=f"approach 3, {boot['level']:.0%} bootstrap CI")
    found = [m for m in isoflop["minima"] if m["N"] is not None]
    if found:
        ax.scatter([m["flops"] for m in found], [m["N"] for m in found], marker="*", s=150, color="tab:orange",
                   edgecolor="black", zorder=3, label="approach 2 minima")
    if isoflop["N_opt"] is not None:
        ax.plot(grid, isoflop["N_opt"]["k"] * grid ** isoflop["N_opt"]["a"], color="tab:orange", linestyle="--",
                label=f"approach 2: N* ∝ C^{isoflop['N_opt']['a']:.2f}")
    chinchilla = PUBLISHED["Chinchilla (Hoffmann et al. 2022)"]
    ax.plot(grid, compute_optimal(chinchilla, grid)["N"], color="gray", linestyle=":",
            label="Chinchilla's approach 3 fit")
    runs = [p for p in points if p["flops"] is not None]
    ax.scatter([p["flops"] for p in runs], [p["N"] for p in runs], marker=".", color="black", alpha=0.5,
               label="runs trained")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="compute-optimal N*",
           title="Compute-optimal model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)

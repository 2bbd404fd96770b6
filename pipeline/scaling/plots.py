"""The scaling fit's plots: the sweep's losses with both fits' curves, and the compute-optimal frontier.
A fit that is not identified draws no curve or frontier line, only its runs and the words "not identified"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.figures import pyplot, save_figure
from pipeline.scaling.laws import PUBLISHED, compute_optimal, predict


def _colors(budgets: list[float]) -> dict[float, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("viridis")
    return {c: cmap(i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}


def plot_isoflop(points: list[dict[str, Any]], isoflop: dict[str, Any], path: Path) -> None:
    """Final loss against N per budget, each budget's parabola in log N, and its minimum (approach 2):
    a filled star inside the sizes trained, a hollow one outside them (extrapolated)."""
    plt = pyplot()
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
            ax.scatter([m["N"]], [m["loss"]], marker="*", s=180, edgecolor="black", zorder=3,
                       color=colors[c] if m["inside"] else "none")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss (nats/token)",
           title="IsoFLOP curves: minima starred (hollow: outside the sizes trained)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_fit(points: list[dict[str, Any]], result: dict[str, Any], path: Path) -> None:
    """Final loss against N per budget with approach 3's L(N, D = C / 6N) curves when it is
    identified (excluded points hollow), and the held-out prediction: the largest budget's best
    loss as predicted by the fit without it (interval as error bar) beside its runs."""
    plt = pyplot()
    params = result["approach3"]
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
        if result["identified"]:
            grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 100)
            ax.plot(grid, predict(params, grid, c / (6 * grid)), color=colors[c], alpha=0.6)
    other = [p for p in points if p["flops"] is None]  # explicit (size, tokens) runs
    if other:
        ax.scatter([p["N"] for p in other], [p["loss"] for p in other], marker="x", color="gray",
                   label="explicit runs")
    pred = result["prediction"]
    if pred["made"]:
        held = pred["heldout_flops"]
        size_n = next(p["N"] for p in points if p["flops"] == held and p["size"] == pred["best_loss"]["predicted_size"])
        value, (lo, hi) = pred["best_loss"]["predicted"]["value"], pred["best_loss"]["predicted"]["ci95"]
        ax.errorbar([size_n * 1.04], [value], yerr=[[value - lo], [hi - value]], fmt="D", color="tab:red",
                    capsize=4, zorder=4, label=f"predicted best at C = {held:.2g} (fit without it)")
    if result["identified"]:
        title = (f"Approach 3: L = {params['E']:.2f} + {params['A']:.3g}/N^{params['alpha']:.2f}"
                 f" + {params['B']:.3g}/D^{params['beta']:.2f}")
    else:
        title = "Approach 3: not identified (fit.md says why); the runs alone"
    ax.set(xscale="log", xlabel="parameters N", ylabel="final val loss (nats/token)", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_frontier(result: dict[str, Any], points: list[dict[str, Any]], path: Path) -> None:
    """N*(C): approach 3 with its bootstrap band and approach 2's power law, each only when
    identified; approach 2's minima inside the sizes trained; the held-out prediction of N* (error
    bar) beside the measured vertex; the runs; and Chinchilla's published frontier for scale."""
    plt = pyplot()
    boot, isoflop = result["bootstrap"], result["approach2"] or {"minima": [], "N_opt": None}
    C = np.array(boot["budgets"])
    grid = np.geomspace(C.min() / 3, C.max() * 3, 100)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if result["identified"]:
        ax.plot(grid, compute_optimal(result["approach3"], grid)["N"], color="tab:blue", label="approach 3 (our fit)")
        lo, hi = zip(*boot["optimal"]["N"])
        order = np.argsort(C)
        ax.fill_between(C[order], np.array(lo)[order], np.array(hi)[order], color="tab:blue", alpha=0.2,
                        label=f"approach 3, {boot['level']:.0%} bootstrap CI")
    else:
        ax.text(0.02, 0.97, "approach 3: not identified\n(fit.md says why)", transform=ax.transAxes, ha="left",
                va="top", fontsize=11, color="tab:red", bbox={"facecolor": "white", "edgecolor": "tab:red"})
    found = [m for m in isoflop["minima"] if m["inside"]]
    if found:
        ax.scatter([m["flops"] for m in found], [m["N"] for m in found], marker="*", s=150, color="tab:orange",
                   edgecolor="black", zorder=3, label="approach 2 minima (inside the sizes trained)")
    if isoflop["N_opt"] is not None:
        ax.plot(grid, isoflop["N_opt"]["k"] * grid ** isoflop["N_opt"]["a"], color="tab:orange", linestyle="--",
                label=f"approach 2: N* ∝ C^{isoflop['N_opt']['a']:.2f}")
    pred = result["prediction"]
    if pred["made"] and pred["N_opt"]["predicted"]:
        value, (lo, hi) = pred["N_opt"]["predicted"]["value"], pred["N_opt"]["predicted"]["ci95"]
        ax.errorbar([pred["heldout_flops"] * 1.05], [value], yerr=[[value - lo], [hi - value]], fmt="D",
                    color="tab:red", capsize=4, zorder=4, label="N* predicted without the largest budget")
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

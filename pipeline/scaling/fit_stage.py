"""scaling-fit: fit scaling laws to the sweep's pretrain runs (approach 3 and approach 2).

Reads the manifest of every run the plan names (`<runs>/<budget>/<size>/manifest.json`, never a
glob), checks each is the run planned and finished, and writes into <out>: fit.json (points,
approach 3 with bootstrap CIs, the compute-optimal allocation per budget and at
scaling.target_flops, approach 2), fit.md, isoflop.png, fit.png, frontier.png, plan.json and
manifest.json.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic_write_json, atomic_write_text, read_manifest, write_manifest
from pipeline.cli import json_arg
from pipeline.config import section_config
from pipeline.scaling.fit import (PARAMS, PUBLISHED, bootstrap, compute_optimal, fit_loss, grid_starts,
                                  isoflop_fit)
from pipeline.scaling.plan import plan_sweep
from pipeline.scaling.plots import plot_fit, plot_frontier, plot_isoflop

log = logging.getLogger(__name__)
BOOTSTRAP_STARTS = 3  # bootstrap refits start from the full fit's best 3 distinct minima, not the whole grid
OUTPUTS = ("fit.json", "fit.md", "isoflop.png", "fit.png", "frontier.png", "plan.json")


def read_points(plan: list[dict[str, Any]], runs: Path, params: str) -> tuple[list[dict[str, Any]], list[Path]]:
    """One point per planned run from its manifest: N (`params`: total or non_embedding), D (tokens
    trained), C (6ND and the model's own FLOP count) and the final val loss. A run that is missing,
    unfinished, or not the one planned is an error naming its manifest."""
    points, paths = [], []
    for run in plan:
        path = runs / run["budget"] / run["size"] / "manifest.json"
        manifest = read_manifest(path)
        metrics, counts, config = manifest["metrics"], manifest["counts"], manifest["config"]
        if manifest.get("stage") != "pretrain" or config.get("size") != run["size"]:
            raise ValueError(f"{path}: not the pretrain run of size {run['size']} the plan names")
        if config.get("max_steps") != run["steps"] or counts.get("steps") != run["steps"]:
            raise ValueError(f"{path}: trained {counts.get('steps')} of max_steps {config.get('max_steps')}; "
                             f"the plan says {run['steps']} (rerun the sweep: scaling or pretrain config changed)")
        loss = metrics.get("final_val_loss")
        if loss is None or not math.isfinite(loss):
            raise ValueError(f"{path}: metrics.final_val_loss is {loss!r}; the fit needs a finite val loss")
        n = metrics["params"] if params == "total" else metrics["params_non_embedding"]
        tokens = counts["tokens"]
        points.append({"budget": run["budget"], "size": run["size"], "flops": run["flops"], "N": n,
                       "D": tokens, "loss": loss, "flops_6nd": 6 * n * tokens,
                       "flops_model": metrics["flops_per_token"] * tokens, "excluded": False})
        paths.append(path)
    return points, paths


def exclude_highest(points: list[dict[str, Any]], k: int) -> None:
    """Mark the k highest-loss points excluded from the approach-3 fit (tiny, barely trained runs
    sit far off any power law); they stay in the tables and plots."""
    for p in sorted(points, key=lambda p: p["loss"], reverse=True)[:k]:
        p["excluded"] = True


def fit_sweep(points: list[dict[str, Any]], scaling: dict[str, Any]) -> dict[str, Any]:
    """Both approaches on the points, with bootstrap CIs for approach 3."""
    exclude_highest(points, scaling["exclude_highest"])
    kept = [p for p in points if not p["excluded"]]
    N, D, loss = (np.array([p[key] for p in kept], dtype=np.float64) for key in ("N", "D", "loss"))
    log.info("approach 3: fitting %d points from %d grid starts", len(kept), len(grid_starts()))
    fit = fit_loss(N, D, loss, delta=scaling["delta"], method=scaling["method"])
    budgets = sorted({p["flops"] for p in points if p["flops"] is not None})
    targets = budgets + [float(scaling["target_flops"])]
    boot = bootstrap(N, D, loss, np.array([s["theta"] for s in fit["solutions"][:BOOTSTRAP_STARTS]]),
                     resamples=scaling["bootstrap"]["resamples"], seed=scaling["bootstrap"]["seed"],
                     budgets=targets, delta=scaling["delta"], level=scaling["bootstrap"]["level"])
    optimal = compute_optimal(fit, np.array(targets))
    allocation = [{"flops": c, **{key: float(optimal[key][i]) for key in ("N", "D", "tokens_per_param")},
                   **{f"{key}_ci": boot["optimal"][key][i] for key in ("N", "D", "tokens_per_param")}}
                  for i, c in enumerate(targets)]
    iso_points = [p for p in points if p["flops"] is not None]
    isoflop = (isoflop_fit([p["flops"] for p in iso_points], [p["N"] for p in iso_points],
                           [p["loss"] for p in iso_points]) if iso_points else None)
    total = fit["alpha"] + fit["beta"]
    exponents = {"N_opt": fit["beta"] / total, "D_opt": fit["alpha"] / total}
    return {"params_counted": scaling["params"], "points": points, "approach3": fit, "bootstrap": boot,
            "allocation": allocation, "exponents": exponents, "approach2": isoflop}


def _ci(value: float, ci: list[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def markdown(result: dict[str, Any], scaling: dict[str, Any]) -> str:
    fit, boot, points = result["approach3"], result["bootstrap"], result["points"]
    level = f"{boot['level']:.0%}"
    how = (f"all descended at once, the {fit['polished']} best distinct end points run to convergence by L-BFGS-B"
           if fit["method"] == "descend" else "one L-BFGS-B run from each")
    lines = ["# Scaling-law fit", "",
             f"{len(points)} pretrain runs; N counts {result['params_counted'].replace('_', '-')} parameters; "
             f"D is the tokens each run trained on. Approach 3 fits {fit['points']} points "
             f"({scaling['exclude_highest']} highest-loss excluded) from {fit['grid_starts']} grid starts: "
             f"{how} ({fit['converged_starts']} converged), Huber delta {scaling['delta']:g} on log L. CIs are "
             f"{level} percentile intervals over {boot['resamples']} bootstrap resamples of the runs "
             f"(seed {boot['seed']}, {boot['failed']} failed).", "",
             "## Runs", "", "| budget | size | N | D (tokens) | D/N | C = 6ND | C (model count) | final val loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        mark = " (excluded)" if p["excluded"] else ""
        lines.append(f"| {p['budget']} | {p['size']} | {p['N']:,} | {p['D']:,} | {p['D'] / p['N']:.2f} | "
                     f"{p['flops_6nd']:.3g} | {p['flops_model']:.3g} | {p['loss']:.4f}{mark} |")
    names = list(PUBLISHED)
    lines += ["", "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
              f"| parameter | ours ({level} CI) | {names[0]} | {names[1]} |", "| --- | --- | ---: | ---: |"]
    for name in PARAMS:
        fmt = ".3g" if name in ("A", "B") else ".3f"
        lines.append(f"| {name} | {_ci(fit[name], boot['params'][name], fmt)} | "
                     f"{PUBLISHED[names[0]][name]:g} | {PUBLISHED[names[1]][name]:g} |")
    if fit["at_bound"]:
        lines += ["", f"**The best fit ends on the search bounds of {', '.join(fit['at_bound'])}**: the runs do not "
                  "pin this functional form down (see below), so these parameters are not estimates of anything."]
    exp = result["exponents"]
    lines += ["", f"Implied compute-optimal exponents: N* ∝ C^{exp['N_opt']:.3f}, D* ∝ C^{exp['D_opt']:.3f} "
              "(Chinchilla's approach 3: 0.46 and 0.54; Epoch AI's refit: 0.51 and 0.49).", "",
              "## Compute-optimal allocation (C = 6ND)", "",
              f"| C (FLOPs) | N* ({level} CI) | D* ({level} CI) | D*/N* ({level} CI) | approach 2 N* |",
              "| ---: | --- | --- | --- | --- |"]
    iso = result["approach2"]
    for row in result["allocation"]:
        n2 = "—"
        if iso and iso["N_opt"] is not None:
            n2 = f"{iso['N_opt']['k'] * row['flops'] ** iso['N_opt']['a']:.3g}"
        target = " (target)" if row is result["allocation"][-1] else ""
        lines.append(f"| {row['flops']:.3g}{target} | {_ci(row['N'], row['N_ci'], '.3g')} | "
                     f"{_ci(row['D'], row['D_ci'], '.3g')} | "
                     f"{_ci(row['tokens_per_param'], row['tokens_per_param_ci'], '.3g')} "
                     f"| {n2} |")
    lines += ["", "## Approach 2: IsoFLOP parabolas", ""]
    if iso is None:
        lines.append("No IsoFLOP budgets in this sweep (explicit runs only).")
    else:
        lines += ["| C (FLOPs) | N* at the vertex | loss there | note |", "| ---: | ---: | ---: | --- |"]
        for m in iso["minima"]:
            n = f"{m['N']:.3g}" if m["N"] is not None else "—"
            value = f"{m['loss']:.4f}" if m["loss"] is not None else "—"
            lines.append(f"| {m['flops']:.3g} | {n} | {value} | {m['note']} |")
        if iso["N_opt"] is not None:
            lines += ["", f"Power laws through the minima: N* = {iso['N_opt']['k']:.3g} C^{iso['N_opt']['a']:.3f}, "
                      f"D* = {iso['D_opt']['k']:.3g} C^{iso['D_opt']['a']:.3f} (Chinchilla's approach 2: "
                      "0.49 and 0.51)."]
        else:
            lines += ["", iso["note"]]
    lines += ["", "## How to read this", "",
              "Chinchilla's and Epoch AI's parameters come from models of 70 M to 16 B parameters trained on "
              "5 B to 500 B tokens of MassiveText. A CPU sweep of models with a few hundred thousand parameters, "
              "trained for seconds on a corpus of a few hundred thousand tokens, is far outside that regime: the "
              "runs are barely past warmup, the embedding table is most of N, and losses sit near the unigram "
              "entropy. Expect different numbers; only the method carries over.", "",
              f"A {level} bootstrap interval is the middle {level} of the parameter refitted on runs resampled "
              "with replacement: it measures how much the fit moves with which runs it sees, given the runs' noise. "
              "It does not cover the error of the functional form, of the learning-rate and schedule choices, or of "
              "extrapolating to budgets far beyond the sweep (the target row), which can be much larger. "
              "With few runs, E, A and alpha trade off against each other, so their intervals can be wide and the "
              "allocation's narrower.", "",
              "![IsoFLOP curves](isoflop.png)", "", "![Approach 3 fit](fit.png)", "", "![Frontier](frontier.png)", ""]
    return "\n".join(lines)


def scaling_fit(*, runs: Path, out: Path, scaling: dict[str, Any], pretrain: dict[str, Any],
                vocab_size: int) -> dict[str, Any]:
    plan = plan_sweep(scaling, pretrain, vocab_size)
    points, manifests = read_points(plan, runs, scaling["params"])
    result = fit_sweep(points, scaling)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "plan.json", plan)
    atomic_write_json(out / "fit.json", result)
    if result["approach2"] is not None:
        plot_isoflop(points, result["approach2"], out / "isoflop.png")
    else:
        plot_fit(points, result["approach3"], out / "isoflop.png")  # no IsoFLOP budgets: the fit instead
    plot_fit(points, result["approach3"], out / "fit.png")
    plot_frontier(result["approach3"], result["bootstrap"], result["approach2"] or {"minima": [], "N_opt": None},
                  points, out / "frontier.png")
    atomic_write_text(out / "fit.md", markdown(result, scaling))
    fit = result["approach3"]
    write_manifest(out / "manifest.json", stage="scaling_fit", config={"scaling": scaling, "pretrain": pretrain},
                   inputs=manifests, outputs={out / name: None for name in OUTPUTS},
                   counts={"runs": len(points), "fitted": fit["points"]},
                   metrics={name: fit[name] for name in PARAMS} | {"exponents": result["exponents"]})
    log.info("approach 3: E %.3f A %.3g B %.3g alpha %.3f beta %.3f; outputs in %s",
             fit["E"], fit["A"], fit["B"], fit["alpha"], fit["beta"], out)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, type=Path,
                        help="the sweep folder: <runs>/<budget>/<size>/manifest.json")
    parser.add_argument("--out", required=True, type=Path, help="folder for fit.json, fit.md, plots, manifest.json")
    parser.add_argument("--config", type=json_arg, default={},
                        help="the scaling config section as JSON (or @file.yaml)")
    parser.add_argument("--pretrain", type=json_arg, default={},
                        help="the pretrain section the runs trained with (scaling.pretrain applied) as JSON")
    parser.add_argument("--vocab-size", type=int, required=True, help="tokenizer.vocab_size (the plan's N)")


def run(args: argparse.Namespace) -> int:
    scaling_fit(runs=args.runs, out=args.out, scaling=section_config("scaling", args.config),
                pretrain=section_config("pretrain", args.pretrain), vocab_size=args.vocab_size)
    return 0

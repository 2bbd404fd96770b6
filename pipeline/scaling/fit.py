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
from pipeline.scaling.laws import (BOUND_MARGIN, MAX_EXPONENT_WIDTH, MAX_NSTAR_RATIO, PARAMS, PUBLISHED, bootstrap_draws,
                                  bootstrap_summary, compute_optimal, fit_loss, grid_starts, identification,
                                  isoflop_fit, isoflop_minimum, predict, predict_measurements)
from pipeline.scaling.plots import plot_fit, plot_frontier, plot_isoflop
from pipeline.scaling.sweep import plan_sweep

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


def approach3(points: list[dict[str, Any]], scaling: dict[str, Any], budgets: list[float],
              targets: list[float]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], np.ndarray]:
    """Approach 3 on `points`: the fit from the whole grid, its bootstrap (N* etc. at `targets`),
    whether it is identified (judged at the `budgets` the points were trained at), and the
    bootstrap draws (thetas) the held-out prediction samples from."""
    N, D, loss = (np.array([p[key] for p in points], dtype=np.float64) for key in ("N", "D", "loss"))
    log.info("approach 3: fitting %d points from %d grid starts", len(points), len(grid_starts()))
    fit = fit_loss(N, D, loss, delta=scaling["delta"], method=scaling["method"])
    resamples, seed = scaling["bootstrap"]["resamples"], scaling["bootstrap"]["seed"]
    draws, failed = bootstrap_draws(N, D, loss, np.array([s["theta"] for s in fit["solutions"][:BOOTSTRAP_STARTS]]),
                                    resamples=resamples, seed=seed, delta=scaling["delta"])
    boot = bootstrap_summary(draws, failed, resamples=resamples, seed=seed, budgets=targets,
                             level=scaling["bootstrap"]["level"])
    return fit, boot, identification(fit, boot, budgets), draws


def heldout_prediction(points: list[dict[str, Any]], scaling: dict[str, Any],
                       isoflop: dict[str, Any] | None) -> dict[str, Any]:
    """The pre-registered check: approach 3 fitted without the largest budget's runs predicts that
    budget's best final loss (over the sizes it trains, with a bootstrap prediction interval) and
    its N*; beside each, what the runs measured (the best run's loss; N* at that budget's IsoFLOP
    vertex) and whether it falls inside the interval. The prediction uses the held-out runs' sizes and
    tokens (the plan's) only; their losses enter as the measurement. A held-out fit that is not
    identified predicts nothing."""
    budgets = sorted({p["flops"] for p in points if p["flops"] is not None})
    if len(budgets) < 3:
        return {"made": False, "identified": False,
                "reasons": [f"{len(budgets)} budget(s): the held-out fit needs 2 besides the largest"]}
    held, fitted = budgets[-1], budgets[:-1]
    train = [p for p in points if not p["excluded"] and p["flops"] != held]
    runs = [p for p in points if p["flops"] == held]
    out: dict[str, Any] = {"heldout_flops": held, "fitted_budgets": fitted, "fitted_runs": len(train)}
    if len(train) <= len(PARAMS):
        return {**out, "made": False, "identified": False,
                "reasons": [f"{len(train)} runs below the largest budget; the fit needs more than {len(PARAMS)}"]}
    fit, boot, verdict, draws = approach3(train, scaling, fitted, budgets)
    out |= {**verdict, "approach3": {name: fit[name] for name in PARAMS}}
    if not verdict["identified"]:
        return {**out, "made": False}
    N, D, loss = (np.array([p[key] for p in train], dtype=np.float64) for key in ("N", "D", "loss"))
    # a run's own noise: the fit's log residuals, widened for the 5 parameters fitted to them
    residuals = (np.log(loss) - np.log(predict(fit, N, D))) * math.sqrt(len(train) / (len(train) - len(PARAMS)))
    n_new, d_new = (np.array([p[key] for p in runs], dtype=np.float64) for key in ("N", "D"))
    level = scaling["bootstrap"]["level"]
    spread = predict_measurements(draws, n_new, d_new, residuals, level=level,
                                  seed=scaling["bootstrap"]["seed"])
    expected = predict(fit, n_new, d_new)
    best = min(runs, key=lambda p: p["loss"])
    vertex = next((m for m in isoflop["minima"] if m["flops"] == held), None) if isoflop else None
    measured_n = vertex["N"] if vertex and vertex["inside"] else None
    n_opt: dict[str, Any] = {"measured": measured_n, "note": "the IsoFLOP vertex" if measured_n else
                             f"not measured: {vertex['note'] if vertex else 'no IsoFLOP parabola'}"}
    if spread["vertex_inside"] >= level * spread["draws"]:
        n_ci = spread["N_opt"]
        n_opt |= {"predicted": {"value": isoflop_minimum(n_new, expected)["N"], "ci95": n_ci, "n": len(train),
                                "method": "bootstrap"},
                  "inside": bool(n_ci[0] <= measured_n <= n_ci[1]) if measured_n else None}
    else:
        n_opt |= {"predicted": None, "inside": None,
                  "note": f"not predicted: {spread['vertex_inside']} of {spread['draws']} draws put the vertex inside "
                          f"the sizes trained; " + n_opt["note"]}
    loss_ci = spread["best_loss"]
    return {**out, "made": True, "level": level,
            "best_loss": {"predicted": {"value": float(expected.min()), "ci95": loss_ci, "n": len(train),
                                        "method": "bootstrap"},
                          "predicted_size": runs[int(expected.argmin())]["size"],
                          "measured": best["loss"], "measured_size": best["size"],
                          "inside": bool(loss_ci[0] <= best["loss"] <= loss_ci[1])},
            "N_opt": n_opt}


def fit_sweep(points: list[dict[str, Any]], scaling: dict[str, Any]) -> dict[str, Any]:
    """Both approaches on the points, with bootstrap CIs for approach 3, whether it is identified,
    and the held-out prediction. Exponents and allocations are left out (None) when approach 3 is
    not identified: they would be numbers without meaning."""
    exclude_highest(points, scaling["exclude_highest"])
    kept = [p for p in points if not p["excluded"]]
    budgets = sorted({p["flops"] for p in points if p["flops"] is not None})
    targets = budgets + [float(scaling["target_flops"])]
    fit, boot, verdict, _ = approach3(kept, scaling, budgets, targets)
    iso_points = [p for p in points if p["flops"] is not None]
    isoflop = (isoflop_fit([p["flops"] for p in iso_points], [p["N"] for p in iso_points],
                           [p["loss"] for p in iso_points]) if iso_points else None)
    allocation = exponents = None
    if verdict["identified"]:
        optimal = compute_optimal(fit, np.array(targets))
        allocation = [{"flops": c, **{key: float(optimal[key][i]) for key in ("N", "D", "tokens_per_param")},
                       **{f"{key}_ci": boot["optimal"][key][i] for key in ("N", "D", "tokens_per_param")}}
                      for i, c in enumerate(targets)]
        total = fit["alpha"] + fit["beta"]
        exponents = {"N_opt": fit["beta"] / total, "D_opt": fit["alpha"] / total,
                     "N_opt_ci": boot["exponents"]["N_opt"], "D_opt_ci": boot["exponents"]["D_opt"]}
    return {**verdict, "params_counted": scaling["params"], "points": points, "approach3": fit, "bootstrap": boot,
            "allocation": allocation, "exponents": exponents, "approach2": isoflop,
            "prediction": heldout_prediction(points, scaling, isoflop)}


def _ci(value: float, ci: list[float], fmt: str) -> str:
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _prediction_lines(pred: dict[str, Any]) -> list[str]:
    lines = ["## Prediction of the largest budget (held out)", ""]
    if not pred["made"]:
        where = (f"The fit from the budgets below {pred['heldout_flops']:.3g} FLOPs is not identified, so it predicts "
                 "nothing: " if "approach3" in pred else "No prediction: ")
        return lines + [where + "; ".join(pred["reasons"]) + ".", ""]
    level = f"{pred['level']:.0%}"
    loss, n_opt = pred["best_loss"], pred["N_opt"]
    fitted = ", ".join(f"{c:.3g}" for c in pred["fitted_budgets"])
    measured_n = f"{n_opt['measured']:.3g}" if n_opt["measured"] is not None else n_opt["note"]
    predicted_n = (_ci(n_opt["predicted"]["value"], n_opt["predicted"]["ci95"], ".3g") if n_opt["predicted"]
                   else n_opt["note"])
    inside_n = {True: "yes", False: "**no**", None: "—"}[n_opt["inside"]]
    return lines + [
        f"Approach 3 fitted to the {pred['fitted_runs']} runs at C = {fitted} (identified) predicts the runs at "
        f"C = {pred['heldout_flops']:.3g} from their sizes and tokens alone; then their losses are read.", "",
        f"| quantity at C = {pred['heldout_flops']:.3g} | predicted ({level} interval) | measured | inside |",
        "| --- | --- | --- | --- |",
        f"| best final val loss over the sizes trained | "
        f"{_ci(loss['predicted']['value'], loss['predicted']['ci95'], '.4f')} ({loss['predicted_size']}) | "
        f"{loss['measured']:.4f} ({loss['measured_size']}) | {'yes' if loss['inside'] else '**no**'} |",
        f"| N* (the IsoFLOP vertex) | {predicted_n} | {measured_n} | {inside_n} |",
        "", "Both intervals hold the refits' spread (runs below the largest budget resampled) and each run's own "
        "noise (the fit's residuals, resampled): they say where the measurement should fall.", ""]


def markdown(result: dict[str, Any], scaling: dict[str, Any]) -> str:
    fit, boot, points = result["approach3"], result["bootstrap"], result["points"]
    level = f"{boot['level']:.0%}"
    how = (f"all descended at once, the {fit['polished']} best distinct end points run to convergence by L-BFGS-B"
           if fit["method"] == "descend" else "one L-BFGS-B run from each")
    verdict = ("**Approach 3 is identified**: no parameter at a search bound, every interval bounded, and the "
               "findings pinned down (rule below)." if result["identified"] else
               "**Approach 3: not identified**: " + "; ".join(result["reasons"]) +
               ". It prints no exponents or allocations: these runs do not determine them.")
    lines = ["# Scaling-law fit", "", verdict, "",
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
    lines += ["", "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", ""]
    if result["identified"]:
        names = list(PUBLISHED)
        lines += [f"| parameter | ours ({level} CI) | {names[0]} | {names[1]} |", "| --- | --- | ---: | ---: |"]
        for name in PARAMS:
            fmt = ".3g" if name in ("A", "B") else ".3f"
            lines.append(f"| {name} | {_ci(fit[name], boot['params'][name], fmt)} | "
                         f"{PUBLISHED[names[0]][name]:g} | {PUBLISHED[names[1]][name]:g} |")
        exp = result["exponents"]
        lines += ["", f"Implied compute-optimal exponents: N* ∝ C^{_ci(exp['N_opt'], exp['N_opt_ci'], '.3f')}, "
                  f"D* ∝ C^{_ci(exp['D_opt'], exp['D_opt_ci'], '.3f')} (Chinchilla's approach 3: 0.46 and 0.54; "
                  "Epoch AI's refit: 0.51 and 0.49).", "",
                  "## Compute-optimal allocation (C = 6ND)", "",
                  f"| C (FLOPs) | N* ({level} CI) | D* ({level} CI) | D*/N* ({level} CI) |",
                  "| ---: | --- | --- | --- |"]
        for row in result["allocation"]:
            target = " (target, extrapolated)" if row is result["allocation"][-1] else ""
            lines.append(f"| {row['flops']:.3g}{target} | {_ci(row['N'], row['N_ci'], '.3g')} | "
                         f"{_ci(row['D'], row['D_ci'], '.3g')} | "
                         f"{_ci(row['tokens_per_param'], row['tokens_per_param_ci'], '.3g')} |")
    else:
        lines.append("Not identified (reasons above); the best fit and its intervals are in fit.json for diagnosis.")
    lines += ["", "## Approach 2: IsoFLOP parabolas", ""]
    iso = result["approach2"]
    if iso is None:
        lines.append("No IsoFLOP budgets in this sweep (explicit runs only).")
    else:
        lines += ["| C (FLOPs) | N* at the vertex | loss there | note |", "| ---: | ---: | ---: | --- |"]
        for m in iso["minima"]:
            n = f"{m['N']:.3g}" if m["N"] is not None else "—"
            value = f"{m['loss']:.4f}" if m["loss"] is not None else "—"
            lines.append(f"| {m['flops']:.3g} | {n} | {value} | {m['note']} |")
        if iso["identified"]:
            lines += ["", f"Power laws through the minima: N* = {iso['N_opt']['k']:.3g} C^{iso['N_opt']['a']:.3f}, "
                      f"D* = {iso['D_opt']['k']:.3g} C^{iso['D_opt']['a']:.3f} (Chinchilla's approach 2: "
                      "0.49 and 0.51)."]
        else:
            lines += ["", "Approach 2's power law: not identified (" + "; ".join(iso["reasons"]) + ")."]
    lines += ["", *_prediction_lines(result["prediction"])]
    lines += ["## How to read this", "",
              f"When a fit is identified: the best fit has no parameter within {BOUND_MARGIN:.1%} of its search box's "
              f"width of a bound; no {level} bootstrap interval of E, A, B, alpha or beta reaches a bound; the N* "
              f"exponent's interval is at most {MAX_EXPONENT_WIDTH:g} wide; N*'s interval at every budget trained "
              f"spans at most a factor {MAX_NSTAR_RATIO:g}; and no more than {(1 - boot['level']) / 2:.1%} of the "
              "refits failed. Approach 2's power law needs every budget's minimum inside its sizes trained.", "",
              "Chinchilla's and Epoch AI's parameters come from models of 70 M to 16 B parameters trained on "
              "5 B to 500 B tokens of MassiveText. A CPU sweep of models with a few tens of thousands of parameters, "
              "trained for seconds on a corpus of a few hundred thousand tokens, is far outside that regime: the "
              "embedding table is most of N and losses sit not far below the unigram entropy. Expect different "
              "numbers; only the method carries over.", "",
              f"A {level} bootstrap interval is the middle {level} of the parameter refitted on runs resampled "
              "with replacement: it measures how much the fit moves with which runs it sees, given the runs' noise. "
              "It does not cover the error of the functional form, of the learning-rate and schedule choices, or of "
              "extrapolating to budgets far beyond the sweep (the target row), which can be much larger: the held-out "
              "prediction above is the check on that.", "",
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
        plot_fit(points, result, out / "isoflop.png")  # no IsoFLOP budgets: the fit instead
    plot_fit(points, result, out / "fit.png")
    plot_frontier(result, points, out / "frontier.png")
    atomic_write_text(out / "fit.md", markdown(result, scaling))
    fit = result["approach3"]
    write_manifest(out / "manifest.json", stage="scaling_fit", config={"scaling": scaling, "pretrain": pretrain},
                   inputs=manifests, outputs={out / name: None for name in OUTPUTS},
                   counts={"runs": len(points), "fitted": fit["points"]},
                   metrics={"identified": result["identified"], "exponents": result["exponents"],
                            "prediction_inside": result["prediction"].get("best_loss", {}).get("inside")}
                           | ({name: fit[name] for name in PARAMS} if result["identified"] else {}))
    if result["identified"]:
        log.info("approach 3: E %.3f A %.3g B %.3g alpha %.3f beta %.3f; outputs in %s",
                 fit["E"], fit["A"], fit["B"], fit["alpha"], fit["beta"], out)
    else:
        log.warning("approach 3 not identified: %s; outputs in %s", "; ".join(result["reasons"]), out)
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

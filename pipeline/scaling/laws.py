"""Scaling-law fits: Chinchilla's approach 3 (a parametric L(N, D)) and approach 2 (IsoFLOP parabolas).

Approach 3 (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, section 3.3; refitted by
Besiroglu et al. 2024, https://arxiv.org/abs/2404.10102):

    L(N, D) = E + A / N^alpha + B / D^beta,   log L = LSE(a - alpha log N, b - beta log D, e)

with A = exp(a), B = exp(b), E = exp(e). The fit minimises the sum of Huber losses (delta 1e-3)
of the log-loss residuals from every point of a grid of initialisations, keeping the best
converged result: by default all starts descended at once and the best distinct end points run to
convergence by L-BFGS-B (METHODS below); `method="lbfgsb"` runs L-BFGS-B from every start. Under C = 6 N D the compute-optimal allocation is

    N*(C) = G (C/6)^(beta/(alpha+beta)),  D*(C) = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta)).

Approach 2: per compute budget, a parabola of the loss in log N; its vertex is that budget's
optimal N, and the vertices are fitted as power laws N* = k C^a, D* = C / (6 N*).

A fit is reported only when it is identified (`identification`): no parameter at a search bound,
no bootstrap interval reaching one, and the findings (the N* exponent, N* at every budget trained)
pinned down to within fixed widths. Otherwise it says "not identified" and why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits
from tqdm import tqdm

PARAMS = ("E", "A", "B", "alpha", "beta")
THETA = ("a", "b", "e", "alpha", "beta")  # the fitted coordinates: A, B, E = exp(a, b, e)
_PARAM_OF = dict(zip(THETA, ("A", "B", "E", "alpha", "beta")))
# Besiroglu et al. 2024's grid (the Chinchilla paper's, with a and b widened): 6 x 6 x 5 x 5 x 5 = 4,500 starts
GRID = {"a": np.arange(0, 26, 5.0), "b": np.arange(0, 26, 5.0), "e": np.arange(-1, 1.01, 0.5),
        "alpha": np.arange(0, 2.01, 0.5), "beta": np.arange(0, 2.01, 0.5)}
# The objective is a sum of Huber terms of ~delta^2 each, far below scipy's ftol scale (relative to
# max(|f|, 1)): L-BFGS-B minimises it divided by delta^2 (same minimiser), so its default-like
# tolerances stop a run at its minimum, not at its start (measured: unscaled, refits barely moved).
LBFGSB_OPTIONS = {"ftol": 1e-12, "gtol": 1e-9, "maxiter": 500}
# "descend" (the default): every grid start is first descended by a vectorised Levenberg-Marquardt
# (Gauss-Newton on the Huber weights, all 4,500 starts as one array); L-BFGS-B then polishes the
# best distinct end points (~1-3 CPU-s). "lbfgsb": one L-BFGS-B run from each start, the issue's
# method to the letter (~30 CPU-s). Both reached the same minimum to every printed digit
# (docs/scaling.md, benchmarks/bench_scaling_fit.py).
METHODS = ("descend", "lbfgsb")
LM_STEPS = 150
POLISHED = 8  # distinct LM end points (lowest objective first) polished by L-BFGS-B
BOUNDS = [(-10.0, 100.0), (-10.0, 100.0), (-10.0, 5.0), (0.0, 10.0), (0.0, 10.0)]
SOLUTIONS_KEPT = 8  # distinct local minima kept from the grid (objective, theta), best first
# When a fit counts as identified (docs/scaling.md, "When a fit is identified"):
BOUND_MARGIN = 1e-3  # a value closer to a search bound than this fraction of the box is at the bound
MAX_EXPONENT_WIDTH = 0.5  # the N* exponent beta/(alpha+beta) lies in [0, 1]: an interval over half of it says nothing
MAX_NSTAR_RATIO = 10.0  # N*'s interval at a budget trained may span at most a decade
# published approach-3 fits, for the comparison table (N counts all parameters in both)
PUBLISHED = {
    "Chinchilla (Hoffmann et al. 2022)": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
    "Epoch AI (Besiroglu et al. 2024)": {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.35, "beta": 0.37},
}


# --- approach 3 ------------------------------------------------------------------------------------

def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(log L_hat - log L) and its gradient in theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, points)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total  # d LSE / d term
    small = np.abs(r) <= delta
    huber = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    dr = np.where(small, r, delta * np.sign(r))  # d Huber / d r
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return float(huber.sum()), grad


def _as_params(theta: np.ndarray) -> dict[str, float]:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def _polish(starts: np.ndarray, N: np.ndarray, D: np.ndarray, loss: np.ndarray,
            delta: float) -> list[tuple[float, np.ndarray]]:
    """(objective, theta) of every L-BFGS-B run (analytic gradient) from a row of `starts`
    (a, b, e, alpha, beta) that converged, best first."""
    scale = 1.0 / (delta * delta)

    def scaled(theta: np.ndarray, *args: Any) -> tuple[float, np.ndarray]:
        value, grad = _objective(theta, *args)
        return value * scale, grad * scale

    args = (np.log(N), np.log(D), np.log(loss), delta)
    found = []
    # L-BFGS-B's BLAS calls on 5-vectors: OpenBLAS's threads cost ~25x more than they save (docs/scaling.md)
    with threadpool_limits(limits=1):
        for x0 in tqdm(starts, desc="L-BFGS-B", unit="start", disable=len(starts) < 100 or None):
            result = minimize(scaled, np.clip(x0, *np.array(BOUNDS).T), args=args, jac=True,
                              method="L-BFGS-B", bounds=BOUNDS, options=LBFGSB_OPTIONS)
            # a start already at the minimum ends in a failed line search: converged all the same
            at_minimum = result.status == 2 and np.abs(result.jac).max() < 1e-3
            if (result.success or at_minimum) and np.isfinite(result.fun):
                found.append((float(result.fun) / scale, result.x))
    if not found:
        raise RuntimeError(f"no L-BFGS-B run converged from {len(starts)} starts on {len(N)} points")
    return sorted(found, key=lambda t: t[0])


def _descend(starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
             delta: float, steps: int = LM_STEPS) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg-Marquardt from every row of `starts` at once (Huber as iteratively reweighted
    least squares, box bounds by clipping); the data are shared (1-d) or one row per start (2-d).
    Returns the end points and their objectives."""
    lo, hi = np.array(BOUNDS).T

    def evaluate(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b, e, alpha, beta = (theta[:, i:i + 1] for i in range(5))
        shape = np.broadcast_shapes(a.shape, log_n.shape)  # data per start (bootstrap) or shared
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, shape)])
        top = terms.max(axis=0)
        weights = np.exp(terms - top)
        total = weights.sum(axis=0)
        r = top + np.log(total) - log_l  # (starts, points)
        weights /= total
        jac = np.stack([weights[0], weights[1], weights[2], -weights[0] * log_n, -weights[1] * log_d], axis=-1)
        small = np.abs(r) <= delta
        value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1)
        irls = np.where(small, 1.0, delta / np.maximum(np.abs(r), delta))  # Huber as weighted squares
        root = np.sqrt(irls)
        return value, r * root, jac * root[..., None]

    theta = np.clip(np.asarray(starts, dtype=np.float64), lo, hi)
    value, wr, wj = evaluate(theta)
    damping = np.full(len(theta), 1e-3)
    eye = np.eye(5)
    for _ in range(steps):
        grad = np.einsum("sp,spk->sk", wr, wj)  # the Huber gradient: sum of r irls dr/dtheta
        hess = np.einsum("spk,spl->skl", wj, wj)
        diag = np.einsum("skk->sk", hess)[:, :, None] * eye + 1e-12 * eye
        step = np.linalg.solve(hess + damping[:, None, None] * diag, -grad[..., None])[..., 0]
        trial = np.clip(theta + step, lo, hi)
        t_value, t_wr, t_wj = evaluate(trial)
        better = t_value < value
        theta[better], value[better], wr[better], wj[better] = trial[better], t_value[better], t_wr[better], t_wj[better]
        damping = np.clip(np.where(better, damping / 3, damping * 3), 1e-12, 1e12)
    return theta, value


def grid_starts() -> np.ndarray:
    """The grid of initialisations as rows (a, b, e, alpha, beta)."""
    return np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])))


def fit_loss(N: Sequence[float], D: Sequence[float], loss: Sequence[float], *,
             delta: float = 1e-3, method: str = "descend") -> dict[str, Any]:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to points (N params, D tokens, final loss) by
    Chinchilla's approach 3 (the module docstring) from every grid start: `descend` descends them
    all at once (vectorised) and runs the POLISHED best distinct end points to convergence by
    L-BFGS-B; `lbfgsb` runs L-BFGS-B from each start. The best converged result is kept. Returns
    E, A, B, alpha, beta; theta (a, b, e, alpha, beta); the summed Huber objective; how many
    L-BFGS-B runs there were and converged; and `solutions`, the best distinct converged thetas
    (local minima show up there; the bootstrap starts from them)."""
    if method not in METHODS:
        raise ValueError(f"fit_loss: method must be one of {METHODS}; got {method!r}")
    N, D, loss = (np.asarray(x, dtype=np.float64) for x in (N, D, loss))
    if not (len(N) == len(D) == len(loss)) or len(N) < len(PARAMS):
        raise ValueError(f"fit_loss needs at least {len(PARAMS)} points with N, D and loss each; "
                         f"got {len(N)}, {len(D)}, {len(loss)}")
    if (N <= 0).any() or (D <= 0).any() or not np.isfinite(loss).all() or (loss <= 0).any():
        raise ValueError("fit_loss needs positive N and D and positive finite losses")
    starts = grid_starts()
    if method == "descend":
        ends, values = _descend(starts, np.log(N), np.log(D), np.log(loss), delta)
        order = np.argsort(values, kind="stable")
        _, first = np.unique(np.round(ends[order], 2), axis=0, return_index=True)
        polished = ends[order][np.sort(first)][:POLISHED]
    else:
        polished = starts
    found = _polish(polished, N, D, loss, delta)
    solutions, seen = [], set()
    for value, theta in found:
        key = tuple(np.round(theta, 3))
        if key not in seen and len(solutions) < SOLUTIONS_KEPT:
            seen.add(key)
            solutions.append({"objective": value, "theta": [float(x) for x in theta]})
    value, theta = found[0]
    at_bound = [name for name, x in zip(THETA, theta) if _at_bound(name, x)]
    return {**_as_params(theta), "theta": [float(x) for x in theta], "objective": value, "at_bound": at_bound,
            "method": method, "grid_starts": len(starts), "polished": len(polished),
            "converged_starts": len(found), "points": len(N), "solutions": solutions}


def _at_bound(name: str, x: float) -> bool:
    lo, hi = BOUNDS[THETA.index(name)]
    return min(x - lo, hi - x) < BOUND_MARGIN * (hi - lo)


def _param_value(name: str, x: float) -> float:
    """A coordinate of theta as the parameter it stands for (a -> A = exp(a))."""
    return math.exp(x) if name in ("a", "b", "e") else x


def compute_optimal(params: dict[str, float], C: float | np.ndarray) -> dict[str, Any]:
    """N*(C), D*(C) and D*/N* under C = 6 N D for fitted approach-3 parameters."""
    alpha, beta = params["alpha"], params["beta"]
    G = (alpha * params["A"] / (beta * params["B"])) ** (1 / (alpha + beta))
    n_opt = G * (np.asarray(C, dtype=np.float64) / 6) ** (beta / (alpha + beta))
    d_opt = np.asarray(C, dtype=np.float64) / (6 * n_opt)
    return {"N": n_opt, "D": d_opt, "tokens_per_param": d_opt / n_opt}


def predict(params: dict[str, float], N: np.ndarray, D: np.ndarray) -> np.ndarray:
    return params["E"] + params["A"] / np.asarray(N) ** params["alpha"] + params["B"] / np.asarray(D) ** params["beta"]


def bootstrap_draws(N: Sequence[float], D: Sequence[float], loss: Sequence[float], starts: np.ndarray, *,
                    resamples: int, seed: int, delta: float = 1e-3) -> tuple[np.ndarray, int]:
    """Refit on `resamples` draws of the points with replacement, each from every row of `starts`
    (the full fit's best minima: the whole grid per resample would cost thousands of descents
    each), all resamples at once by the vectorised descent, keeping each draw's best. Returns the
    thetas of the draws that ended finite and how many did not."""
    N, D, loss = (np.asarray(x, dtype=np.float64) for x in (N, D, loss))
    picks = np.random.default_rng(seed).integers(0, len(N), (resamples, len(N)))
    best_value = np.full(resamples, np.inf)
    best_theta = np.zeros((resamples, len(BOUNDS)))
    for x0 in tqdm(np.asarray(starts, dtype=np.float64), desc="bootstrap", unit="start"):
        theta, value = _descend(np.tile(x0, (resamples, 1)), np.log(N)[picks], np.log(D)[picks],
                                np.log(loss)[picks], delta)
        better = value < best_value
        best_value[better], best_theta[better] = value[better], theta[better]
    ok = np.isfinite(best_value)
    if not ok.any():
        raise RuntimeError(f"none of {resamples} bootstrap fits converged")
    return best_theta[ok], int((~ok).sum())


def bootstrap(N: Sequence[float], D: Sequence[float], loss: Sequence[float], starts: np.ndarray, *,
              resamples: int, seed: int, budgets: Sequence[float], delta: float = 1e-3,
              level: float = 0.95) -> dict[str, Any]:
    """Percentile bootstrap: `bootstrap_draws`, summarised by `bootstrap_summary`."""
    thetas, failed = bootstrap_draws(N, D, loss, starts, resamples=resamples, seed=seed, delta=delta)
    return bootstrap_summary(thetas, failed, resamples=resamples, seed=seed, budgets=budgets, level=level)


def bootstrap_summary(thetas: np.ndarray, failed: int, *, resamples: int, seed: int, budgets: Sequence[float],
                      level: float = 0.95) -> dict[str, Any]:
    """The intervals at `level` of the bootstrap draws `thetas`: every parameter's (and each fitted
    coordinate's, for the bound check), the compute-optimal exponents', and every budget's N*, D*
    and D*/N*; `failed` draws (non-finite fits) are counted."""
    rows = [_as_params(theta) for theta in thetas]
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.percentile(values, lo)), float(np.percentile(values, hi))]

    params = {name: interval(np.array([r[name] for r in rows])) for name in PARAMS}
    with np.errstate(divide="ignore", invalid="ignore"):  # a draw with alpha or beta at 0 has N* at 0 or inf
        optimal = [compute_optimal(r, np.asarray(budgets, dtype=np.float64)) for r in rows]
        per_budget = {key: [interval(np.array([o[key][i] for o in optimal])) for i in range(len(budgets))]
                      for key in ("N", "D", "tokens_per_param")}
    share = thetas[:, 4] / (thetas[:, 3] + thetas[:, 4])  # beta / (alpha + beta); nan where both are 0
    exponents = {"N_opt": interval(np.nan_to_num(share, nan=0.5)), "D_opt": interval(np.nan_to_num(1 - share, nan=0.5))}
    return {"level": level, "resamples": resamples, "seed": seed, "failed": failed, "params": params,
            "theta": {name: interval(thetas[:, i]) for i, name in enumerate(THETA)}, "exponents": exponents,
            "budgets": [float(c) for c in budgets], "optimal": per_budget}


def identification(fit: dict[str, Any], boot: dict[str, Any], budgets: Sequence[float]) -> dict[str, Any]:
    """Whether an approach-3 fit says anything, and if not, why: a parameter of the best fit at its
    search bound; a bootstrap interval reaching a bound (the data do not bound it); the N*
    exponent's interval wider than MAX_EXPONENT_WIDTH; N*'s interval at one of `budgets` (those
    trained, which must be among `boot`'s) spanning more than a factor MAX_NSTAR_RATIO; or more than
    the interval's tail share of the bootstrap refits failing."""
    reasons, level = [], f"{boot['level']:.0%}"
    for name in fit["at_bound"]:
        x = fit["theta"][THETA.index(name)]
        reasons.append(f"{_PARAM_OF[name]} at its search bound ({_param_value(name, x):.3g})")
    for name in THETA:
        lo, hi = boot["theta"][name]
        if _at_bound(name, lo) or _at_bound(name, hi):
            shown = [f"{_param_value(name, x):.3g}" for x in (lo, hi)]
            reasons.append(f"{_PARAM_OF[name]}'s {level} interval [{shown[0]}, {shown[1]}] reaches its search bound")
    lo, hi = boot["exponents"]["N_opt"]
    if hi - lo > MAX_EXPONENT_WIDTH:
        reasons.append(f"the N* exponent's {level} interval [{lo:.2f}, {hi:.2f}] is wider than {MAX_EXPONENT_WIDTH}")
    for c in budgets:
        lo, hi = boot["optimal"]["N"][boot["budgets"].index(float(c))]
        if not (lo > 0 and hi / lo <= MAX_NSTAR_RATIO):
            reasons.append(f"N* at C = {c:.3g}: the {level} interval [{lo:.3g}, {hi:.3g}] spans more than a "
                           f"factor {MAX_NSTAR_RATIO:g}")
    if boot["failed"] > (1 - boot["level"]) / 2 * boot["resamples"]:
        reasons.append(f"{boot['failed']} of {boot['resamples']} bootstrap refits failed")
    return {"identified": not reasons, "reasons": reasons}


def predict_measurements(draws: np.ndarray, N: Sequence[float], D: Sequence[float], residuals: Sequence[float],
                         *, level: float, seed: int) -> dict[str, Any]:
    """What runs not yet trained (sizes N_i on D_i tokens, one IsoFLOP budget) will measure, as
    bootstrap prediction intervals at `level`: per draw, its law's loss for each run (the
    parameters' uncertainty) times exp of a residual resampled for that run (the run's own noise;
    pass the fit's log residuals, scaled for the parameters fitted); then the best of those losses,
    and the vertex of their IsoFLOP parabola (approach 2's N*; draws whose vertex falls outside the
    sizes are counted, not used)."""
    N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
    losses = np.array([predict(_as_params(theta), N, D) for theta in draws])  # (draws, runs)
    losses *= np.exp(np.random.default_rng(seed).choice(np.asarray(residuals, dtype=np.float64), size=losses.shape))
    vertices = [isoflop_minimum(N, row) for row in losses]
    inside = np.array([v["N"] for v in vertices if v["inside"]])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(values: np.ndarray) -> list[float]:
        return [float(np.percentile(values, lo)), float(np.percentile(values, hi))]

    return {"best_loss": interval(losses.min(axis=1)), "N_opt": interval(inside) if len(inside) else None,
            "draws": len(draws), "vertex_inside": len(inside)}


# --- approach 2: IsoFLOP parabolas -----------------------------------------------------------------

def isoflop_minimum(N: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Fit loss = c2 x^2 + c1 x + c0 in x = log N over one budget's runs; the vertex is that
    budget's optimal N. A parabola that opens downward has no minimum (None, with the reason); a
    vertex outside the sizes trained is kept but flagged, since it is extrapolated."""
    x = np.log(np.asarray(N, dtype=np.float64))
    if len(np.unique(x)) < 3:
        raise ValueError(f"an IsoFLOP parabola needs 3 distinct sizes; got {len(np.unique(x))}")
    c2, c1, c0 = np.polyfit(x, np.asarray(loss, dtype=np.float64), 2)
    out = {"coef": [float(c2), float(c1), float(c0)], "N": None, "loss": None, "inside": False, "note": ""}
    if c2 <= 0:
        out["note"] = "loss is not convex in log N here: no minimum"
        return out
    vertex = -c1 / (2 * c2)
    out.update(N=float(np.exp(vertex)), loss=float(c0 - c1 * c1 / (4 * c2)),
               inside=bool(x.min() <= vertex <= x.max()))
    if not out["inside"]:
        out["note"] = "minimum outside the sizes trained (extrapolated)"
    return out


def power_law(C: Sequence[float], Y: Sequence[float]) -> dict[str, float]:
    """Least squares of log Y = log k + a log C: Y = k C^a."""
    a, log_k = np.polyfit(np.log(np.asarray(C, dtype=np.float64)), np.log(np.asarray(Y, dtype=np.float64)), 1)
    return {"k": float(np.exp(log_k)), "a": float(a)}


def isoflop_fit(budgets: Sequence[float], N: Sequence[float], loss: Sequence[float]) -> dict[str, Any]:
    """Approach 2: a parabola per budget, then N*(C) = k C^a through the minima and D* = C / (6 N*).
    The power laws are fitted (and the approach identified) only when every budget's minimum lies
    inside its sizes trained: an extrapolated vertex would steer the exponent by a guess."""
    budgets, N, loss = (np.asarray(x, dtype=np.float64) for x in (budgets, N, loss))
    minima = []
    for c in np.unique(budgets):
        at = budgets == c
        minima.append({"flops": float(c), **isoflop_minimum(N[at], loss[at])})
    reasons = [f"C = {m['flops']:.3g}: {m['note']}" for m in minima if not m["inside"]]
    if len(minima) < 2:
        reasons.append(f"{len(minima)} budget(s); a power law through the minima needs 2")
    out: dict[str, Any] = {"minima": minima, "identified": not reasons, "reasons": reasons,
                           "N_opt": None, "D_opt": None}
    if not reasons:
        C = np.array([m["flops"] for m in minima])
        n_opt = np.array([m["N"] for m in minima])
        out["N_opt"] = power_law(C, n_opt)
        out["D_opt"] = power_law(C, C / (6 * n_opt))
    return out

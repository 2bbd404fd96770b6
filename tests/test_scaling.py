"""Scaling: planted laws recovered, CIs that cover, identification (a degenerate sweep says "not
identified"), the held-out prediction, IsoFLOP minima, sweep plans, and the fit stage end to end on
hand-written run manifests."""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT
from pipeline.artifacts import verify, write_manifest
from pipeline.config import ConfigError, section_config, validate_config
from pipeline.model.gpt import GPTConfig, size_shape
from pipeline.report_card import report_card
from pipeline.scaling import laws
from pipeline.scaling import plots
from pipeline.scaling.laws import bootstrap, fit_loss, identification, isoflop_fit, isoflop_minimum
from pipeline.scaling.fit import fit_sweep, heldout_prediction, markdown, scaling_fit
from pipeline.scaling.plan import cost, load_with
from pipeline.scaling.sweep import budget_label, plan_sweep, run_config, sweep_pretrain, sweep_runs

PLANTED = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.34, "beta": 0.30}
BUDGETS = [1e17, 1e18, 1e19]
FACTORS = [1 / 4, 1 / 2, 1, 2, 4]  # sizes around Chinchilla's 20 tokens per parameter


def isoflop_points(noise: float, rng: np.random.Generator, params=PLANTED):
    """An IsoFLOP design: per budget, sizes around sqrt(C / 120), D = C / 6N, losses from the planted
    law times exp(N(0, noise))."""
    C = np.repeat(BUDGETS, len(FACTORS))
    N = np.array([f * math.sqrt(c / 120) for c in BUDGETS for f in FACTORS])
    D = C / (6 * N)
    L = laws.predict(params, N, D) * np.exp(rng.normal(0.0, noise, len(N)))
    return C, N, D, L


# --- approach 3 ------------------------------------------------------------------------------------

def test_fit_loss_recovers_planted_parameters_from_noisy_points():
    """The whole 4,500-start grid, 15 points with 0.1% log-normal noise: exponents within 0.03,
    E within 5%, and the compute-optimal N at 1e21 FLOPs within 25% (A and B trade off with the
    exponents, so they get a looser check)."""
    _, N, D, L = isoflop_points(0.001, np.random.default_rng(0))
    fit = fit_loss(N, D, L)
    assert fit["grid_starts"] == 4500 and fit["converged_starts"] >= 1
    assert abs(fit["alpha"] - PLANTED["alpha"]) < 0.03 and abs(fit["beta"] - PLANTED["beta"]) < 0.03, fit
    assert abs(fit["E"] / PLANTED["E"] - 1) < 0.05, fit
    assert 0.5 < fit["A"] / PLANTED["A"] < 2 and 0.5 < fit["B"] / PLANTED["B"] < 2, fit
    ours = laws.compute_optimal(fit, 1e21)["N"]
    assert abs(ours / laws.compute_optimal(PLANTED, 1e21)["N"] - 1) < 0.25
    assert fit["solutions"][0]["theta"] == fit["theta"]


@pytest.mark.slow
def test_fit_loss_descend_finds_the_minimum_of_lbfgsb_from_every_start():
    """Besiroglu et al.'s method to the letter (`method="lbfgsb"`, one L-BFGS-B run per grid start, ~30
    CPU-s) and the default shortcut (all starts descended at once, the best polished) must reach
    the same minimum."""
    _, N, D, L = isoflop_points(0.002, np.random.default_rng(4))
    fit = fit_loss(N, D, L)
    literal = fit_loss(N, D, L, method="lbfgsb")
    assert (fit["method"], literal["method"]) == ("descend", "lbfgsb")
    assert literal["polished"] == literal["grid_starts"] == 4500 and literal["converged_starts"] > 3000
    assert fit["objective"] <= literal["objective"] * (1 + 1e-6), (fit["objective"], literal["objective"])
    for name in ("alpha", "beta", "E"):
        assert fit[name] == pytest.approx(literal[name], rel=1e-3), name
    with pytest.raises(ValueError, match="method must be one of"):
        fit_loss(N, D, L, method="adam")


def test_objective_gradient_matches_finite_differences():
    """The analytic gradient L-BFGS-B gets (jac=True), against central differences, at points in
    both Huber regimes (residuals below and above delta)."""
    _, N, D, L = isoflop_points(0.01, np.random.default_rng(3))
    args = (np.log(N), np.log(D), np.log(L), 1e-3)
    for theta in ([6.0, 7.0, 0.6, 0.34, 0.3], [5.9, 7.1, 0.55, 0.33, 0.31], [10.0, 2.0, -0.5, 1.0, 0.2]):
        theta = np.array(theta)
        _, grad = laws._objective(theta, *args)
        step = 1e-6
        numeric = [(laws._objective(theta + step * e, *args)[0] - laws._objective(theta - step * e, *args)[0])
                   / (2 * step) for e in np.eye(5)]
        assert np.allclose(grad, numeric, rtol=1e-4, atol=1e-9), (theta, grad, numeric)


def test_fit_loss_refuses_too_few_or_bad_points():
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_loss([1e6, 2e6], [1e9, 2e9], [3.0, 2.9])
    with pytest.raises(ValueError, match="positive finite"):
        fit_loss([1e6] * 5, [1e9] * 5, [3.0, 2.9, float("nan"), 2.8, 2.7])


def test_bootstrap_intervals_cover_the_planted_values_in_most_draws():
    """8 independent noisy sweeps (0.2% noise), each fitted (the whole grid) and bootstrapped (100
    resamples, 90% intervals): alpha's, beta's and N*(1e19)'s intervals each hold the planted value
    in at least 6 of 8. A correct 90% interval misses about 1 in 10; refits that stop early
    (scipy's default tolerances on the unscaled objective) give intervals a hundred times too
    narrow, which miss nearly all."""
    rng = np.random.default_rng(1)
    truth_n = laws.compute_optimal(PLANTED, 1e19)["N"]
    covered = {"alpha": 0, "beta": 0, "N": 0}
    for draw in range(8):
        _, N, D, L = isoflop_points(0.002, rng)
        fit = fit_loss(N, D, L)
        starts = np.array([s["theta"] for s in fit["solutions"][:3]])
        boot = bootstrap(N, D, L, starts, resamples=100, seed=draw, budgets=[1e19], level=0.9)
        for name in ("alpha", "beta"):
            lo, hi = boot["params"][name]
            covered[name] += lo <= PLANTED[name] <= hi
        lo, hi = boot["optimal"]["N"][0]
        covered["N"] += lo <= truth_n <= hi
    assert all(count >= 6 for count in covered.values()), covered


def test_bootstrap_is_seeded():
    _, N, D, L = isoflop_points(0.01, np.random.default_rng(2))
    theta = np.array([[math.log(400), math.log(1200), math.log(1.8), 0.34, 0.3]])
    a, b = (bootstrap(N, D, L, theta, resamples=10, seed=7, budgets=[1e18]) for _ in range(2))
    assert a == b


# --- identification and the held-out prediction -----------------------------------------------------

HELDOUT_BUDGETS = [1e17, 1e18, 1e19, 1e20]
# the default CPU sweep the fit once called a finding (N* ∝ C^0.69): alpha at its bound, A's interval
# [4.5e-5, 2.7e43]; 3 sizes per budget, its largest runs 11 epochs of the corpus
DEGENERATE = {"flops": [2e11] * 3 + [6e11] * 3 + [1.8e12] * 3, "N": [69872, 145888, 316352] * 3,
              "D": [477184, 228352, 105472, 1431040, 685568, 315904, 4293632, 2056192, 948224],
              "loss": [4.719, 5.268, 6.025, 4.436, 4.377, 5.003, 4.398, 4.092, 4.102]}


def as_points(flops, N, D, loss):
    """Points as the fit stage reads them from run manifests."""
    return [{"budget": f"{c:g}", "size": f"n{n:.0f}", "flops": c, "N": n, "D": d, "loss": l, "flops_6nd": 6 * n * d,
             "flops_model": 6 * n * d, "excluded": False} for c, n, d, l in zip(flops, N, D, loss)]


def planted_sweep(noise: float, rng: np.random.Generator, budgets=HELDOUT_BUDGETS, law=PLANTED):
    """An IsoFLOP sweep bracketing the law's own optimum: per budget, sizes 1/4 to 4 times N*(C)."""
    C = np.repeat(budgets, len(FACTORS))
    N = np.array([f * float(laws.compute_optimal(law, c)["N"]) for c in budgets for f in FACTORS])
    D = C / (6 * N)
    return as_points(C, N, D, laws.predict(law, N, D) * np.exp(rng.normal(0.0, noise, len(N))))


def fit_settings(resamples: int = 100) -> dict:
    return {**validate_config({})["scaling"], "bootstrap": {"resamples": resamples, "seed": 0, "level": 0.95}}


def test_a_planted_sweep_is_identified_and_predicts_its_held_out_budget():
    """4 budgets x 5 sizes, 0.2% noise: the fit is identified, and the fit from the 3 lower budgets
    predicts the largest budget's best loss (within 1% of the planted law's) and N*, with
    intervals that hold the measurements (and N*'s the planted N*)."""
    result = fit_sweep(planted_sweep(0.002, np.random.default_rng(0)), fit_settings())
    assert result["identified"] and result["reasons"] == [], result["reasons"]
    planted_share = PLANTED["beta"] / (PLANTED["alpha"] + PLANTED["beta"])
    assert abs(result["exponents"]["N_opt"] - planted_share) < 0.05
    pred = result["prediction"]
    assert pred["made"] and pred["identified"] and pred["fitted_budgets"] == HELDOUT_BUDGETS[:3]
    assert pred["fitted_runs"] == 15 and pred["heldout_flops"] == HELDOUT_BUDGETS[-1]
    loss = pred["best_loss"]
    lo, hi = loss["predicted"]["ci95"]
    assert lo <= loss["measured"] <= hi and loss["inside"] is True
    held = [p for p in result["points"] if p["flops"] == HELDOUT_BUDGETS[-1]]
    truth = min(float(laws.predict(PLANTED, p["N"], p["D"])) for p in held)
    assert abs(loss["predicted"]["value"] / truth - 1) < 0.01 and hi - lo < 0.05 * truth
    n_opt = pred["N_opt"]
    lo, hi = n_opt["predicted"]["ci95"]
    assert n_opt["inside"] is True and lo <= n_opt["measured"] <= hi
    assert lo < float(laws.compute_optimal(PLANTED, HELDOUT_BUDGETS[-1])["N"]) < hi
    md = markdown(result, fit_settings())
    assert "**Approach 3 is identified**" in md and "N* ∝ C^0.4" in md
    assert "## Prediction of the largest budget (held out)" in md and "not identified" not in md


def test_the_prediction_uses_no_point_of_the_held_out_budget():
    """The held-out budget's losses change (x1.2): the prediction stays the same to the bit, the
    measurement moves with them and falls outside the interval."""
    points = planted_sweep(0.002, np.random.default_rng(1))
    settings = fit_settings(resamples=50)
    held = HELDOUT_BUDGETS[-1]
    iso = isoflop_fit([p["flops"] for p in points], [p["N"] for p in points], [p["loss"] for p in points])
    before = heldout_prediction(points, settings, iso)
    changed = copy.deepcopy(points)
    for p in changed:
        if p["flops"] == held:
            p["loss"] *= 1.2
    after = heldout_prediction(changed, settings, iso)
    assert before["made"] and after["made"]
    assert after["best_loss"]["predicted"] == before["best_loss"]["predicted"]
    assert after["N_opt"]["predicted"] == before["N_opt"]["predicted"]
    assert after["approach3"] == before["approach3"]
    assert after["best_loss"]["measured"] == pytest.approx(1.2 * before["best_loss"]["measured"])
    assert before["best_loss"]["inside"] is True and after["best_loss"]["inside"] is False


def captured_figures(monkeypatch) -> dict:
    """Every figure the scaling plots save, by file name: its title, texts and labelled lines."""
    figures = {}

    def capture(fig, path):
        ax = fig.axes[0]
        figures[path.name] = {"title": ax.get_title(), "texts": [t.get_text() for t in ax.texts],
                              "lines": [line.get_label() for line in ax.get_lines()]}
        plots.pyplot().close(fig)

    monkeypatch.setattr(plots, "save_figure", capture)
    return figures


def test_a_degenerate_sweep_is_not_identified_and_prints_no_exponent(monkeypatch):
    """The sweep the fit once reported as N* ∝ C^0.69: not identified, with reasons; fit.json holds no
    exponents or allocation; fit.md and the plots say "not identified" and draw no frontier line;
    the held-out fit, not identified either, predicts nothing."""
    points = as_points(*(DEGENERATE[k] for k in ("flops", "N", "D", "loss")))
    result = fit_sweep(points, fit_settings())
    assert result["identified"] is False
    assert any("search bound" in r for r in result["reasons"]), result["reasons"]
    assert result["exponents"] is None and result["allocation"] is None
    md = markdown(result, fit_settings())
    assert "**Approach 3: not identified**: " in md
    assert "∝ C^" not in md and "Implied compute-optimal exponents" not in md and "| alpha |" not in md
    assert not result["approach2"]["identified"] and "Approach 2's power law: not identified" in md
    pred = result["prediction"]
    assert pred["made"] is False and pred["identified"] is False and pred["reasons"]
    assert "best_loss" not in pred and "predicts nothing" in md
    figures = captured_figures(monkeypatch)
    plots.plot_fit(points, result, ROOT / "fit.png")
    plots.plot_frontier(result, points, ROOT / "frontier.png")
    assert "not identified" in figures["fit.png"]["title"] and "N^" not in figures["fit.png"]["title"]
    assert not any(label.startswith("approach") for label in figures["frontier.png"]["lines"])
    assert any("not identified" in text for text in figures["frontier.png"]["texts"])


def test_identification_names_each_reason():
    """Each rule on its own: a fitted value at a bound, an interval reaching one, a wide N*
    exponent, a wide N* at a budget trained, failed refits; and none when all are in range."""
    theta = {"a": [5.0, 7.0], "b": [6.0, 8.0], "e": [0.4, 0.7], "alpha": [0.3, 0.4], "beta": [0.25, 0.35]}
    fit = {"at_bound": [], "theta": [6.0, 7.0, 0.5, 0.34, 0.3]}
    boot = {"level": 0.95, "resamples": 100, "failed": 0, "theta": theta, "exponents": {"N_opt": [0.4, 0.55]},
            "budgets": [1e18, 1e19, 1e21], "optimal": {"N": [[1e8, 2e8], [3e8, 6e8], [1e9, 1e12]]}}
    assert identification(fit, boot, [1e18, 1e19]) == {"identified": True, "reasons": []}  # 1e21: not trained
    cases = [({"at_bound": ["alpha"], "theta": [6.0, 7.0, 0.5, 10.0, 0.3]}, {}, "alpha at its search bound (10)"),
             (fit, {"theta": {**theta, "a": [-10.0, 7.0]}},
              "A's 95% interval [4.54e-05, 1.1e+03] reaches its search bound"),
             (fit, {"exponents": {"N_opt": [0.1, 0.7]}},
              "the N* exponent's 95% interval [0.10, 0.70] is wider than 0.5"),
             (fit, {"optimal": {"N": [[1e8, 2e8], [1e7, 6e8], [1e9, 1e12]]}}, "N* at C = 1e+19: the 95% interval"),
             (fit, {"failed": 3}, "3 of 100 bootstrap refits failed")]
    for bad_fit, change, reason in cases:
        verdict = identification(bad_fit, {**boot, **change}, [1e18, 1e19])
        assert verdict["identified"] is False and len(verdict["reasons"]) == 1, verdict
        assert verdict["reasons"][0].startswith(reason), verdict


# --- approach 2 ------------------------------------------------------------------------------------

def test_isoflop_minimum_of_a_synthetic_parabola():
    n_star = 3e7
    N = np.geomspace(3e6, 3e8, 7)
    loss = 2.5 + 0.08 * (np.log(N) - math.log(n_star)) ** 2
    m = isoflop_minimum(N, loss)
    assert m["N"] == pytest.approx(n_star, rel=1e-6) and m["loss"] == pytest.approx(2.5) and m["inside"]
    concave = isoflop_minimum(N, 2.5 - 0.08 * (np.log(N) - math.log(n_star)) ** 2)
    assert concave["N"] is None and "no minimum" in concave["note"]
    edge = isoflop_minimum(N[:3], loss[:3])
    assert not edge["inside"] and "extrapolated" in edge["note"]
    with pytest.raises(ValueError, match="3 distinct sizes"):
        isoflop_minimum(N[:2], loss[:2])


def test_isoflop_power_law_through_planted_minima():
    """Parabolas whose vertices lie on N* = 0.1 C^0.5 give back that power law, and D* = C / 6N*."""
    budgets, N, loss = [], [], []
    for c in BUDGETS:
        n_star = 0.1 * c ** 0.5
        for f in FACTORS:
            budgets.append(c)
            N.append(f * n_star)
            loss.append(3.0 + 0.05 * math.log(f) ** 2)
    out = isoflop_fit(budgets, N, loss)
    assert out["identified"] and out["reasons"] == []
    assert out["N_opt"]["a"] == pytest.approx(0.5) and out["N_opt"]["k"] == pytest.approx(0.1)
    assert out["D_opt"]["a"] == pytest.approx(0.5) and out["D_opt"]["k"] == pytest.approx(1 / 0.6)
    # one budget's sizes all above its optimum: its vertex is extrapolated, so no power law is fitted
    shifted = [n * 8 if c == BUDGETS[-1] else n for c, n in zip(budgets, N)]
    shifted_loss = [3.0 + 0.05 * math.log(n / (0.1 * c ** 0.5)) ** 2 for c, n in zip(budgets, shifted)]
    out = isoflop_fit(budgets, shifted, shifted_loss)
    assert not out["identified"] and out["N_opt"] is None and out["D_opt"] is None
    assert out["reasons"] == ["C = 1e+19: minimum outside the sizes trained (extrapolated)"]


# --- sizes and plans -------------------------------------------------------------------------------

def test_generated_sizes():
    assert size_shape("d12w768") == size_shape("gpt2-124m")
    assert size_shape("d2w48") == dict(n_layer=2, n_head=1, n_embd=48)
    assert GPTConfig.from_size("d3w192", vocab_size=100).n_head == 3
    for bad in ("d0w64", "d2w200", "huge"):
        with pytest.raises(ValueError, match=repr(bad)):
            size_shape(bad)


def scaling_config(**changes):
    return section_config("scaling", changes)


def test_plan_uses_d_equals_c_over_6n_rounded_to_steps():
    config = validate_config({})
    pretrain = sweep_pretrain(config)
    plan = plan_sweep(config["scaling"], pretrain, vocab_size=4096)
    assert len(plan) >= 9 and len({r["budget"] for r in plan}) >= 3
    batch = pretrain["global_batch_tokens"]
    for r in plan:
        assert r["steps"] == max(1, round(r["flops"] / (6 * r["params"]) / batch))
        assert r["tokens"] == r["steps"] * batch
        assert abs(r["tokens"] - r["design_tokens"]) <= batch / 2 or r["steps"] == 1
        assert run_config(pretrain, r)["max_steps"] == r["steps"]
    assert budget_label(1.2e11) == "1.2e11" and budget_label(4e10) == "4e10"
    non_embedding = plan_sweep({**config["scaling"], "params": "non_embedding"}, pretrain, vocab_size=4096)
    assert all(a["params"] > b["params"] and a["steps"] < b["steps"] for a, b in zip(plan, non_embedding))


def test_a_sweep_with_one_size_or_one_budget_fails_naming_what_is_missing():
    with pytest.raises(ConfigError, match=r"scaling.budgets.0.sizes'.*1 distinct size"):
        sweep_runs(scaling_config(budgets=[{"flops": 1e11, "sizes": ["d1w16"]}, {"flops": 1e12, "sizes": ["d1w16"]}]))
    with pytest.raises(ConfigError, match=r"'scaling.budgets': one budget \(1e11 FLOPs\).*at least 2 compute budgets"):
        sweep_runs(scaling_config(budgets=[{"flops": 1e11, "sizes": ["d1w8", "d1w16", "d1w32"]}]))
    with pytest.raises(ConfigError, match=r"'scaling.runs': 1 size\(s\) and 2 token count"):
        sweep_runs(scaling_config(budgets=[], runs=[{"size": "nano", "tokens": 1000},
                                                    {"size": "nano", "tokens": 2000}]))
    with pytest.raises(ConfigError, match=r"config key 'scaling.budgets.0.sizes.0'"):
        validate_config({"scaling": {"budgets": [{"flops": 1e11, "sizes": ["d1x8"]}]}})
    with pytest.raises(ConfigError, match="config key 'scaling'.*'d2w200'"):
        plan_sweep(scaling_config(budgets=[{"flops": 1e11, "sizes": ["d2w200", "d1w16", "d1w32"]},
                                           {"flops": 1e12, "sizes": ["d1w8", "d1w16", "d1w32"]}]),
                   sweep_pretrain(validate_config({})), vocab_size=4096)


def test_cluster_preset_plan_prints_runs_and_gpu_hours():
    result = subprocess.run([sys.executable, "-m", "pipeline", "scaling-plan", "--configfile",
                             str(ROOT / "workflow" / "configs" / "cluster.yaml")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    preset = yaml.safe_load((ROOT / "workflow" / "configs" / "cluster.yaml").read_text())["scaling"]
    runs = sum(len(b["sizes"]) for b in preset["budgets"])
    assert f"{runs} runs" in result.stdout
    config = load_with([ROOT / "workflow" / "configs" / "cluster.yaml"])
    plan = plan_sweep(config["scaling"], sweep_pretrain(config), config["tokenizer"]["vocab_size"])
    assert all(r["params"] > 5e6 for r in plan)  # GPT-2-shaped models, not the CPU sweep's
    hours = cost(plan, peak_flops=config["scaling"]["peak_flops"], mfu=config["scaling"]["mfu"])["gpu_hours"]
    assert f"~{hours:,.1f} GPU-hours" in result.stdout


# --- the stage, on hand-written run manifests ------------------------------------------------------

def fake_sweep(root, scaling, pretrain, vocab_size, law, rng):
    """Write, for every planned run, the manifest a finished pretrain run would (N and D from the
    plan, the loss from `law` with noise): the fit stage reads nothing else."""
    for r in plan_sweep(scaling, pretrain, vocab_size):
        out = root / r["budget"] / r["size"]
        out.mkdir(parents=True)
        (out / "final.pt").write_bytes(b"weights")
        loss = float(laws.predict(law, r["params"], r["tokens"]) * math.exp(rng.normal(0, 0.002)))
        write_manifest(out / "manifest.json", stage="pretrain", config={"size": r["size"], **run_config(pretrain, r)},
                       inputs=[], outputs={out / "final.pt": None}, counts={"steps": r["steps"], "tokens": r["tokens"]},
                       metrics={"params": r["params_total"], "params_non_embedding": r["params_non_embedding"],
                                "flops_per_token": r["flops_model"] / r["tokens"], "final_val_loss": loss})


def test_scaling_fit_stage_end_to_end(tmp_path, monkeypatch):
    # a coarser grid (2 values per axis): the whole grid is tested above
    coarse = {k: v[[0, -1]] if k in ("a", "b") else v[[1, 2]] for k, v in laws.GRID.items()}
    monkeypatch.setattr(laws, "GRID", coarse)
    config = validate_config({})
    scaling = {**config["scaling"], "bootstrap": {"resamples": 20, "seed": 0, "level": 0.9}, "exclude_highest": 1}
    pretrain = sweep_pretrain(config)
    # a law of this sweep's scale (close to the fit of its measured runs, docs/scaling.md)
    law = {"E": 4.6, "A": 4e4, "B": 2e7, "alpha": 1.1, "beta": 1.5}
    fake_sweep(tmp_path / "runs", scaling, pretrain, 4096, law, np.random.default_rng(0))
    result = scaling_fit(runs=tmp_path / "runs", out=tmp_path / "fit", scaling=scaling, pretrain=pretrain,
                         vocab_size=4096)
    saved = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert saved["approach3"]["alpha"] == pytest.approx(result["approach3"]["alpha"])
    assert sum(p["excluded"] for p in saved["points"]) == 1
    assert saved["identified"] is True and saved["approach2"]["identified"] is True
    assert len(saved["allocation"]) == len(scaling["budgets"]) + 1  # each budget and the target
    largest = max(b["flops"] for b in scaling["budgets"])
    assert saved["prediction"]["heldout_flops"] == largest and saved["prediction"]["best_loss"]["inside"] is True
    md = (tmp_path / "fit" / "fit.md").read_text()
    assert "Chinchilla (Hoffmann et al. 2022)" in md and "| alpha |" in md and "far outside" in md
    assert "| best final val loss over the sizes trained |" in md
    assert json.loads((tmp_path / "fit" / "manifest.json").read_text())["metrics"]["identified"] is True
    checked, problems = verify(tmp_path / "fit")
    assert checked == 6 and not problems
    # the report card shows this fit.json: the verdict, and the prediction beside its measurement
    report_card(out=tmp_path / "report", scaling=tmp_path / "fit" / "manifest.json")
    text = " ".join(re.sub(r"<[^>]+>", " ", (tmp_path / "report" / "index.html").read_text()).split())
    loss = saved["prediction"]["best_loss"]
    assert "The fit is identified" in text and f"predicts C = {largest:.3g}" in text
    assert (f"best final loss {loss['predicted']['value']:.4g} [{loss['predicted']['ci95'][0]:.4g}, "
            f"{loss['predicted']['ci95'][1]:.4g}] ({loss['predicted_size']}) {loss['measured']:.4g} "
            f"({loss['measured_size']}) yes") in text
    # a run trained with another schedule than the plan's is refused, naming its manifest
    first = plan_sweep(scaling, pretrain, 4096)[0]
    manifest = tmp_path / "runs" / first["budget"] / first["size"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["counts"]["steps"] -= 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=str(manifest)):
        scaling_fit(runs=tmp_path / "runs", out=tmp_path / "fit2", scaling=scaling, pretrain=pretrain, vocab_size=4096)


def test_snakemake_dry_run_fans_out_the_sweep(tmp_path):
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "scaling_fit",
                             "--config", f"results={tmp_path}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = len(sweep_runs(validate_config({})["scaling"]))
    assert f"scaling_run         {runs}" in result.stdout or f"scaling_run {runs}" in " ".join(result.stdout.split())

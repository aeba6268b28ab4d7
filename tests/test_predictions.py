"""Predictions you can check (issue 13): rollout hold-outs, prediction intervals beside confidence
intervals, IsoFLOP profiles (Chinchilla Approach 2) beside the joint law (Approach 3), an exact joint
fit on noise-free grids, and the calibration of the bootstrap intervals."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SECONDS_SIZED, run_cli

# Chinchilla's constants as refitted by Besiroglu et al. 2024.
CHINCHILLA = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
A_TRUE = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])      # 0.51261


def grid(n_lo, n_hi, d_lo, d_hi, n_n=5, n_d=5):
    N, D = np.meshgrid(np.logspace(n_lo, n_hi, n_n), np.logspace(d_lo, d_hi, n_d))
    return N.ravel(), D.ravel()


def test_joint_fit_is_exact_on_noise_free_grids():
    rng = np.random.default_rng(13)
    grids = [(7, 9, 9, 11)] + [tuple(rng.uniform(6, 8, 1)) + tuple(rng.uniform(9, 10, 1))
                               + tuple(rng.uniform(8, 9.5, 1)) + tuple(rng.uniform(10.5, 12, 1))
                               for _ in range(20)]
    for n_lo, n_hi, d_lo, d_hi in grids:
        N, D = grid(n_lo, n_hi, d_lo, d_hi)
        fit = rse.fit_joint_law(N, D, rse.joint_law(N, D, **CHINCHILLA), n_bootstrap=0)
        for k, true in CHINCHILLA.items():
            tol = 1e-6 if k in ("alpha", "beta") else 1e-4
            assert abs(fit[k] / true - 1) < tol, (k, fit[k], (n_lo, n_hi, d_lo, d_hi))
        assert fit["N_opt_exponent"] == pytest.approx(A_TRUE, rel=1e-6)
        assert fit["residual_std_log"] < 1e-9


def test_prediction_interval_adds_the_scatter_and_covers_new_runs():
    x = np.logspace(5, 8, 12)
    law = (40.0, 0.3, 2.0)
    y = rse.power_law(x, *law) * np.exp(np.random.default_rng(0).normal(0, 0.01, len(x)))
    fit = rse.fit_power_law(x, y, n_bootstrap=400, seed=0)
    assert 0.006 < fit["residual_std_log"] < 0.015        # the 1% noise, dof-corrected
    x_new = 1e7
    pred = rse.predictions_from_fits({"params": fit})      # the reference models, far away
    assert all(p["predicted_loss_pi95"][0] <= p["predicted_loss_ci95"][0] for p in pred if p["sweep"] == "params")
    draws = rse.law_samples(fit, [x_new])[:, 0]
    ci = rse._percentiles(draws)
    pi = rse._percentiles(rse.with_noise(draws, fit["residual_std_log"]))
    assert pi[0] < ci[0] < ci[1] < pi[1]
    # new observations at x_new: about 95% fall inside the prediction interval, far fewer in the CI
    new = rse.power_law(x_new, *law) * np.exp(np.random.default_rng(1).normal(0, 0.01, 2000))
    inside_pi = np.mean((new >= pi[0]) & (new <= pi[1]))
    inside_ci = np.mean((new >= ci[0]) & (new <= ci[1]))
    assert 0.88 < inside_pi < 0.995 and inside_ci < 0.7, (inside_pi, inside_ci)


def test_rollout_one_variable_refits_every_prefix():
    x = np.repeat(np.logspace(5, 7.5, 6), 2)               # 6 sizes, 2 seeds each
    y = rse.power_law(x, 40.0, 0.3, 2.0) * np.exp(np.random.default_rng(2).normal(0, 0.005, len(x)))
    runs = [{"name": f"r{i}", "N_nonembedding": a, "loss": b} for i, (a, b) in enumerate(zip(x, y))]
    ro = rse.rollout_one_variable(runs, "N_nonembedding", n_bootstrap=100, seed=0)
    assert ro["available"] and [c["n_fit_points"] for c in ro["cutoffs"]] == [6, 8, 10]
    assert [c["n_predicted"] for c in ro["cutoffs"]] == [6, 4, 2]
    headline = rse.rollout_headline(ro)
    assert headline is ro["cutoffs"][-1]
    for c in ro["cutoffs"]:                                # the numbers are the refit's own predictions
        fit = rse.fit_power_law(x[:c["n_fit_points"]], y[:c["n_fit_points"]], n_bootstrap=0)
        rel = rse.power_law(x[c["n_fit_points"]:], fit["a"], fit["b"], fit["c"]) / y[c["n_fit_points"]:] - 1
        assert c["mean_bias"] == pytest.approx(rel.mean(), rel=1e-6)
        assert c["mean_abs_error"] == pytest.approx(np.abs(rel).mean(), rel=1e-6)
        assert c["mean_bias_ci95"][0] <= c["mean_bias_ci95"][1] and c["mean_abs_error_ci95"][0] >= 0
    # the headline cutoff lists its predictions run by run, each with both intervals
    assert len(headline["runs"]) == headline["n_predicted"]
    for r in headline["runs"]:   # the noise widens the interval (up to Monte Carlo error of the draws)
        assert np.ptp(r["relative_error_pi95"]) > 0.97 * np.ptp(r["relative_error_ci95"])
    assert rse.rollout_one_variable(runs[:6], "N_nonembedding")["available"] is False  # 3 sizes


def test_rollout_joint_orders_by_compute_and_is_exact_without_noise():
    N, D = grid(7, 9, 9, 11, 4, 4)
    loss = rse.joint_law(N, D, **CHINCHILLA)
    points = [{"name": f"p{i}", "N": n, "D": d, "loss": l} for i, (n, d, l) in enumerate(zip(N, D, loss))]
    ro = rse.rollout_joint(points, n_bootstrap=50, seed=0)
    assert ro["available"] and ro["order"].startswith("compute")
    assert len(ro["cutoffs"]) == rse.ROLLOUT_MAX_CUTOFFS
    C = np.sort(6 * N * D)
    last = rse.rollout_headline(ro)
    assert last["fit_up_to"] == pytest.approx(C[-2]) and last["n_predicted"] == 1
    usable = [c for c in ro["cutoffs"] if c["available"]]
    assert usable[-1]["mean_abs_error"] < 1e-6


def isoflop_grid(budgets, seed=0, noise=0.0, spread=0.9, n_sizes=9):
    """Runs on IsoFLOP profiles of Chinchilla's law: n_sizes sizes per budget, log-spaced within a factor
    10^spread either side of the true optimum (jittered per budget so no size sits exactly on it)."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = rse.compute_optimal_allocation(**CHINCHILLA, flops=C)[0].item()
        for f in np.logspace(-spread, spread, n_sizes) * np.exp(rng.uniform(-0.2, 0.2)):
            n = n_opt * f
            d = C / (6 * n)
            rows.append((float(n), float(d), float(rse.joint_law(n, d, **CHINCHILLA) * np.exp(rng.normal(0, noise)))))
    return rows


def test_isoflop_through_fit_csv_recovers_the_exponent_by_both_approaches(tmp_path):
    rows = isoflop_grid(np.logspace(18, 21, 5), noise=0.001)
    # a budget whose sizes all lie above its optimum: refused, and named
    n_opt = rse.compute_optimal_allocation(**CHINCHILLA, flops=3e22)[0].item()
    rows += [(float(n), 3e22 / (6 * n), float(rse.joint_law(n, 3e22 / (6 * n), **CHINCHILLA)))
             for n in n_opt * np.logspace(0.3, 1.2, 5)]
    table = tmp_path / "isoflop.csv"
    table.write_text("N,D,loss\n" + "".join(f"{float(n)!r},{float(d)!r},{float(l)!r}\n" for n, d, l in rows))
    out = tmp_path / "fit"
    r = run_cli(["--fit-csv", table, "--output-dir", out, "--bootstrap", "200"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    iso, joint = res["isoflop"], res["fits"]["joint"]
    assert iso["available"] and iso["n_budgets_used"] == 5 and iso["grouping"].startswith("binned")
    assert abs(iso["N_opt_exponent"] - A_TRUE) < 0.01, iso["N_opt_exponent"]          # Approach 2
    assert abs(joint["N_opt_exponent"] - A_TRUE) < 0.01, joint["N_opt_exponent"]      # Approach 3
    assert iso["N_opt_exponent"] + iso["D_opt_exponent"] == pytest.approx(1.0, abs=1e-9)
    lo, hi = iso["N_opt_exponent_ci95"]
    assert lo < iso["N_opt_exponent"] < hi and hi - lo < 0.05
    assert iso["joint_N_opt_exponent"] == pytest.approx(joint["N_opt_exponent"])
    assert iso["intervals_overlap"] is True and iso["warning"] is None
    assert len(iso["refused_budgets"]) == 1 and "3e+22 FLOPs: minimum at the edge" in iso["refused_budgets"][0]
    assert "IsoFLOP (Approach 2, 5 budgets)" in r.stdout and "IsoFLOP budget refused: 3e+22" in r.stdout
    assert res["holdout"]["rollout_joint"]["available"]
    budget = res["compute_optimal"]["budgets"][-1]
    assert budget["loss_pi95"][0] <= budget["loss_ci95"][0] <= budget["loss_ci95"][1] <= budget["loss_pi95"][1]


def test_isoflop_interpolates_a_size_by_horizon_grid():
    # sizes x token horizons whose products never line up: no binned budget has 3 sizes
    points = [{"N": n, "D": d, "loss": float(rse.joint_law(n, d, **CHINCHILLA))}
              for n in np.logspace(7, 9.2, 8) * 1.13 for d in np.logspace(8.3, 11.5, 13)]
    iso = rse.fit_isoflop(points, None, n_bootstrap=100)
    assert iso["available"] and iso["grouping"].startswith("interpolated")
    assert abs(iso["N_opt_exponent"] - A_TRUE) < 0.01, iso["N_opt_exponent"]
    assert iso["joint_N_opt_exponent"] is None and iso["intervals_overlap"] is None


def test_isoflop_disagreement_is_a_warning():
    iso = {"N_opt_exponent": 0.40, "N_opt_exponent_ci95": [0.38, 0.42]}
    joint = {"available": True, "N_opt_exponent": 0.51, "N_opt_exponent_ci95": [0.49, 0.53]}
    agree = rse.isoflop_agreement(iso, joint)
    assert agree["intervals_overlap"] is False and "do not overlap" in agree["warning"]
    joint["N_opt_exponent_ci95"] = [0.41, 0.53]
    assert rse.isoflop_agreement(iso, joint)["warning"] is None


def test_isoflop_on_a_two_sweep_ladder_is_unavailable_with_a_reason():
    points = [{"N": n, "D": 1e9, "loss": 3.0 + 1e3 / n ** 0.3} for n in np.logspace(6, 8, 5)]
    points += [{"N": 1e7, "D": d, "loss": 3.0 + 1e3 / d ** 0.3} for d in np.logspace(8, 10, 5)]
    iso = rse.fit_isoflop(points, None, n_bootstrap=50)
    assert iso["available"] is False and "at least 3 compute budgets" in iso["reason"]


CALIBRATION_GRID = grid(7, 9, 9, 11, 6, 5)                 # 30 runs


def test_bootstrap_intervals_are_calibrated_on_20_sets():
    cov = rse.interval_coverage(CHINCHILLA, *CALIBRATION_GRID, noise_sd=0.0075, n_sets=20, n_bootstrap=200, seed=100)
    assert all(c >= 17 for c in cov["covered"].values()), cov["covered"]


@pytest.mark.slow
def test_bootstrap_intervals_are_calibrated_on_200_sets():
    # about 50 s on 2 cores: pytest -m slow tests/test_predictions.py (or RUN_SLOW=1). The residual
    # bootstrap measured 0.920 / 0.925 / 0.930 (alpha, beta, a); the pairs bootstrap over runs that it
    # replaced over-covered at 0.995 / 0.985 / 0.985.
    cov = rse.interval_coverage(CHINCHILLA, *CALIBRATION_GRID, noise_sd=0.0075, n_sets=200, n_bootstrap=1000, seed=1000)
    assert all(0.90 <= c <= 0.98 for c in cov["coverage"].values()), cov["coverage"]


def test_validation_target_prediction_and_score_are_the_joint_laws():
    N, D = CALIBRATION_GRID
    fit = rse.fit_joint_law(N, D, rse.joint_law(N, D, **CHINCHILLA), n_bootstrap=50)
    largest = float(np.max(6 * N * D))
    t = rse.validation_target(fit, 6 * N * D, 4.0)
    assert t["available"] and t["target_flops"] == pytest.approx(4 * largest)
    assert 6 * t["N_opt"] * t["D_opt"] == pytest.approx(4 * largest, rel=1e-9)
    n_opt, d_opt, _ = (v.item() for v in rse.compute_optimal_allocation(**CHINCHILLA, flops=4 * largest))
    assert t["N_opt"] == pytest.approx(n_opt, rel=1e-5) and t["D_opt"] == pytest.approx(d_opt, rel=1e-5)
    pred = rse.predict_validation(fit, 1e9, 2e10)
    assert pred["predicted_loss"] == pytest.approx(rse.joint_law(1e9, 2e10, **CHINCHILLA), rel=1e-6)
    assert np.ptp(pred["predicted_loss_ci95"]) < 1e-6           # noise-free: the interval is the truth
    score = rse.score_validation({"predicted_loss": 2.2, "predicted_loss_ci95": [2.1, 2.3],
                                  "predicted_loss_pi95": [2.0, 2.5]}, 2.4)
    assert score["relative_error"] == pytest.approx(2.2 / 2.4 - 1)
    assert score["within_pi95"] is True and score["within_ci95"] is False
    assert score["relative_error_pi95"] == pytest.approx([2.0 / 2.4 - 1, 2.5 / 2.4 - 1])
    assert rse.score_validation(pred, None)["within_pi95"] is None
    bound = dict(fit, E_at_bound=True)
    assert not rse.validation_target(bound, 6 * N * D, 4.0)["available"]
    assert "unavailable" in rse.validation_target({"available": False, "reason": "x"}, [1.0], 4.0)["reason"]
    assert rse.build_parser().parse_args(["--validate"]).validate == 4.0
    assert rse.build_parser().parse_args([]).validate is None


def test_a_validate_run_never_enters_the_fits():
    N, D = grid(7, 9, 9, 11, 3, 3)
    runs = [{"name": f"r{i}", "sweep": "table", "status": "completed", "n_params_nonembedding": n, "tokens": d,
             "final_val_loss": float(rse.joint_law(n, d, **CHINCHILLA))} for i, (n, d) in enumerate(zip(N, D))]
    check = {"name": "validate-N1B-D20B", "sweep": "validate", "status": "completed",
             "n_params_nonembedding": 1e9, "tokens": 2e10, "final_val_loss": 9.0}
    with_check = rse.analyse_runs(runs + [check], n_bootstrap=0)["fits"]["joint"]
    assert with_check["n_points"] == 9 and with_check["alpha"] == pytest.approx(CHINCHILLA["alpha"], rel=1e-6)
    assert len(rse.runs_as_points(runs + [check])) == 9


VALIDATE_LADDER = [a for a in SECONDS_SIZED] + ["--param-sizes", "25K,100K,200K", "--data-sizes", "8K,16K,32K",
                                                "--data-model-size", "100K",
                                                "--bootstrap", "200",
                                                "--validate", "2"]


def test_validate_trains_the_predicted_compute_optimal_model_once(tmp_path, corpus_file, cache_dir, monkeypatch,
                                                                  capsys):
    # --validate trains only when the joint law's E is off its bound. On this generated corpus at these
    # lengths (30 steps) it is with tiny's earlier shapes and rates (head_dim 32, min(1e-2, 0.4 / d_model), a
    # warmup of 10% of the sweep's steps) and a fixed init std of 0.04 (E 0.14); tiny's own rates, or GPT-2's
    # 0.02 with today's zero projections, run E to 0 here. In-process, with those patched in.
    monkeypatch.setitem(rse.PRESETS, "tiny", dataclasses.replace(rse.PRESETS["tiny"], head_dim=32, lr_width=0.4,
                                                                 warmup_frac=0.1))
    monkeypatch.setattr(rse, "default_peak_lr", lambda d_model, lr_width, lr_cap: min(1e-2, lr_width / d_model))
    monkeypatch.setattr(rse, "init_std", lambda d_model: 0.04)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in VALIDATE_LADDER + ["--data", corpus_file, "--cache-dir", cache_dir, "--output-dir", out]]
    assert rse.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    v = res["validation"]
    assert v["available"] and v["factor"] == 2.0 and v["status"] == "completed", v
    largest = max(6 * p["N_nonembedding"] * p["D"] for p in res["points"])
    assert v["target_flops"] == pytest.approx(2 * largest)
    assert 6 * v["N_opt"] * v["D_opt"] == pytest.approx(v["target_flops"], rel=1e-9)
    # N rounded to a shape the tiny preset builds, D to whole steps of 8 x 64 tokens
    shape = rse.choose_shape(round(v["N_opt"]), rse.PRESETS["tiny"])
    assert v["N"] == rse.n_params_nonembedding(*shape[:2]) and (v["n_layer"], v["d_model"]) == shape[:2]
    assert v["D"] == v["steps"] * 512 and v["steps"] == max(1, round(v["D_opt"] / 512))
    ci, pi = v["predicted_loss_ci95"], v["predicted_loss_pi95"]
    assert pi[0] < ci[0] <= v["predicted_loss"] <= ci[1] < pi[1]
    assert v["relative_error"] == pytest.approx(v["predicted_loss"] / v["measured_loss"] - 1)
    assert v["within_pi95"] == (pi[0] <= v["measured_loss"] <= pi[1])
    assert v["within_ci95"] == (ci[0] <= v["measured_loss"] <= ci[1])
    # trained like any run (its record under runs/), and never fitted
    record = out / "runs" / f"{v['run_id']}.json"
    assert json.loads(record.read_text())["final_val_loss"] == v["measured_loss"]
    assert all(rse.ROLE_VALIDATION not in p["roles"] for p in res["points"]) and res["fits"]["joint"]["n_points"] == 6
    # the prediction is logged before the run trains, the comparison after
    said = capsys.readouterr().out
    assert said.index("the joint law predicts") < said.index("validate: training") < said.index(f"{v['name']} measured")
    fig = rse.build_scaling_figure(res, rse.saved_curves(out))
    assert any("validate" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    # the same command again: the validation run is kept, not retrained
    mtime = record.stat().st_mtime_ns
    assert rse.main(args) == 0
    again = capsys.readouterr().out
    assert "finished earlier (kept, not retrained)" in again and "validate: training" not in again
    assert record.stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text())["validation"]["measured_loss"] == v["measured_loss"]


def test_a_held_out_run_whose_bootstrap_draws_all_overflow_is_reported_not_raised():
    """Measured on this project's own tiny grid (tests/data_tiny_grid_v512.csv: built-in corpus, 512-token
    BPE, WSD, 4 sizes x 5 horizons plus a 12M-token run; 2-core CPU, 2026-11-29): refitting without
    the largest D leaves bootstrap draws that overflow, and the hold-out once raised TypeError there."""
    points = rse.read_runs_csv(Path(__file__).parent / "data_tiny_grid_v512.csv")
    assert len(points) == 22
    held = [{"name": "x", "N": 1e5, "D": 8e6, "loss": 2.5}]
    fit = {"E": 1.0, "A": 10.0, "B": 10.0, "alpha": 0.3, "beta": 0.3, "residual_std_log": 0.01,
           "available": True, "_samples": np.array([[800.0, 0.3, 2.3, 0.3, 0.0]] * 20)}   # exp(800) = inf
    out = rse._predict_held_out(fit, held, 0)
    assert out["runs"][0]["relative_error_ci95"] is None and out["runs"][0]["within_pi95"] is None
    assert out["runs"][0]["relative_error"] == pytest.approx(rse.joint_law(1e5, 8e6, 1, 10, 10, .3, .3) / 2.5 - 1)
    ho = rse.holdout_joint(points, "D", 100, 0)
    assert ho["available"] and abs(ho["relative_error"]) < 0.2

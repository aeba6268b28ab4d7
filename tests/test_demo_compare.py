"""quick_scaling_demo.py and compare_quick_vs_real.py (issue 4)."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import compare_quick_vs_real as cmp
import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse
from conftest import ROOT, SECONDS_SIZED, run_cli, run_records

# Besiroglu et al. 2024's fit of L(N, D) = E + A/N^alpha + B/D^beta to Chinchilla's runs and Kaplan et al.
# 2020's L(N), L(D), as given in the project's reference-data notes; written out here independently of
# the demo's own constants so a wrong constant in the demo fails these tests.
E, A, B, ALPHA, BETA = 1.82, 482.0, 2085.0, 0.348, 0.366
KAPLAN_N, KAPLAN_ALPHA_N, KAPLAN_D, KAPLAN_ALPHA_D = 8.8e13, 0.076, 5.4e13, 0.095


def run_demo(out, *args):
    assert demo.main([*map(str, args), "--output-dir", str(out)]) == 0
    return json.loads((out / "results.json").read_text())


def sweep_points(results, sweep):
    """The points-table rows of one sweep's law (L(N) for "params", L(D) for "data"), in plan order."""
    return [p for p in results["points"] if rse.SWEEP_ROLE[sweep] in p["roles"]]


def sweep_xs(results, sweep):
    return np.array([p[rse.SWEEP_X[sweep]] for p in sweep_points(results, sweep)], dtype=float)


def fisher_se(x, a, b, c, noise):
    """Standard errors of (a, b, c) of L = c + a x^-b from the Fisher information at the true values,
    with relative noise `noise` on each point: the spread a least-squares fit should show."""
    x = np.asarray(x, float)
    loss = c + a * x ** -b
    jac = np.stack([x ** -b, -a * np.log(x) * x ** -b, np.ones_like(x)], axis=1) / (noise * loss)[:, None]
    return np.sqrt(np.diag(np.linalg.inv(jac.T @ jac)))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-quick")
    return out, run_demo(out)


@pytest.fixture(scope="module")
def standard_demo(tmp_path_factory):
    # seed 1: a typical draw (both sweeps' exponents within 1 Fisher standard error of the truth), so the
    # interval test below checks that intervals are centred and wide enough, not a 1-in-20 draw
    out = tmp_path_factory.mktemp("demo-standard")
    res = run_demo(out, "--mode", "standard", "--seed", "1")
    return res, run_records(out)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, corpus_file, cache_dir):
    out = tmp_path_factory.mktemp("real") / "scaling_results_tiny_v2"
    r = run_cli([*SECONDS_SIZED, "--data", corpus_file, "--cache-dir", cache_dir, "--output-dir", out], out.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------------

def test_demo_cli_needs_no_torch_and_writes_the_runners_schema(tmp_path):
    out = tmp_path / "scaling_results_demo"
    # torch made unimportable, as on a machine without it: the demo must not need it
    code = ("import sys; sys.modules['torch'] = None; import quick_scaling_demo as d; rc = d.main(sys.argv[1:]); "
            "print('TORCH-LOADED' if sys.modules.get('torch') else 'NO-TORCH', rc)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, "--output-dir", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "NO-TORCH 0"
    res = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "mode", "config", "environment", "points", "fits", "predictions"):
        assert key in res
    assert res["schema_version"] == rse.SCHEMA_VERSION
    assert res["simulated"] is True and res["mode"] == "quick"
    assert res["true_law"]["constants"] == {"E": E, "A": A, "B": B, "alpha": ALPHA, "beta": BETA}
    # the runner's own plan for --mode quick: same runs, N, D and steps
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(["--mode", "quick"]))
    plan = rse.build_plan(cfg, preset)
    assert [(q["name"], q["N_nonembedding"], q["D"]) for q in res["points"]] == \
        [(p.name, p.n_params_nonembedding, p.tokens) for p in plan]
    # each run's full record (its curve) is under runs/, as the runner writes it
    exps = run_records(out)
    assert [(e["name"], e["n_params_nonembedding"], e["tokens"], e["steps"]) for e in exps] == \
        [(p.name, p.n_params_nonembedding, p.tokens, p.steps) for p in plan]
    for e, p in zip(exps, plan):
        cur = e["curve"]
        assert set(cur) == {"step", "tokens", "train_loss", "val_loss", "lr", "eval_step", "eval_tokens"}
        assert abs(e["initial_loss"] - math.log(10_000)) < 0.1              # untrained: near ln(vocabulary)
        assert cur["val_loss"][0] == e["initial_loss"] and cur["eval_step"][0] == 0
        assert cur["val_loss"][-1] == e["final_val_loss"] and cur["eval_step"][-1] == p.steps
        # logged where the runner logs: every 50 steps and the last step, with the runner's LR schedule
        assert cur["step"] == [s for s in range(1, p.steps + 1) if s % 50 == 0 or s == p.steps]
        assert cur["tokens"] == [s * cfg.tokens_per_step for s in cur["step"]]
        assert cur["lr"] == [rse.schedule_of(cfg, p.warmup_steps).lr(s - 1, p.steps, p.peak_lr) for s in cur["step"]]
        assert cur["eval_step"][1:-1] == [s for s in range(250, p.steps, 250)]
        assert abs(cur["train_loss"][-1] - e["final_val_loss"]) < 0.1        # settles on the final loss
        assert max(cur["train_loss"][:3]) > e["final_val_loss"] + 0.1         # ...from above
    # 3 points per sweep: the runner fits a x^-b, whose b estimates the true law's log-log slope
    for sweep in ("params", "data"):
        assert res["fits"][sweep]["form"] == "two_parameter"
        assert res["fits"][sweep]["b"] == pytest.approx(res["true_law"]["sweeps"][sweep]["loglog_slope"], abs=0.02)
    assert "true vs recovered" in r.stdout and "log-log slope" in r.stdout
    table = {line.split()[0]: line.split() for line in r.stdout.splitlines()
             if line.strip().startswith(("params ", "data ")) and "_parameter" in line}
    assert table["params"][2] == "0.3480" and table["data"][2] == "0.3660"    # true exponents, printed
    assert float(table["params"][3]) == pytest.approx(res["fits"]["params"]["b"], abs=5e-5)
    assert (out / "scaling_laws_complete.png").stat().st_size > 20_000


def test_noiseless_demo_is_the_law_and_the_fit_recovers_it(tmp_path):
    res = run_demo(tmp_path, "--mode", "standard", "--noise", "0")
    n_params, d_params = sweep_xs(res, "params"), {p["D"] for p in sweep_points(res, "params")}
    d_data, n_data = sweep_xs(res, "data"), {p["N_nonembedding"] for p in sweep_points(res, "data")}
    (d_fixed,), (n_fixed,) = d_params, n_data
    finals = {s: np.array([p["loss"] for p in sweep_points(res, s)]) for s in ("params", "data")}
    np.testing.assert_allclose(finals["params"], E + A / n_params ** ALPHA + B / d_fixed ** BETA, rtol=1e-12)
    np.testing.assert_allclose(finals["data"], E + A / n_fixed ** ALPHA + B / d_data ** BETA, rtol=1e-12)
    fits = res["fits"]
    assert fits["params"]["form"] == fits["data"]["form"] == "three_parameter"
    assert fits["params"]["b"] == pytest.approx(ALPHA, rel=1e-3)
    assert fits["params"]["c"] == pytest.approx(E + B / d_fixed ** BETA, rel=1e-3)
    assert fits["data"]["b"] == pytest.approx(BETA, rel=1e-3)
    assert fits["data"]["c"] == pytest.approx(E + A / n_fixed ** ALPHA, rel=1e-3)


def test_kaplan_law_and_how_its_sweeps_are_simulated(tmp_path, capsys):
    res = run_demo(tmp_path, "--law", "kaplan", "--noise", "0")
    np.testing.assert_allclose([p["loss"] for p in sweep_points(res, "params")],
                               (KAPLAN_N / sweep_xs(res, "params")) ** KAPLAN_ALPHA_N, rtol=1e-12)
    np.testing.assert_allclose([p["loss"] for p in sweep_points(res, "data")],
                               (KAPLAN_D / sweep_xs(res, "data")) ** KAPLAN_ALPHA_D, rtol=1e-12)
    # pure power laws: the c = 0 fit of 3 points is the right form and recovers the exponents
    assert res["fits"]["params"]["b"] == pytest.approx(KAPLAN_ALPHA_N, rel=1e-3)
    assert res["fits"]["data"]["b"] == pytest.approx(KAPLAN_ALPHA_D, rel=1e-3)
    out = capsys.readouterr().out
    assert "trained to convergence" in out and "data is the limit" in out


def test_demo_recovers_true_exponents_within_tolerance(standard_demo):
    """Tolerance: 3 standard errors from the Fisher information at the true law (computed here, not by
    the fitting code). Over 40 seeds the fit's errors measured 1.0 (params) and 1.35 (data) of these
    standard errors, so 3 holds for any typical draw and fails for a biased fit or a wrong truth."""
    res, records = standard_demo
    noise = res["true_law"]["noise"]["noise"]
    assert noise == demo.DEFAULT_NOISE == 0.01
    for sweep, (b_true, d_or_n) in (("params", (ALPHA, "tokens")), ("data", (BETA, "n_params_nonembedding"))):
        xs = sweep_xs(res, sweep)
        runs = [e for e in records if rse.SWEEP_ROLE[sweep] in e["roles"]]
        fixed = runs[0][d_or_n]
        a_true = A if sweep == "params" else B
        c_true = E + (B / fixed ** BETA if sweep == "params" else A / fixed ** ALPHA)
        # the noise is there and about as large as asked: 5 draws of log(final / law)
        scatter = np.std([math.log(e["final_val_loss"] / e["true_loss"]) for e in runs])
        assert 0.3 * noise < scatter < 2.5 * noise
        se_a, se_b, se_c = fisher_se(xs, a_true, b_true, c_true, noise)
        fit = res["fits"][sweep]
        assert fit["form"] == "three_parameter"
        assert abs(fit["b"] - b_true) < 3 * se_b, (sweep, fit["b"], b_true, se_b)
        assert abs(fit["c"] - c_true) < 3 * se_c, (sweep, fit["c"], c_true, se_c)
        assert se_b < 0.5 * b_true          # the tolerance itself is informative


def test_demo_recovers_true_exponents_within_its_own_intervals(standard_demo):
    fits = standard_demo[0]["fits"]
    if not all("ci95" in fits[s] for s in ("params", "data")):
        pytest.skip("this branch's fits record no ci95 yet; the interval check activates when they do")
    for sweep, b_true in (("params", ALPHA), ("data", BETA)):
        lo, hi = fits[sweep]["ci95"]["b"]
        assert lo <= b_true <= hi, (sweep, lo, b_true, hi)
        assert lo < fits[sweep]["b"] < hi


def test_demo_refuses_a_law_far_outside_its_range(tmp_path, capsys):
    # Chinchilla's law gives tiny's 25K-parameter model a loss of 26 nats, above ln(2048) = 7.6
    assert demo.main(["--mode", "tiny", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--law kaplan" in err[0]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------------

SWEEP_KEYS = {"x", "sim", "real", "exponent", "constants", "r2", "predictions", "verdict"}
SIDE_KEYS = {"sim", "real", "difference", "sim_ci95", "real_ci95", "intervals_overlap"}
FIT_KEYS = {"available", "reason", "law", "form", "note", "a", "b", "c", "r2", "n_points", "ci95", "x_range"}


def test_comparing_a_demo_with_itself_reports_zero_differences(quick_demo, tmp_path):
    folder, res = quick_demo
    out = tmp_path / "cmp"
    # a folder on one side, the file on the other
    assert cmp.main(["--sim", str(folder), "--real", str(folder / "results.json"), "--output-dir", str(out)]) == 0
    report = json.loads((out / "comparison_report.json").read_text())
    assert report["same_mode"] is True and report["same_corpus"] is True and report["notes"] == []
    for sweep, c in report["sweeps"].items():
        assert c["exponent"]["sim"] == res["fits"][sweep]["b"]
        rows = [c["exponent"], c["constants"]["a"], c["constants"]["c"], c["r2"], *c["predictions"]]
        assert all(row["difference"] == 0 for row in rows)
        has_ci = "ci95" in res["fits"][sweep]
        assert c["exponent"]["intervals_overlap"] == (True if has_ci else "unknown")
        assert c["verdict"].startswith("identical")
        assert len(c["predictions"]) == 3
    assert (out / "quick_vs_real_comparison.png").stat().st_size > 20_000


def test_comparing_a_demo_with_a_real_run_writes_every_field(quick_demo, real_run, tmp_path):
    folder, sim = quick_demo
    out = tmp_path / "cmp"
    r = run_cli(["--sim", folder, "--real", real_run, "--output-dir", out], tmp_path,
                script=ROOT / "compare_quick_vs_real.py")
    assert r.returncode == 0, r.stderr[-2000:]
    real = json.loads((real_run / "results.json").read_text())
    report = json.loads((out / "comparison_report.json").read_text())
    assert set(report) == {"sim", "real", "same_mode", "same_corpus", "notes", "difference_convention",
                           "sweeps", "other_fits"}
    assert report["sim"]["simulated"] is True and report["real"]["simulated"] is False
    assert report["sim"]["mode"] == "quick" and report["real"]["mode"] == "tiny"
    assert report["same_mode"] is False and report["same_corpus"] is False
    assert any("different modes (quick vs tiny)" in n for n in report["notes"])
    assert any("different data" in n for n in report["notes"])
    for sweep in ("params", "data"):
        c = report["sweeps"][sweep]
        assert set(c) == SWEEP_KEYS
        assert set(c["sim"]) == set(c["real"]) == FIT_KEYS
        assert set(c["exponent"]) == SIDE_KEYS and set(c["constants"]) == {"a", "c"}
        assert all(set(v) == SIDE_KEYS for v in c["constants"].values())
        assert set(c["r2"]) == {"sim", "real", "difference"}
        # differences are real minus sim, from the two files' own fits
        assert c["exponent"]["difference"] == pytest.approx(real["fits"][sweep]["b"] - sim["fits"][sweep]["b"])
        assert c["constants"]["a"]["difference"] == pytest.approx(real["fits"][sweep]["a"] - sim["fits"][sweep]["a"])
        assert c["real"]["n_points"] == 2 and c["sim"]["n_points"] == 3
        assert c["real"]["x_range"] == sorted(sweep_xs(real, sweep).tolist())
        var = "N" if sweep == "params" else "D"
        assert [p["name"] for p in c["predictions"]] == [m[0] for m in rse.REFERENCE_MODELS[sweep]]
        for p in c["predictions"]:
            assert set(p) == SIDE_KEYS | {"name", var}
            want = {q["name"]: q["predicted_loss"] for q in real["predictions"]}[p["name"]]
            assert p["real"] == want and p["difference"] == pytest.approx(want - p["sim"])
        both_ci = (cmp.interval(real["fits"][sweep], "b") is not None
                   and cmp.interval(sim["fits"][sweep], "b") is not None)
        assert (c["exponent"]["intervals_overlap"] in (True, False)) == both_ci
    assert "params" in r.stdout and "overlap" in r.stdout and "note: different modes" in r.stdout
    assert (out / "quick_vs_real_comparison.png").stat().st_size > 20_000


def test_without_a_demo_the_comparison_simulates_the_real_runs_mode(real_run, tmp_path):
    r = run_cli(["--real", real_run, "--output-dir", tmp_path / "cmp"], tmp_path,
                script=ROOT / "compare_quick_vs_real.py")
    assert r.returncode == 0, r.stderr[-2000:]
    said = [line for line in r.stdout.splitlines() if line.startswith("sim: no results")]
    assert said == ["sim: no results at scaling_results_demo/results.json; simulated mode 'tiny' under the "
                    "kaplan law there (as `python quick_scaling_demo.py --mode tiny --law kaplan --output-dir "
                    "scaling_results_demo` would)"]
    sim = json.loads((tmp_path / "scaling_results_demo" / "results.json").read_text())
    # tiny's own plan (a WSD grid: 5 sizes, 3 of them to 8M tokens and 2 to 4M, the 25K model's row also
    # the data sweep), not the real run's reduced one, under Kaplan's law (Chinchilla's gives tiny's small
    # models a loss above ln 512), fitted by the runner
    assert sim["simulated"] is True and sim["mode"] == "tiny" and sim["true_law"]["name"] == "kaplan"
    points = sim["points"]
    assert [p["N_nonembedding"] for p in points if p["branch_of"] is None] == [
        rse.n_params_nonembedding(2, d) for d in (32, 48, 64, 96, 128)]
    assert sum(p["branch_of"] is not None for p in points) == 16 and len(points) == 21
    assert [p["D"] for p in points if rse.ROLE_D in p["roles"]] == [
        s * 2048 for s in (488, 690, 976, 1380, 1952, 2760, 3904)]
    # L(N) is every size at 4M tokens: the branches of the longer rows and the stable runs of the others
    assert [p["D"] for p in points if rse.ROLE_N in p["roles"]] == [1952 * 2048] * 5
    assert sim["fits"]["params"]["n_points"] == 5 and sim["fits"]["data"]["n_points"] == 7
    assert (tmp_path / "scaling_results_demo" / "scaling_laws_complete.png").exists()
    report = json.loads((tmp_path / "cmp" / "comparison_report.json").read_text())
    assert report["same_mode"] is True and report["sim"]["simulated"] is True
    assert report["sim"]["path"] == "scaling_results_demo/results.json"
    assert report["sweeps"]["params"]["exponent"]["sim"] == sim["fits"]["params"]["b"]
    # a second comparison reads the simulation it left instead of making another
    r = run_cli(["--real", real_run, "--output-dir", tmp_path / "cmp2"], tmp_path,
                script=ROOT / "compare_quick_vs_real.py")
    assert r.returncode == 0 and "sim: no results" not in r.stdout


def test_comparison_uses_intervals_when_present(quick_demo):
    _, sim = quick_demo
    real = copy.deepcopy(sim)
    b = sim["fits"]["params"]["b"]
    for res, half in ((sim, 0.01), (real, 0.01)):
        res["fits"]["params"]["ci95"] = {"a": None, "b": [b - half, b + half], "c": None}
    real["fits"]["params"]["b"] = b + 0.05
    real["fits"]["params"]["ci95"]["b"] = [b + 0.04, b + 0.06]            # disjoint from [b-.01, b+.01]
    real["predictions"][0]["predicted_loss_ci95"] = [1.0, 2.0]
    sim["predictions"][0]["predicted_loss_ci95"] = [1.5, 3.0]
    report = cmp.compare(sim, real)
    e = report["sweeps"]["params"]["exponent"]
    assert e["intervals_overlap"] is False and e["difference"] == pytest.approx(0.05)
    assert e["real_ci95"] == [b + 0.04, b + 0.06]
    assert "do not overlap" in report["sweeps"]["params"]["verdict"]
    assert report["sweeps"]["params"]["predictions"][0]["intervals_overlap"] is True
    assert report["sweeps"]["params"]["constants"]["a"]["intervals_overlap"] == "unknown"   # a has none
    assert report["sweeps"]["data"]["exponent"]["intervals_overlap"] == (
        True if "ci95" in sim["fits"]["data"] else "unknown")
    real["fits"]["params"]["ci95"]["b"] = [b + 0.005, b + 0.06]           # now they overlap
    assert cmp.compare(sim, real)["sweeps"]["params"]["exponent"]["intervals_overlap"] is True


@pytest.mark.parametrize("args,needle", [
    ([], "--real: no results at scaling_results_quick_v2/results.json; create them with "
         "`python run_scaling_experiments_enhanced.py --mode quick`"),
    (["--sim", "missing-sim"], "create them with `python run_scaling_experiments_enhanced.py --mode quick`"),
    (["--sim", "SIM"], "create them with `python run_scaling_experiments_enhanced.py --mode quick`"),
    (["--sim", "SIM", "--real", "runs/scaling_results_tiny_v2"],
     "`python run_scaling_experiments_enhanced.py --mode tiny --output-dir runs/scaling_results_tiny_v2`"),
])
def test_missing_input_is_one_line_naming_the_command(quick_demo, tmp_path, args, needle):
    args = [str(quick_demo[0]) if a == "SIM" else a for a in args]
    r = run_cli([*args, "--output-dir", tmp_path / "cmp"], tmp_path, script=ROOT / "compare_quick_vs_real.py")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "cmp").exists()

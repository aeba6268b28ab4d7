"""--lr-sweep: the plan, the parabola in log LR and its interval, the rule's warning, the real CLI."""
import dataclasses
import json
import math

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import run_cli, run_records

MULTS = np.array([0.5, 0.7, 1.0, 1.4, 2.0])
RULE = 5e-3


def parabola_losses(optimum_lr, curvature=0.1, noise=(0.0,) * 5):
    """3 + curvature (ln LR - ln optimum)^2 at the rule's five multiples, plus fixed noise."""
    lrs = RULE * MULTS
    return lrs, 3.0 + curvature * np.log(lrs / optimum_lr) ** 2 + np.array(noise)


def test_parabola_recovers_a_known_optimum():
    lrs, losses = parabola_losses(6e-3)
    fit = rse.fit_lr_parabola(lrs, losses)
    assert fit["optimum_lr"] == pytest.approx(6e-3, rel=1e-9)
    assert fit["loss_at_optimum"] == pytest.approx(3.0, abs=1e-12)
    assert fit["coef"][0] == pytest.approx(0.1, rel=1e-9)          # curvature, nats per (ln LR)^2
    assert fit["edge"] is None and fit["residual_std"] == pytest.approx(0.0, abs=1e-9)
    assert fit["optimum_lr_ci95"] == pytest.approx([6e-3, 6e-3], rel=1e-6)   # exact points: no width

    lrs, losses = parabola_losses(6e-3, noise=(0.002, -0.002, 0.001, -0.001, 0.002))
    fit = rse.fit_lr_parabola(lrs, losses)
    lo, hi = fit["optimum_lr_ci95"]
    assert fit["optimum_lr"] == pytest.approx(6e-3, rel=0.05)
    assert lo < 6e-3 < hi and hi / lo < 1.6                      # bounded, and it holds the truth
    assert lrs[0] < lo and hi < lrs[-1]
    ratio = rse.optimum_over_rule(fit, RULE)
    assert ratio["optimum_over_rule"] == pytest.approx(1.2, rel=0.05)
    assert ratio["optimum_over_rule_ci95"] == pytest.approx([lo / RULE, hi / RULE])


def test_optimum_at_the_edge_is_open():
    lrs, losses = parabola_losses(3e-2)                          # 6x the rule: loss falls across the range
    fit = rse.fit_lr_parabola(lrs, losses)
    assert fit["available"] and fit["optimum_lr"] is None and fit["edge"] == "above"
    assert "above the tried range" in fit["reason"]
    assert rse.optimum_over_rule(fit, RULE)["optimum_over_rule_ci95"] == pytest.approx([2.0, None])
    fit = rse.fit_lr_parabola(*parabola_losses(5e-4))           # 0.1x: below
    assert fit["edge"] == "below" and fit["optimum_lr"] is None
    assert rse.optimum_over_rule(fit, RULE)["optimum_over_rule_ci95"] == [None, pytest.approx(0.5)]
    lrs = RULE * MULTS              # opens downward (its top at 0.8x): the lower-loss edge is the top one
    fit = rse.fit_lr_parabola(lrs, 3.0 - 0.1 * np.log(lrs / 4e-3) ** 2)
    assert fit["optimum_lr"] is None and fit["edge"] == "above" and "opens downward" in fit["reason"]
    # an optimum inside the range whose interval runs past it: that side is unbounded, not clipped
    lrs, losses = parabola_losses(9e-3, curvature=0.02, noise=(0.004, -0.004, 0.003, -0.003, 0.004))
    fit = rse.fit_lr_parabola(lrs, losses)
    assert fit["optimum_lr"] is not None and fit["optimum_lr_ci95"][1] is None
    assert fit["optimum_lr_ci95"][0] > lrs[0]


def size_row(ratio=None, edge=None, ci=None):
    return {"n_params_nonembedding": 25_472, "d_model": 32, "rule_lr": RULE, "optimum_over_rule": ratio,
            "optimum_over_rule_ci95": ci, "edge": edge}


def test_warning_past_1_3x_and_not_at_1_2x():
    assert rse.lr_rule_warnings([size_row(1.2), size_row(1 / 1.2), size_row(1.29)]) == []
    (line,) = rse.lr_rule_warnings([size_row(1.35)])
    assert "1.35x off at 25.5K" in line and "higher than the rule's 0.005" in line
    (line,) = rse.lr_rule_warnings([size_row(1 / 1.4)])
    assert "1.40x off" in line and "lower" in line
    (line,) = rse.lr_rule_warnings([size_row(edge="above", ci=[2.0, None])])
    assert "at least 2.00x off" in line and "higher" in line
    assert rse.lr_rule_warnings([size_row(edge="above", ci=[1.2, None])]) == []      # edge at 1.2x tried
    assert rse.lr_rule_warnings([size_row()]) == []                                    # fit unavailable


def test_tiny_plan_is_every_size_at_the_first_horizon():
    args = rse.build_parser().parse_args(["--mode", "tiny", "--lr-sweep"])
    cfg, preset = rse.config_from_args(args)
    assert cfg.output_dir == "scaling_results_tiny_lrsweep" and cfg.lr_multipliers == list(MULTS)
    plan = rse.build_plan(cfg, preset)
    assert len(plan) == 25 and {e.steps for e in plan} == {488} and {e.warmup_steps for e in plan} == {39}
    assert [e.peak_lr for e in plan[:5]] == pytest.approx(list(0.3 / 32 * MULTS))     # 0.3/d, no cap in tiny
    assert [e.peak_lr for e in plan[-5:]] == pytest.approx(list(0.3 / 128 * MULTS))
    ladder = rse.build_plan(dataclasses.replace(cfg, lr_multipliers=None), preset)
    stable = next(e for e in ladder if e.name == "params-N25K")
    assert rse.init_seed(plan[0]) == rse.init_seed(stable)                # the ladder run's init and batches
    assert rse.data_stream_seed(plan[4]) == rse.data_stream_seed(stable)


@pytest.mark.parametrize("args,needle", [
    (["--lr-multipliers", "1,2"], "add --lr-sweep"),
    (["--lr-sweep", "--lr-multipliers", "1,2"], "at least three"),
    (["--lr-sweep", "--lr-multipliers", "1,x,2"], "comma-separated numbers"),
    (["--lr-sweep", "--validate"], "run them separately"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, needle):
    assert rse.main(["--mode", "tiny", *args, "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def common_args(corpus_file, cache_dir):
    """A seconds-sized tiny plan: the 25K model, 40 steps with a branch at 20, its data sweep the same row."""
    return ["--mode", "tiny", "--param-sizes", "25K", "--max-steps", "40", "--horizons", "0.5x,1x",
            "--data-sizes", "40960,81920", "--eval-batches", "2", "--eval-interval", "20", "--device", "cpu",
            "--parallel", "1", "--no-estimate", "--data", str(corpus_file), "--cache-dir", str(cache_dir)]


def test_cli_writes_results_and_figure_and_resumes(tmp_path, corpus_file, cache_dir):
    out = tmp_path / "lr"
    args = [*common_args(corpus_file, cache_dir), "--lr-sweep", "--lr-multipliers", "0.5,1,2", "--output-dir", out]
    r = run_cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    sweep = res["lr_sweep"]
    assert sweep["horizon_steps"] == 20 and sweep["multipliers"] == [0.5, 1.0, 2.0]
    assert [p["multiplier"] for p in sweep["points"]] == [0.5, 1.0, 2.0]
    assert all(p["status"] == "completed" and p["final_val_loss"] < math.log(512) for p in sweep["points"])
    (size,) = sweep["sizes"]
    assert size["d_model"] == 32 and size["rule_lr"] == size["uncapped_rule_lr"] == pytest.approx(0.3 / 32)
    assert "lr sweep: final validation loss" in r.stdout and "optimum LR [95%]" in r.stdout
    assert (out / "lr_sweep.png").stat().st_size > 20_000
    assert not (out / "scaling_laws_complete.png").exists()
    again = run_cli(args, tmp_path)                 # the same command again trains nothing
    assert again.returncode == 0 and "resume: 3 of 3 runs finished earlier" in again.stdout


def test_the_1x_run_is_the_ladders_branch(tmp_path, corpus_file, cache_dir):
    # in-process, to stay seconds-sized: the ladder's branch at the sweep's horizon is the same computation
    common = common_args(corpus_file, cache_dir)
    assert rse.main([*common, "--lr-sweep", "--lr-multipliers", "0.7,1,1.4", "--output-dir", str(tmp_path / "lr")]) == 0
    assert rse.main([*common, "--output-dir", str(tmp_path / "ladder")]) == 0
    sweep = json.loads((tmp_path / "lr" / "results.json").read_text())["lr_sweep"]
    branch = next(e for e in run_records(tmp_path / "ladder") if e["steps"] == 20)
    one_x = next(p for p in sweep["points"] if p["multiplier"] == 1.0)
    assert one_x["final_val_loss"] == pytest.approx(branch["final_val_loss"], abs=1e-6)
    assert one_x["peak_lr"] == branch["peak_lr"]

"""Two recipes (issue 26): --arch llama, the demo's --compute-multiplier, and the effective-compute
multiplier of compare_quick_vs_real.py --a/--b checked against known answers."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import compare_quick_vs_real as cmp
import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse
from conftest import SECONDS_SIZED, run_cli, run_records

# tiny's design under the demo's tiny law, written out here so a wrong constant in the demo fails
E, A, B, ALPHA, BETA = 1.90, 20.9, 609.0, 0.317, 0.471
TINY = ["--mode", "tiny"]
BOOT = 200                       # bootstrap draws per study in the fast tests


# The project's noise model on tiny's design (docs/fits.md, "Coverage, measured"): 0.4% in log-loss
# shared by a row's runs (a stable run and its cooldown branches share one seed's luck), 0.2% per run
ROW_MODEL = {"noise": 0.002, "row_noise": 0.004}


def simulated(law="tiny", multiplier=1.0, seed=0, noise=demo.DEFAULT_NOISE, constants=None, monkeypatch=None,
              row_noise=0.0):
    """A finished simulated study of tiny's plan as a results dict (fits: the joint law only)."""
    if constants is not None:
        monkeypatch.setitem(demo.JOINT_LAWS, law, constants)
    res, _ = demo.simulated_study(TINY, law, noise, seed, Path("unused"), multiplier, row_noise)
    res["fits"] = {"joint": {"available": True}}        # load_study refits the joint law itself
    return res


def study(res, label, seed, n_boot=BOOT):
    return cmp.study_from_results(res, Path(f"{label}.json"), label, n_boot, seed)


def report_of(base, variant, n_boot=BOOT):
    return cmp.compare_recipes(study(base, "a", rse.BOOTSTRAP_SEED, n_boot),
                               study(variant, "b", rse.BOOTSTRAP_SEED + 1, n_boot))


def true_multiplier(base, variant, flops):
    """k(C) from the closed form under C = 6 N D, independent of the comparison's numerical frontier:
    L*(C) - E is R * C^-g exactly, so C_base(L) = (R_base / (L - E_base))^(1/g_base)."""
    def frontier(k, c):
        return rse.compute_optimal_allocation(k["E"], k["A"], k["B"], k["alpha"], k["beta"], c)[2].item()
    lv = frontier(variant, flops)
    g = base["alpha"] * base["beta"] / (base["alpha"] + base["beta"])
    r = frontier(base, 1.0) - base["E"]
    return (r / (lv - base["E"])) ** (1 / g) / flops


# ---------------------------------------------------------------------------------------------------
# the demo: a known multiplier, and the data sweep of a grid
# ---------------------------------------------------------------------------------------------------

def test_compute_multiplier_law_is_exactly_k_times_more_efficient():
    k = demo.multiplied_law(demo.TINY, 3.0)
    assert demo.TINY == {"E": E, "A": A, "B": B, "alpha": ALPHA, "beta": BETA}
    s = 3.0 ** (-ALPHA * BETA / (ALPHA + BETA))
    assert (k["A"], k["B"]) == pytest.approx((A * s, B * s), rel=1e-12)
    for c in (1e9, 1e13, 1e18, 1e24):
        assert true_multiplier(demo.TINY, k, c) == pytest.approx(3.0, rel=1e-9)


def test_demo_tiny_kaplan_data_sweep_falls(tmp_path):
    """Issue 24's bug: the data sweep (the 25K row) got Kaplan's L(N), flat in D."""
    assert demo.main(["--mode", "tiny", "--law", "kaplan", "--noise", "0", "--output-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    row = sorted((p["D"], p["loss"]) for p in res["points"] if rse.SWEEP_ROLE["data"] in p["roles"])
    assert len(row) == 7
    losses = [loss for _, loss in row]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[0] - losses[-1] > 0.3                       # 5.74 -> 5.38 nats from 1M to 8M tokens
    # every run is Kaplan's L(N, D) at its own N and D (eq. 1.5), checked against the formula here
    for p in res["points"]:
        want = ((8.8e13 / p["N_nonembedding"]) ** (0.076 / 0.095) + 5.4e13 / p["D"]) ** 0.095
        assert p["loss"] == pytest.approx(want, rel=1e-12)
    assert res["true_law"]["sweeps"]["data"]["b"] > 0


def test_demo_row_noise_is_shared_by_a_rows_runs():
    """--row-noise: one offset per row (a stable run and its branches), on top of each run's own."""
    res, recs = demo.simulated_study(TINY, "tiny", 0.0, 3, Path("unused"), 1.0, 0.004)
    offsets = {}
    for p, r in zip(res["points"], recs):
        offsets.setdefault(p["branch_of"] or p["name"], set()).add(round(math.log(p["loss"] / r["true_loss"]), 12))
    assert len(offsets) == 5 and all(len(v) == 1 for v in offsets.values())          # shared within a row
    sizes = [next(iter(v)) for v in offsets.values()]
    assert len(set(sizes)) == 5 and 0.0005 < np.std(sizes) < 0.02                      # and drawn per row
    assert res["true_law"]["noise"]["row_noise"] == 0.004 and "per row" in res["true_law"]["noise"]["kind"]
    # without it, each run's own draw exactly as before (z from the seed's stream [seed, 0], plan order)
    plain, recs = demo.simulated_study(TINY, "tiny", 0.01, 3, Path("unused"))
    z = np.random.default_rng([3, 0]).standard_normal(len(recs))
    assert [p["loss"] for p in plain["points"]] == [r["true_loss"] * math.exp(0.01 * zi) for r, zi in zip(recs, z)]


def test_demo_multiplier_needs_a_joint_law(tmp_path, capsys):
    assert demo.main(["--law", "kaplan", "--compute-multiplier", "2", "--output-dir", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# the multiplier: known answers
# ---------------------------------------------------------------------------------------------------

def test_noiseless_k2_is_recovered_exactly_at_every_budget():
    rep = report_of(simulated(noise=0), simulated(multiplier=2.0, seed=1, noise=0), n_boot=20)
    for key, m in rep["multiplier"].items():
        assert m["k"] == pytest.approx(2.0, rel=1e-4), key
    assert rep["multiplier"]["at_1e18_flops"]["extrapolation"] and rep["multiplier"]["at_1e21_flops"]["extrapolation"]
    assert not rep["multiplier"]["at_largest_common_budget"]["extrapolation"]
    assert not rep["exponents"]["differ"] and rep["crossover"] is None
    assert rep["rungs"]["n_common"] == 21 and rep["rungs"]["rank_stable"] is True
    # both laws come from one fit with a shared E: the floor and each recipe's constants exactly
    shared = rep["shared_fit"]
    assert rep["fit"] == "joint fit with shared E" and shared["E"] == pytest.approx(E, rel=1e-9)
    assert shared["E_ci95"] == pytest.approx([E, E], rel=1e-9) and shared["dof"] == 42 - 9
    s = 2.0 ** (-ALPHA * BETA / (ALPHA + BETA))
    for role, f in (("baseline", 1.0), ("variant", s)):
        law = shared["laws"][role]
        assert [law[k] for k in ("A", "B", "alpha", "beta")] == pytest.approx([A * f, B * f, ALPHA, BETA], rel=1e-6)


def test_k2_interval_contains_2_and_excludes_1():
    rep = report_of(simulated(seed=0), simulated(multiplier=2.0, seed=1))
    lo, hi = rep["multiplier"]["at_largest_common_budget"]["ci95"]
    assert lo <= 2.0 <= hi and lo > 1.0, (lo, hi)
    e_lo, e_hi = rep["shared_fit"]["E_ci95"]
    own = study(simulated(seed=0), "a", rse.BOOTSTRAP_SEED).joint["ci95"]["E"]
    # one floor fitted to both studies is pinned down better than the baseline's alone (1.55-2.17 against
    # 1.33-2.41 with the demo's runs resampled by row, as the runner's are)
    assert e_lo <= E <= e_hi and e_hi - e_lo < 0.7 * (own[1] - own[0]), (e_lo, e_hi, own)


def test_two_seeds_of_one_recipe_give_an_interval_containing_1():
    rep = report_of(simulated(seed=0), simulated(seed=1))
    lo, hi = rep["multiplier"]["at_largest_common_budget"]["ci95"]
    assert lo <= 1.0 <= hi, (lo, hi)


def test_unequal_exponents_give_the_k_of_the_laws(monkeypatch):
    steeper = {"E": E, "A": A, "B": B, "alpha": 0.36, "beta": 0.53}
    base = simulated(noise=0)
    variant = simulated(noise=0, seed=1, constants=steeper, monkeypatch=monkeypatch)
    rep = report_of(base, variant, n_boot=20)
    ks = []
    for key, m in rep["multiplier"].items():
        assert m["k"] == pytest.approx(true_multiplier(demo.TINY, steeper, m["flops"]), rel=1e-3), key
        ks.append((m["flops"], m["k"]))
    ks.sort()
    assert all(b[1] > a[1] for a, b in zip(ks, ks[1:]))       # a steeper frontier: k grows with C
    assert ks[-1][1] > 10 * ks[0][1]
    assert rep["exponents"]["frontier_exponent_difference"] > 0
    assert rep["exponents"]["log10_k_per_decade"] > 0


# ---------------------------------------------------------------------------------------------------
# the CLI: a report scripts can read, and one line and exit 2 for every input it cannot compare
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for name, args in (("base", []), ("variant", ["--compute-multiplier", "2", "--seed", "1"])):
        assert demo.main(["--mode", "tiny", "--law", "tiny", *args, "--output-dir", str(root / name)]) == 0
    return root


def test_cli_writes_report_and_figure(pair, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cmp.main(["--a", str(pair / "base"), "--b", str(pair / "variant" / "results.json"),
                     "--bootstrap", "100", "--output-dir", str(out)]) == 0
    rep = json.loads((out / "comparison_report.json").read_text())
    m = rep["multiplier"]["at_largest_common_budget"]
    assert set(m) >= {"flops", "k", "ci95"} and m["flops"] == pytest.approx(rep["measured_common_range"][1])
    assert {"at_smallest_common_budget", "at_1e18_flops", "at_1e21_flops"} <= set(rep["multiplier"])
    assert (out / "recipe_comparison.png").stat().st_size > 20_000
    log = capsys.readouterr().out
    assert "at_largest_common_budget" in log and "(extrapolation)" in log and "rank stability" in log


def edited(pair, tmp_path, name, edit):
    res = json.loads((pair / name / "results.json").read_text())
    edit(res)
    path = tmp_path / f"{name}-edited.json"
    path.write_text(json.dumps(res))
    return path


def set_status(res):
    res["points"][3]["status"] = "interrupted"


def no_joint(res):
    res["fits"]["joint"] = {"available": False, "reason": "needs 3 distinct N"}


def other_corpus(res):
    res["environment"]["corpus"]["name"] = "English text"


def far_tokens(res):
    for p in res["points"]:
        p["D"] *= 10**6
        p["flops"] *= 10**6


@pytest.mark.parametrize("which,edit,needle", [
    ("missing", None, "no results at"),
    ("variant", set_status, "unfinished"),
    ("variant", no_joint, "no joint law"),
    ("variant", other_corpus, "different corpora"),
    ("variant", far_tokens, "no overlapping budgets"),
])
def test_bad_inputs_are_one_line_and_exit_2(pair, tmp_path, capsys, which, edit, needle):
    b = tmp_path / "nowhere" if which == "missing" else edited(pair, tmp_path, which, edit)
    assert cmp.main(["--a", str(pair / "base"), "--b", str(b), "--bootstrap", "20",
                     "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# --arch llama
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d_model", [32, 48, 96, 128])
def test_llama_counts_match_the_model_and_keep_12_d2_per_block(d_model):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = rse.GPT(rse.GPTConfig(512, 32, 2, d_model, d_model // 16, "llama"))
    nonemb, total = model.count_params()
    h = round(8 * d_model / 3)
    assert nonemb == rse.n_params_nonembedding(2, d_model, "llama") == 2 * (4 * d_model**2 + 3 * d_model * h
                                                                            + 2 * d_model) + d_model
    assert total == rse.n_params_total(2, d_model, 512, 32, "llama") == nonemb + 512 * d_model   # no positions
    assert abs(3 * d_model * h - 8 * d_model**2) <= 2 * d_model        # SwiGLU: 8 d^2 up to rounding h
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert rse.flops_per_token(2, d_model, 512, 32, "llama") == 6 * (2 * (4 * d_model**2 + 3 * d_model * h)
                                                                      + 512 * d_model) + 12 * 2 * d_model * 32
    idx, targets = torch.randint(0, 512, (2, 8, 32))
    assert abs(model(idx, targets).item() - math.log(512)) < 0.05     # starts near uniform, as gpt2 does


def test_rotary_scores_depend_on_relative_position_only():
    torch = pytest.importorskip("torch")
    cos, sin = rse.rotary_tables(32, 16)
    q, k = torch.randn(16), torch.randn(16)
    at = lambda x, pos: rse.apply_rotary(x[None, None, None], cos[pos], sin[pos])[0, 0, 0]   # noqa: E731
    score = lambda m, n: float(at(q, m) @ at(k, n))                                          # noqa: E731
    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    assert float(at(q, 9).norm()) == pytest.approx(float(q.norm()), rel=1e-5)      # a rotation


def test_default_folders_differ_by_arch():
    assert rse.default_output_dir("tiny", "gpt2") == "scaling_results_tiny_v2"
    assert rse.default_output_dir("tiny", "llama") == "scaling_results_tiny_llama_v2"
    cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny", "--arch", "llama"]))
    assert cfg.arch == "llama" and cfg.output_dir == "scaling_results_tiny_llama_v2"
    exp = rse.build_plan(cfg, rse.PRESETS["tiny"])[0]
    llama_def = rse.run_definition(exp, None)
    assert llama_def["arch"] == "llama"
    gpt2, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny"]))
    gpt2_def = rse.run_definition(rse.build_plan(gpt2, rse.PRESETS["tiny"])[0], None)
    # the same run under the other recipe: only the arch, hence the hash, tells them apart
    assert {k for k in llama_def.keys() | gpt2_def.keys() if llama_def.get(k) != gpt2_def.get(k)} == {"arch"}
    assert gpt2_def["arch"] == "gpt2"
    assert rse.definition_hash(llama_def) != rse.definition_hash(gpt2_def)


FAST = [*SECONDS_SIZED, "--param-sizes", "25K", "--data-sizes", "1K", "--max-steps", "10", "--eval-interval", "5",
        "--eval-batches", "1", "--batch-size", "4", "--context-length", "32", "--bootstrap", "20", "--device", "cpu"]
# 0cf71dd's code, this command on this corpus (tests/conftest.py make_text(12000)), CPU fp32, torch 2.13:
# final validation losses and definition hashes, recorded before --arch existed
GPT2_AT_0CF71DD = {"params-N25K-seed0": (4.9948835372924805, "778a4af0aa7c87d9"),
                   "data-D1K-seed0": (5.783034324645996, "34a3f78eff0b3338")}


def test_gpt2_is_bit_identical_and_llama_trains(tmp_path, corpus_file, cache_dir):
    runs = {}
    for arch in ("gpt2", "llama"):
        out = tmp_path / arch
        # --lr 5e-3: the LR both widths got from 0cf71dd's capped rule (tiny's cap has gone since)
        r = run_cli([*FAST, "--lr", "5e-3", "--arch", arch, "--data", corpus_file, "--cache-dir", cache_dir,
                     "--output-dir", out], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[arch] = {e["run_id"]: e for e in run_records(out)}
    # the losses must be 0cf71dd's bit for bit; the table's hashes are of 0cf71dd's definition format, not
    # this one's, so each record's hash is checked against its own definition instead
    got = {k: e["final_val_loss"] for k, e in runs["gpt2"].items()}
    assert got == {k: loss for k, (loss, _) in GPT2_AT_0CF71DD.items()}
    for e in runs["gpt2"].values():
        assert e["experiment_hash"] == rse.definition_hash(e["definition"])
    for run_id, e in runs["llama"].items():
        assert e["arch"] == "llama" and e["definition"]["arch"] == "llama"
        assert e["final_val_loss"] < e["initial_loss"] - 0.5
        assert e["n_params_nonembedding"] == rse.n_params_nonembedding(e["n_layer"], e["d_model"], "llama")
        assert e["experiment_hash"] != runs["gpt2"][run_id]["experiment_hash"]


# ---------------------------------------------------------------------------------------------------
# the rates behind the bar (minutes: RUN_SLOW=1 or -m slow)
# ---------------------------------------------------------------------------------------------------

N_SETS = 100
STEEPER = {"E": E, "A": A, "B": B, "alpha": 0.36, "beta": 0.53}


def interval_records(multiplier, n_sets, constants=None, monkeypatch=None, n_boot=200, noise=None):
    """(report, ci95 at the largest common budget) of n_sets independent pairs, seeds 2i and 2i + 1, under
    `noise` (the demo's noise and row_noise; default ROW_MODEL)."""
    noise = ROW_MODEL if noise is None else noise
    out = []
    for i in range(n_sets):
        base = simulated(seed=2 * i, **noise)         # before `constants` patch the demo's law for the variant
        variant = (simulated(seed=2 * i + 1, constants=constants, monkeypatch=monkeypatch, **noise) if constants
                   else simulated(multiplier=multiplier, seed=2 * i + 1, **noise))
        if constants:
            monkeypatch.undo()
        rep = report_of(base, variant, n_boot=n_boot)
        lo, hi = rep["multiplier"]["at_largest_common_budget"]["ci95"]
        out.append((rep, lo, math.inf if hi is None else hi))
    return out


def rates(n_sets, n_boot=200, noise=None, monkeypatch=None) -> dict:
    """Over n_sets pairs each: K = 2 held and 1 excluded, K = 1 held, the unequal exponents' k held (at
    the largest common budget)."""
    k2 = interval_records(2.0, n_sets, n_boot=n_boot, noise=noise)
    k1 = interval_records(1.0, n_sets, n_boot=n_boot, noise=noise)
    steep = interval_records(None, n_sets, constants=STEEPER, monkeypatch=monkeypatch, n_boot=n_boot, noise=noise)
    monkeypatch.undo()
    true_k = true_multiplier(demo.TINY, STEEPER, steep[0][0]["multiplier"]["at_largest_common_budget"]["flops"])
    return {"K=2 holds 2, excludes 1": sum(lo <= 2.0 <= hi and lo > 1.0 for _, lo, hi in k2),
            "K=2 holds 2": sum(lo <= 2.0 <= hi for _, lo, hi in k2),
            "K=1 holds 1": sum(lo <= 1.0 <= hi for _, lo, hi in k1),
            f"unequal exponents hold k = {true_k:.1f}": sum(lo <= true_k <= hi for _, lo, hi in steep)}


def test_rates_on_twelve_pairs_under_the_row_model(monkeypatch):
    """The fast version of the rates below: the first 12 pairs each (seeds 0-23), 100 draws; measured 9, 9,
    10 and 10 of 12 (the 100-set rates, with 200 draws: 93, 94, 92, 93). With the demo's independent 1% noise
    the row bootstrap over-covers and excludes 1 for K = 2 in about half the sets, which fails this."""
    got = rates(12, n_boot=100, monkeypatch=monkeypatch)
    print(got)
    assert all(v >= 9 for v in got.values()), got


@pytest.mark.slow
def test_rates_over_100_sets_under_the_row_model(monkeypatch):
    """The issue's bar on tiny's design under the project's noise model (ROW_MODEL): at least 88 of 100
    each. Measured (200 draws): docs/fits.md."""
    got = rates(N_SETS, monkeypatch=monkeypatch)
    print(got)
    assert min(v for k, v in got.items() if k != "K=2 holds 2") >= 88, got


@pytest.mark.slow
def test_rates_over_100_sets_under_the_demos_independent_noise(monkeypatch):
    """The demo's default (1% per run, independent): the row bootstrap assumes a row-shared part it cannot
    tell from the N term, so its intervals over-cover and exclude 1 for K = 2 only about half the time."""
    got = rates(N_SETS, noise={"noise": demo.DEFAULT_NOISE, "row_noise": 0.0}, monkeypatch=monkeypatch)
    print(got)
    assert got["K=1 holds 1"] >= 88 and got["K=2 holds 2"] >= 88


def test_real_flops_per_token_are_modelled_and_used_by_the_frontier():
    """Where records carry FLOPs per token (the runner's), the frontier minimises L at C = fpt(N) x D."""
    pts = [{"N": rse.n_params_nonembedding(2, d), "flops_per_token": rse.flops_per_token(2, d, 512, 32)}
           for d in (32, 48, 64, 96, 128)]
    ov = cmp.flops_overhead(pts)
    for p in pts:
        assert cmp.flops_per_token_of(p["N"], ov) == pytest.approx(p["flops_per_token"], rel=0.01)
    law = [np.array([v]) for v in (E, A, B, ALPHA, BETA)]
    loss, n_opt = cmp.frontier(law, np.log([1e13]), ov)
    n = np.exp(np.linspace(np.log(1e3), np.log(1e9), 200001))
    brute = E + A / n**ALPHA + B / (1e13 / cmp.flops_per_token_of(n, ov)) ** BETA
    assert loss[0, 0] == pytest.approx(brute.min(), rel=1e-6)
    assert n_opt[0, 0] == pytest.approx(n[brute.argmin()], rel=0.01)


def test_a_study_against_itself_is_a_tie_everywhere():
    """The numerical frontier's round-off (k = 1.00003) is no crossover and no rank flip."""
    res = simulated(seed=0)
    rep = report_of(res, res)
    for key, m in rep["multiplier"].items():
        assert m["k"] == pytest.approx(1.0, abs=1e-4), key
    assert rep["crossover"] is None
    assert rep["rungs"]["extrapolated_winner"] == "tie" and rep["rungs"]["rank_stable"] is True

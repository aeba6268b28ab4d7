#!/usr/bin/env python3
"""A scaling study simulated in seconds: no training, no torch.

    python quick_scaling_demo.py                          # the quick preset's runs, Chinchilla's law
    python quick_scaling_demo.py --mode standard --noise 0.02 --seed 3
    python quick_scaling_demo.py --law kaplan
    python quick_scaling_demo.py --mode tiny --law tiny --compute-multiplier 2 --output-dir variant

For every run the runner would train (its real plan, so N, D and steps are the ones it would use), the
final validation loss is drawn from a known law with seeded noise and a training curve is synthesised in
the runner's format. Then the main script's own fitting, prediction and figure code runs on it
(`finish_results`, imported, not copied), and the true and recovered exponents are printed side by side:
what a fit of this ladder can and cannot recover when the truth is known.

Writes `scaling_results_demo/results.json` (the runner's schema plus `"simulated": true` and `true_law`)
and `scaling_results_demo/scaling_laws_complete.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

import run_scaling_experiments_enhanced as rse

# Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"), their fit of
# L(N, D) = E + A / N^alpha + B / D^beta to Hoffmann et al.'s 240 runs (nats/token, MassiveText).
CHINCHILLA = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}
# Span of those 240 runs; outside it the law is an extrapolation.
CHINCHILLA_RANGE = {"N": (5.7e7, 1.6e10), "D": (8.2e8, 3.2e11)}
# The same form at tiny's scale: the joint law fitted to an earlier tiny grid of the runner
# (tests/data_tiny_grid_v512.csv: N 6.6K-100K, D 0.5M-12M, 512-token BPE), rounded. Tiny's runs lie
# where Chinchilla's law predicts losses above ln(vocabulary); this law gives them 2.6-3.7 nats.
TINY = {"E": 1.90, "A": 20.9, "B": 609.0, "alpha": 0.317, "beta": 0.471}
JOINT_LAWS = {"chinchilla": CHINCHILLA, "tiny": TINY}      # L(N, D) = E + A / N^alpha + B / D^beta
LAWS = ("chinchilla", "kaplan", "tiny")

# The 240 Chinchilla runs scatter around the law above with a standard deviation of 0.0076 in log-loss
# (measured on the extracted data); small models on small data are noisier from seed to seed, so the
# default is a little above that.
DEFAULT_NOISE = 0.01
# Standard deviation of one training batch's loss around the smooth curve (nats); a logged training loss
# is the mean of log_interval such batches.
BATCH_LOSS_STD_NATS = 0.05


# ----------------------------------------------------------------------------------------------------
# the law: what each sweep sees of it (pure functions)
# ----------------------------------------------------------------------------------------------------

def multiplied_law(constants: dict, multiplier: float) -> dict:
    """The law made exactly `multiplier` (K) times more compute-efficient: A and B both scaled by
    K^(-alpha beta / (alpha + beta)).

    Why exact: under C = 6 N D the optimum's loss is E + G (C/6)^(-alpha beta/(alpha+beta)), with G a
    function of A and B homogeneous of degree 1 (G = (A^beta B^alpha)^(1/(alpha+beta)) times a constant
    of the exponents); scaling both by s scales G by s, and s = K^(-alpha beta/(alpha+beta)) is what
    replacing C by K C does. Equivalently, the variant at (N, D) is the base law at (K^a N, K^(1-a) D),
    a = beta/(alpha+beta): the base law's compute-optimal split of K. So k(C) = K at every C."""
    k = constants
    s = multiplier ** (-k["alpha"] * k["beta"] / (k["alpha"] + k["beta"]))
    return {**k, "A": k["A"] * s, "B": k["B"] * s}


def sweep_truth(law: str, sweep: str, fixed: float, constants: dict | None = None) -> dict:
    """The true law along one sweep as L(x) = c + a x^-b, with `fixed` the other variable (the parameter
    sweep's tokens D, or the data sweep's non-embedding N). `constants` replaces a joint law's own (a
    --compute-multiplier variant)."""
    if law in JOINT_LAWS:
        k = constants or JOINT_LAWS[law]
        if sweep == "params":
            return {"a": k["A"], "b": k["alpha"], "c": k["E"] + k["B"] * fixed ** -k["beta"],
                    "how": f"L(N, D) with D fixed at this sweep's {rse.format_count(fixed)} tokens: "
                           f"c = E + B/D^beta"}
        return {"a": k["B"], "b": k["beta"], "c": k["E"] + k["A"] * fixed ** -k["alpha"],
                "how": f"L(N, D) with N fixed at this sweep's model, {rse.format_count(fixed)} non-embedding "
                       f"parameters: c = E + A/N^alpha"}
    x_c, exponent = rse.KAPLAN[sweep]
    # (x_c / x)^alpha = x_c^alpha * x^-alpha: a pure power law, c = 0
    if sweep == "params":
        how = (f"Kaplan's L(N) = ({x_c:.1e}/N)^{exponent}, the loss of a model trained to convergence: "
               f"this sweep's finite {rse.format_count(fixed)} tokens are ignored")
    else:
        how = (f"Kaplan's L(D) = ({x_c:.1e}/D)^{exponent}, the loss of a model large enough that data is "
               f"the limit: this sweep's {rse.format_count(fixed)}-parameter model is ignored")
    return {"a": x_c ** exponent, "b": exponent, "c": 0.0, "how": how}


def kaplan_joint(n_params, tokens) -> np.ndarray:
    """Kaplan et al. 2020's L(N, D) = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D (their eq. 1.5): L(N) as
    D grows without bound, L(D) as N does."""
    (n_c, a_n), (d_c, a_d) = rse.KAPLAN["params"], rse.KAPLAN["data"]
    n, d = np.asarray(n_params, float), np.asarray(tokens, float)
    return ((n_c / n) ** (a_n / a_d) + d_c / d) ** a_d


def kaplan_grid_truth(sweep: str, xs, ys, fixed: float) -> dict:
    """A grid's sweep under Kaplan's L(N, D): its log-log line over the sweep's runs (c = 0), the exponent
    a c = 0 fit of them estimates."""
    b = loglog_slope(xs, ys)
    a = float(np.exp(np.mean(np.log(ys) + b * np.log(xs))))
    other = "tokens" if sweep == "params" else "non-embedding parameters"
    return {"a": a, "b": b, "c": 0.0,
            "how": f"Kaplan's L(N, D) = ((N_c/N)^(alpha_N/alpha_D) + D_c/D)^alpha_D at each run's own N and D "
                   f"(this grid's rows share runs between the sweeps, {rse.format_count(fixed)} {other} "
                   f"here); a and b: its log-log line over this sweep's runs"}


def loglog_slope(x, y) -> float:
    """Least-squares slope of -ln y against ln x: the exponent a c = 0 fit of these points estimates."""
    return float(-np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def law_record(law: str, sweeps: dict, plan: list[rse.RunSpec], noise: float, seed: int,
               multiplier: float = 1.0, row_noise: float = 0.0) -> dict:
    """The `true_law` entry of results.json: constants, how each sweep is simulated, the noise."""
    if law == "chinchilla":
        head = {"name": "chinchilla", "formula": "L(N, D) = E + A / N^alpha + B / D^beta",
                "constants": dict(CHINCHILLA),
                "source": "Besiroglu et al. 2024, 'Chinchilla Scaling: A replication attempt' (refit of "
                          "Hoffmann et al. 2022's runs; nats on MassiveText)",
                "fitted_range": CHINCHILLA_RANGE}
    elif law == "tiny":
        head = {"name": "tiny", "formula": "L(N, D) = E + A / N^alpha + B / D^beta", "constants": dict(TINY),
                "source": "the joint law of an earlier tiny grid (tests/data_tiny_grid_v512.csv), rounded"}
    else:
        head = {"name": "kaplan", "formula": "L(N) = (N_c / N)^alpha_N; L(D) = (D_c / D)^alpha_D",
                "constants": {"N_c": rse.KAPLAN["params"][0], "alpha_N": rse.KAPLAN["params"][1],
                              "D_c": rse.KAPLAN["data"][0], "alpha_D": rse.KAPLAN["data"][1]},
                "source": "Kaplan et al. 2020 (nats on WebText2, GPT-2 tokenizer)"}
    if multiplier != 1.0:
        head["base_constants"] = head["constants"]
        head["constants"] = multiplied_law(head["constants"], multiplier)
        head["compute_multiplier"] = multiplier
    kind = ("final loss = law * exp(noise * z), z ~ N(0, 1), one draw per run" if not row_noise else
            "final loss = law * exp(row_noise * z_row + noise * z), z_row ~ N(0, 1) one draw per row (a WSD "
            "stable run and its branches share it, as real ones share a seed's luck), z ~ N(0, 1) one per run")
    out = {**head, "noise": {"kind": kind, "noise": noise, "row_noise": row_noise, "seed": seed}, "sweeps": {}}
    for sweep, truth in sweeps.items():
        xs = [e.n_params_nonembedding if sweep == "params" else e.tokens for e in plan
              if e.has(rse.SWEEP_ROLE[sweep])]
        ys = rse.power_law(xs, truth["a"], truth["b"], truth["c"])
        out["sweeps"][sweep] = {
            "a": truth["a"], "b": truth["b"], "c": truth["c"], "how": truth["how"],
            "x": "n_params_nonembedding" if sweep == "params" else "tokens",
            "fixed": "tokens" if sweep == "params" else "n_params_nonembedding", "fixed_value": truth["fixed"],
            "loglog_slope": loglog_slope(xs, ys) if len(set(xs)) >= 2 else None}
    out["predictions"] = []
    for sweep, models in rse.REFERENCE_MODELS.items():
        t = sweeps.get(sweep)
        for name, x in models:
            out["predictions"].append({"name": name, "sweep": sweep, "N" if sweep == "params" else "D": x,
                                       "true_loss": float(rse.power_law(x, t["a"], t["b"], t["c"]))
                                       if t else None})
    return out


# ----------------------------------------------------------------------------------------------------
# curves: a smooth descent from ln(vocabulary) to the final loss, logged the way the runner logs it
# ----------------------------------------------------------------------------------------------------

def smooth_loss(step, steps: int, initial: float, final: float) -> np.ndarray:
    """initial at step 0, final at the last step, fast at first and slower later: a power-law decay
    (1 + step/tau)^-1/2 with tau 1% of the run, rescaled so it lands exactly on `final`."""
    tau = max(1.0, 0.01 * steps)
    h = lambda s: (1.0 + np.asarray(s, float) / tau) ** -0.5     # noqa: E731
    g = (h(step) - h(steps)) / (h(0) - h(steps))
    return final + (initial - final) * g


def synth_curve(exp: rse.RunSpec, cfg: rse.RunConfig, initial: float, final: float, noise: float,
                rng: np.random.Generator) -> dict:
    """The runner's `curve` dict: a training loss every log_interval steps (the mean of that many noisy
    batches), a validation loss every eval_interval steps and at step 0 and the last step, whose value
    is exactly `final`."""
    curve = {"step": [], "tokens": [], "train_loss": [], "val_loss": [], "lr": [],
             "eval_step": [0], "eval_tokens": [0]}
    tps = cfg.tokens_per_step
    last_logged = 0
    for step in range(exp.steps):
        done = step + 1
        if done % cfg.log_interval == 0 or done == exp.steps:
            n_batches = done - last_logged
            last_logged = done
            mean = float(smooth_loss(done - n_batches / 2, exp.steps, initial, final))
            curve["step"].append(done)
            curve["tokens"].append(done * tps)
            curve["train_loss"].append(round(mean + rng.normal(0, BATCH_LOSS_STD_NATS / math.sqrt(n_batches)), 5))
            curve["lr"].append(rse.schedule_of(cfg, exp.warmup_steps).lr(step, exp.steps, exp.peak_lr))
        if (done % cfg.eval_interval == 0 and done != exp.steps):
            curve["eval_step"].append(done)
            curve["eval_tokens"].append(done * tps)
    # validation uses the same fixed batches every time, so evaluations wander from the smooth curve by
    # a fraction of the run-to-run scatter, not by batch noise
    evals = np.asarray(curve["eval_step"][1:], float)
    vals = smooth_loss(evals, exp.steps, initial, final) * np.exp(noise / 4 * rng.standard_normal(len(evals)))
    curve["val_loss"] = [initial, *map(float, vals), final]
    curve["eval_step"].append(exp.steps)
    curve["eval_tokens"].append(exp.steps * tps)
    return curve


# ----------------------------------------------------------------------------------------------------
# the simulated study
# ----------------------------------------------------------------------------------------------------

def simulate(cfg: rse.RunConfig, preset: rse.Preset, law: str, noise: float, seed: int,
             multiplier: float = 1.0, row_noise: float = 0.0) -> tuple[dict, list[dict]]:
    """(a results dict in the runner's schema with its points table, fits still to make, `simulated` and
    `true_law` added; the runs' records, curves included, as the runner writes them under runs/).
    Raises UserError when the law predicts a run learns nothing.

    Which law a run is a point of comes from its roles: in a WSD grid (tiny) the data sweep is a row of
    the parameter sweep's runs. There, Kaplan's two one-variable laws would give a shared run two
    losses, so every run takes Kaplan's L(N, D) at its own N and D."""
    plan = [dataclasses.replace(e, seed=seed) for e in rse.build_plan(cfg, preset)]
    constants = multiplied_law(JOINT_LAWS[law], multiplier) if law in JOINT_LAWS else None
    kaplan_grid = law == "kaplan" and any(e.has(rse.ROLE_N) and e.has(rse.ROLE_D) for e in plan)
    sweeps = {}
    for sweep in ("params", "data"):
        runs = [e for e in plan if e.has(rse.SWEEP_ROLE[sweep])]
        if not runs:
            continue
        fixed = {e.tokens if sweep == "params" else e.n_params_nonembedding for e in runs}
        assert len(fixed) == 1, f"the {sweep} sweep's other variable should be constant, got {fixed}"
        value = fixed.pop()
        if kaplan_grid:
            xs = [e.n_params_nonembedding if sweep == "params" else e.tokens for e in runs]
            ys = kaplan_joint([e.n_params_nonembedding for e in runs], [e.tokens for e in runs])
            sweeps[sweep] = {**kaplan_grid_truth(sweep, xs, ys, value), "fixed": value}
        else:
            sweeps[sweep] = {**sweep_truth(law, sweep, value, constants), "fixed": value}

    ln_vocab = math.log(cfg.vocab_size)
    z_final = np.random.default_rng([seed, 0]).standard_normal(len(plan))   # one draw per run, plan order
    # one draw per row (a stable run and its branches), from its own stream: row_noise 0 changes nothing
    row = rse.row_index([rse.run_row(dataclasses.asdict(e)) for e in plan], len(plan))
    z_row = np.random.default_rng([seed, 2]).standard_normal(row.max() + 1)[row] * row_noise
    records = []
    for i, exp in enumerate(plan):
        # a run of the parameter sweep's rows (a WSD branch, or a row going on past the sweep's D): a
        # point of the law at its own D
        if kaplan_grid:
            true_loss = float(kaplan_joint(exp.n_params_nonembedding, exp.tokens))
        else:
            on_d = exp.has(rse.ROLE_D) and not exp.has(rse.ROLE_N)      # a point of L(D) alone: its law
            t = sweeps["data"] if on_d else sweep_truth(law, "params", exp.tokens, constants)
            x = exp.tokens if on_d else exp.n_params_nonembedding
            true_loss = float(rse.power_law(x, t["a"], t["b"], t["c"]))
        final = true_loss * math.exp(noise * z_final[i] + z_row[i])
        rng = np.random.default_rng([seed, 1, i])
        initial = ln_vocab + abs(rng.normal(0, 0.02))   # an untrained model sits at or just above ln V
        if final >= initial - 0.05:
            raise rse.UserError(
                f"--law {law} gives {exp.name} (N={rse.format_count(exp.n_params_nonembedding)}, "
                f"D={rse.format_count(exp.tokens)}) a loss of {true_loss:.2f}, no better than chance "
                f"(ln {cfg.vocab_size} = {ln_vocab:.2f}): these runs are far outside the law's range; "
                f"use --law kaplan, --law tiny or a larger --mode")
        records.append(rse.run_record(exp, None, epochs=None, initial_loss=initial, final_val_loss=final,
                                      true_loss=true_loss, status="completed", wall_time_s=0.0, tokens_per_s=None,
                                      curve=synth_curve(exp, cfg, initial, final, noise, rng)))
    true_law = law_record(law, sweeps, plan, noise, seed, multiplier, row_noise)
    environment = {"device": "simulated", "device_name": "none: losses drawn from a known law, no training",
                   "dtype": None, "torch_version": None, "python_version": platform.python_version(),
                   "platform": platform.platform(),
                   "corpus": {"name": f"simulated ({law} law)", "sha256": None, "n_files": None,
                              "n_characters": None, "tokenizer": "none (simulated)", "tokenizer_path": None,
                              "vocab_size": cfg.vocab_size, "n_train_tokens": None, "n_val_tokens": None,
                              "validation_split": None, "prepare_time_s": 0.0}}
    results = {"schema_version": rse.SCHEMA_VERSION, "mode": cfg.mode, "simulated": True, "true_law": true_law,
               "config": dataclasses.asdict(cfg), "environment": environment,
               "points": [rse.point_row(r) for r in records], "fits": {}, "predictions": [], "wall_time_s": 0.0}
    return results, records


def simulated_study(runner_argv: list[str], law: str, noise: float, seed: int, out_dir: Path,
                    multiplier: float = 1.0, row_noise: float = 0.0) -> tuple[dict, list[dict]]:
    """The runner's plan for these runner arguments (e.g. ['--mode', 'quick']) simulated under `law`
    (made `multiplier` times more compute-efficient): a results dict whose fits are still to be made
    (rse.finish_results), the range note in true_law, and the runs' records."""
    if multiplier != 1.0 and law not in JOINT_LAWS:
        raise rse.UserError(f"--compute-multiplier needs a law of the form E + A/N^alpha + B/D^beta: use --law "
                            f"{' or --law '.join(JOINT_LAWS)}, not {law}")
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(runner_argv))
    # the laws below are written in non-embedding N, so the joint law is fitted in that count
    cfg = dataclasses.replace(cfg, data="simulated", device="none", cache_dir="", seed=seed, output_dir=str(out_dir),
                              n_count="non-embedding")
    results, records = simulate(cfg, preset, law, noise, seed, multiplier, row_noise)
    note = out_of_range_note(results)
    if note:
        results["true_law"]["note"] = note
    return results, records


def write_study(results: dict, records: list[dict], out_dir: Path) -> None:
    """The simulated study as the runner writes one: each run's record under runs/, then results.json
    with the fits, runs.csv and the figures."""
    rse.prepare_output_dir(out_dir)
    store = rse.RunStore(out_dir)
    for rec in records:
        store.save(rec)
    rse.finish_results(results, out_dir)


def out_of_range_note(results: dict) -> str | None:
    """Which of the runs lie outside the span the Chinchilla law was fitted on, if any."""
    if results["true_law"]["name"] != "chinchilla":
        return None
    n = [p["N_nonembedding"] for p in results["points"]]
    d = [p["D"] for p in results["points"]]
    (n_lo, n_hi), (d_lo, d_hi) = CHINCHILLA_RANGE["N"], CHINCHILLA_RANGE["D"]
    if min(n) >= n_lo and max(n) <= n_hi and min(d) >= d_lo and max(d) <= d_hi:
        return None
    return (f"these runs (N {rse.format_count(min(n))}-{rse.format_count(max(n))}, D "
            f"{rse.format_count(min(d))}-{rse.format_count(max(d))}) lie outside the runs the law was "
            f"fitted on (N {rse.format_count(n_lo)}-{rse.format_count(n_hi)}, D {rse.format_count(d_lo)}-"
            f"{rse.format_count(d_hi)}): here the law is a known truth to recover, not a forecast")


def interval_text(fit: dict, key: str, digits: int = 4) -> str:
    ci = (fit.get("ci95") or {}).get(key)
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "n/a"


def print_comparison(results: dict) -> None:
    """True and recovered exponents and constants side by side, then true and predicted losses."""
    law = results["true_law"]
    noise = law["noise"]
    rse.log("")
    per_row = f" + {noise['row_noise']:g} per row" if noise.get("row_noise") else ""
    rse.log(f"true vs recovered ({law['name']} law, noise {noise['noise']:g}{per_row} in log-loss, "
            f"seed {noise['seed']})")
    rse.log(f"  {'sweep':<7} {'fit form':<16} {'true b':>7} {'recovered b':>12} {'95% CI':>18} {'c=0 slope':>10}"
            f" {'true c':>7} {'recovered c':>12} {'95% CI':>18}")
    for sweep, truth in law["sweeps"].items():
        fit = results["fits"].get(sweep, {})
        if not fit.get("available"):
            rse.log(f"  {sweep:<7} fit unavailable: {fit.get('reason')}")
            continue
        slope = f"{truth['loglog_slope']:.4f}" if truth["loglog_slope"] is not None else "n/a"
        rse.log(f"  {sweep:<7} {fit['form']:<16} {truth['b']:>7.4f} {fit['b']:>12.4f} "
                f"{interval_text(fit, 'b'):>18} {slope:>10} {truth['c']:>7.3f} {fit['c']:>12.3f} "
                f"{interval_text(fit, 'c', 3):>18}")
    for sweep, truth in law["sweeps"].items():
        fit = results["fits"].get(sweep, {})
        if fit.get("form") == "two_parameter" and truth["c"] > 0:
            rse.log(f"  {sweep}: with {fit['n_points']} points the fit is a x^-b (c = 0), so its b estimates "
                    f"the log-log slope of the true law over these runs ({slope_text(truth)}), not the law's "
                    f"exponent {truth['b']}: add sizes (--param-sizes/--data-sizes) or use --mode standard")
    rse.log("  extrapolations, true law vs the fit (same fixed N or D as the sweep):")
    fitted = {(p["sweep"], p["name"]): p for p in results["predictions"]}
    for p in law["predictions"]:
        if p["true_loss"] is None:
            continue
        pred = fitted.get((p["sweep"], p["name"]), {}).get("predicted_loss")
        joint = fitted.get((p["sweep"], p["name"]), {}).get("joint_predicted_loss")
        x = p.get("N", p.get("D"))
        err = lambda v: f"{v:.3f} ({100 * (v / p['true_loss'] - 1):+.1f}%)" if v is not None else "n/a"  # noqa: E731
        rse.log(f"    {p['name']:<28} {rse.format_count(x):>6}: true {p['true_loss']:.3f}, fitted {err(pred)}, "
                f"joint law {err(joint)}")
    joint = results["fits"].get("joint", {})
    if joint.get("available") and law["name"] in JOINT_LAWS:
        k = law["constants"]
        rse.log(f"  joint law: alpha {joint['alpha']:.4f} {interval_text(joint, 'alpha')} (true "
                f"{k['alpha']}), beta {joint['beta']:.4f} {interval_text(joint, 'beta')} (true "
                f"{k['beta']}), from {joint['n_points']} runs")


def slope_text(truth: dict) -> str:
    return f"{truth['loglog_slope']:.4f}" if truth["loglog_slope"] is not None else "n/a"


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = rse._Parser(description="Simulate a scaling study from a known law (no training, no torch), fit it "
                                "with the runner's code and compare the recovered exponents with the truth.")
    # the ladder: the runner's plan for these options, so N, D and steps match a real run
    p.add_argument("--mode", default="quick", help=f"preset whose runs to simulate: {', '.join(rse.PRESETS)} "
                                                   f"(default quick)")
    p.add_argument("--param-sizes", help="replace the parameter sweep's N targets, e.g. 1M,3M,10M")
    p.add_argument("--data-sizes", help="replace the data sweep's D targets, e.g. 5M,20M")
    p.add_argument("--data-model-size", help="N target of the data sweep's model (default: the preset's)")
    p.add_argument("--max-steps", type=rse.positive_int, help="steps of every parameter-sweep run")
    p.add_argument("--vocab-size", type=rse.positive_int, help="vocabulary: curves start near its log")
    p.add_argument("--schedule", choices=["cosine", "wsd"], help="the runner's schedule (default: the preset's)")
    p.add_argument("--horizons", help="wsd: every parameter-sweep run also at these horizons (0.25x,0.5x,1x), "
                                      "each a point under the law, as the runner's cooldown branches give")
    p.add_argument("--warmup-steps", type=rse.positive_int, help="the runner's warmup of every run")
    # the simulation
    p.add_argument("--law", default="chinchilla", choices=LAWS,
                   help="chinchilla: Besiroglu et al. 2024's L(N, D) = 1.82 + 482/N^0.348 + 2085/D^0.366 "
                        "(default); kaplan: L(N) = (8.8e13/N)^0.076 and L(D) = (5.4e13/D)^0.095 (a WSD grid: "
                        "their L(N, D)); tiny: 1.90 + 20.9/N^0.317 + 609/D^0.471, the same form at tiny's scale")
    p.add_argument("--compute-multiplier", type=rse.positive_float, default=1.0, metavar="K",
                   help="simulate a recipe exactly K times more compute-efficient than the law (A and B scaled "
                        "by K^(-alpha beta/(alpha+beta)); chinchilla and tiny laws); default 1""")
    p.add_argument("--noise", type=non_negative_float, default=DEFAULT_NOISE,
                   help=f"standard deviation of each final loss in log-loss, i.e. relative (default "
                        f"{DEFAULT_NOISE}; 0 gives the law exactly)")
    p.add_argument("--row-noise", type=non_negative_float, default=0.0,
                   help="standard deviation in log-loss shared by a row's runs (a WSD stable run and its "
                        "cooldown branches, which share a seed in real runs), on top of --noise per run; "
                        "default 0")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--output-dir", default="scaling_results_demo", help="default scaling_results_demo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        runner_argv = ["--mode", args.mode]
        for opt in ("param_sizes", "data_sizes", "data_model_size", "max_steps", "vocab_size", "schedule",
                    "horizons", "warmup_steps"):
            if getattr(args, opt) is not None:
                runner_argv += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        out_dir = Path(args.output_dir)
        results, records = simulated_study(runner_argv, args.law, args.noise, args.seed, out_dir,
                                           args.compute_multiplier, args.row_noise)
        rse.prepare_output_dir(out_dir)
    except rse.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    rse.log(f"simulating mode '{results['mode']}' ({len(records)} runs of the runner's plan) "
            f"under the {args.law} law, noise {args.noise:g}"
            f"{f' (+{args.row_noise:g} per row)' if args.row_noise else ''}, seed {args.seed}: no training")
    for sweep, truth in results["true_law"]["sweeps"].items():
        rse.log(f"  {sweep} sweep: {truth['how']}")
    if results["true_law"].get("note"):
        rse.log(f"  note: {results['true_law']['note']}")
    write_study(results, records, out_dir)
    rse.print_summary(results, out_dir, records)
    print_comparison(results)
    rse.log(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Put a simulated study and a real one side by side: fits, exponents with their intervals, residuals.

    python quick_scaling_demo.py                               # -> scaling_results_demo/
    python run_scaling_experiments_enhanced.py --mode quick    # -> scaling_results_quick_v2/
    python compare_quick_vs_real.py                            # -> comparison_results/
    python compare_quick_vs_real.py --real scaling_results_standard_v2   # simulates standard if no demo
    python compare_quick_vs_real.py --sim scaling_results_demo --real scaling_results_tiny_v2

Either input may be a results folder or its results.json, simulated or real; results of different modes
or corpora can be compared, and the report says when they differ. With no simulated results at --sim, the
simulation of the real run's mode is made there first (seconds, no torch: quick_scaling_demo's code). Writes
`comparison_results/comparison_report.json` first, then `comparison_results/quick_vs_real_comparison.png`,
and prints a short verdict table. Differences are real minus sim. Intervals are the 95% intervals the
fitting code records (`ci95`); where a file has none, the report says "n/a" and whether the intervals
overlap is "unknown".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse

SWEEPS = {"params": ("N_nonembedding", "N"), "data": ("D", "D")}      # points-table column, symbol
DEFAULT_SIM = "scaling_results_demo/results.json"
DEFAULT_REAL = "scaling_results_quick_v2/results.json"


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------

def results_path(text: str) -> Path:
    """A folder means its results.json."""
    path = Path(text).expanduser()
    return path / "results.json" if path.is_dir() or not path.suffix else path


def creating_command(path: Path, role: str) -> str:
    """The command that writes `path`: the demo for the simulated side, the runner for the real one."""
    folder = path.parent
    if role == "sim":
        return ("python quick_scaling_demo.py" +
                ("" if folder == Path("scaling_results_demo") else f" --output-dir {folder}"))
    m = re.fullmatch(r"scaling_results_(\w+)_v2", folder.name)
    mode = m.group(1) if m and m.group(1) in rse.PRESETS else "quick"
    default = Path(f"scaling_results_{mode}_v2")
    return (f"python run_scaling_experiments_enhanced.py --mode {mode}" +
            ("" if folder == default else f" --output-dir {folder}"))


def read_study_file(path: Path, flag: str, missing: str, rerun: str = "") -> dict:
    """A study's results.json as a dict, or a one-line UserError: `missing` says how to make it, `rerun`
    (if any) how to make it again when it cannot be read."""
    if not path.is_file():
        raise rse.UserError(f"{flag}: no results at {path}; {missing}")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise rse.UserError(f"{flag}: cannot read {path} as JSON ({e}){'; rerun ' + rerun if rerun else ''}") from None
    if not isinstance(results, dict) or not isinstance(results.get("points", results.get("experiments")), list):
        raise rse.UserError(f"{flag}: {path} is not a results.json of the runner or the demo (no "
                            f"'points' table)")
    return rse.study_file_runs(results, f"{flag} {path}")[0]       # schema 1's records as points


def load_results(text: str, role: str) -> tuple[dict, Path]:
    path = results_path(text)
    flag = "--sim" if role == "sim" else "--real"
    command = f"`{creating_command(path, role)}`"
    return read_study_file(path, flag, f"create them with {command} or pass {flag} PATH", command), path


def simulate_for(real: dict, sim_file: Path) -> tuple[dict, Path]:
    """The demo's study of the real run's mode, written where --sim points: Chinchilla's law, or
    Kaplan's where the mode's runs lie too far outside Chinchilla's (tiny)."""
    mode = real.get("mode") if real.get("mode") in rse.PRESETS else "quick"
    folder = sim_file.parent
    for law in demo.LAWS:
        try:
            results, records = demo.simulated_study(["--mode", mode], law, demo.DEFAULT_NOISE, 0, folder)
            break
        except rse.UserError:
            if law == demo.LAWS[-1]:
                raise
    demo.write_study(results, records, folder)
    rse.log(f"sim: no results at {sim_file}; simulated mode '{mode}' under the {law} law there (as `python "
            f"quick_scaling_demo.py --mode {mode} --law {law} --output-dir {folder}` would)")
    return results, folder / "results.json"


def fits_of(results: dict) -> tuple[dict, list, str]:
    """The file's fits and predictions, or, for a run that has not finished (its fits still empty),
    fits made here with the runner's own code from its completed experiments."""
    fits = results.get("fits") or {}
    if all(isinstance(fits.get(s), dict) and "available" in fits[s] for s in SWEEPS):
        return fits, results.get("predictions") or [], "results.json"
    fits = rse.fit_sweeps(results["points"])
    return fits, rse.predictions_from_fits(fits), "fitted here (the file has no fits: an unfinished run?)"


# ----------------------------------------------------------------------------------------------------
# the comparison (pure functions)
# ----------------------------------------------------------------------------------------------------

def interval(obj: dict, key: str):
    """A [lo, hi] 95% interval from `ci95` (fits) or `predicted_loss_ci95` (predictions), or None."""
    ci = obj.get("predicted_loss_ci95") if key == "predicted_loss" else (obj.get("ci95") or {}).get(key)
    if ci is None or len(ci) != 2 or any(v is None or not math.isfinite(v) for v in ci):
        return None
    return [float(ci[0]), float(ci[1])]


def intervals_overlap(a, b):
    """True or False when both intervals exist, else "unknown"."""
    if a is None or b is None:
        return "unknown"
    return bool(a[0] <= b[1] and b[0] <= a[1])


def side_by_side(sim_value, real_value, sim_ci=None, real_ci=None) -> dict:
    diff = (real_value - sim_value) if sim_value is not None and real_value is not None else None
    return {"sim": sim_value, "real": real_value, "difference": diff, "sim_ci95": sim_ci,
            "real_ci95": real_ci, "intervals_overlap": intervals_overlap(sim_ci, real_ci)}


def fit_record(fit: dict, points: list, sweep: str) -> dict:
    key = SWEEPS[sweep][0]
    xs = [r[key] for r in rse.usable_runs(points, sweep)]
    rec = {k: fit.get(k) for k in ("available", "reason", "law", "form", "note", "a", "b", "c", "r2",
                                   "n_points")}
    rec["ci95"] = {k: interval(fit, k) for k in ("a", "b", "c")} if fit.get("ci95") else None
    rec["x_range"] = [min(xs), max(xs)] if xs else None
    return rec


def sweep_verdict(sim: dict, real: dict, exponent: dict) -> str:
    if not (sim["available"] and real["available"]):
        which = " and ".join(r for r, f in (("sim", sim), ("real", real)) if not f["available"])
        return f"no comparison: the {which} fit is unavailable"
    if exponent["difference"] == 0:
        verdict = "identical exponents"
    elif exponent["intervals_overlap"] is True:
        verdict = "exponents agree within their 95% intervals"
    elif exponent["intervals_overlap"] is False:
        verdict = "exponents differ: their 95% intervals do not overlap"
    else:
        verdict = f"no intervals: a difference of {exponent['difference']:+.4f} cannot be judged"
    if sim["form"] != real["form"]:
        verdict += f" (different fitted forms: {sim['form']} vs {real['form']}, so b means different things)"
    return verdict


def describe(results: dict, path: Path) -> dict:
    env = results.get("environment") or {}
    corpus = env.get("corpus") or {}
    law = results.get("true_law") or {}
    return {"path": str(path), "simulated": bool(results.get("simulated", False)), "mode": results.get("mode"),
            "true_law": law.get("name"), "device": env.get("device"), "corpus": corpus.get("name"),
            "corpus_sha256": corpus.get("sha256"), "tokenizer": corpus.get("tokenizer"),
            "vocab_size": corpus.get("vocab_size"), "n_experiments": len(results["points"])}


def compare(sim: dict, real: dict, sim_path: Path = Path("sim"), real_path: Path = Path("real")) -> dict:
    """The comparison report of two results dicts (sim and real are labels: either may be either)."""
    s_info, r_info = describe(sim, sim_path), describe(real, real_path)
    s_fits, s_preds, s_src = fits_of(sim)
    r_fits, r_preds, r_src = fits_of(real)
    s_info["fits_source"], r_info["fits_source"] = s_src, r_src
    notes = []
    same_mode = s_info["mode"] == r_info["mode"]
    if not same_mode:
        notes.append(f"different modes ({s_info['mode']} vs {r_info['mode']}): the sweeps cover different N and "
                     f"D ranges (see x_range), so exponents are compared across ranges")
    same_corpus = (s_info["corpus_sha256"] is not None and s_info["corpus_sha256"] == r_info["corpus_sha256"]
                   and s_info["vocab_size"] == r_info["vocab_size"]) or (
        s_info["simulated"] and r_info["simulated"] and s_info["true_law"] == r_info["true_law"])
    if not same_corpus:
        notes.append(f"different data ({s_info['corpus']}, vocabulary {s_info['vocab_size']} vs "
                     f"{r_info['corpus']}, vocabulary {r_info['vocab_size']}): loss levels (a, c and the "
                     f"predictions) depend on corpus and tokenizer; the exponents are the comparable part")
    for info in (s_info, r_info):
        if info["fits_source"] != "results.json":
            notes.append(f"{info['path']}: {info['fits_source']}")

    sweeps = {}
    for sweep, (key, var) in SWEEPS.items():
        sf = fit_record(s_fits.get(sweep, {}), sim["points"], sweep)
        rf = fit_record(r_fits.get(sweep, {}), real["points"], sweep)
        exponent = side_by_side(sf["b"], rf["b"], interval(sf, "b"), interval(rf, "b"))
        constants = {k: side_by_side(sf[k], rf[k], interval(sf, k), interval(rf, k)) for k in ("a", "c")}
        r2 = side_by_side(sf["r2"], rf["r2"])
        r2 = {k: r2[k] for k in ("sim", "real", "difference")}
        by_name = {p["name"]: p for p in r_preds if p.get("sweep") == sweep}
        preds = []
        names = [p["name"] for p in s_preds if p.get("sweep") == sweep]
        names += [n for n in by_name if n not in names]
        s_by_name = {p["name"]: p for p in s_preds if p.get("sweep") == sweep}
        for name in names:
            sp, rp = s_by_name.get(name, {}), by_name.get(name, {})
            row = side_by_side(sp.get("predicted_loss"), rp.get("predicted_loss"),
                               interval(sp, "predicted_loss"), interval(rp, "predicted_loss"))
            preds.append({"name": name, var: sp.get(var, rp.get(var)), **row})
        sweeps[sweep] = {"x": key, "sim": sf, "real": rf, "exponent": exponent, "constants": constants,
                         "r2": r2, "predictions": preds, "verdict": sweep_verdict(sf, rf, exponent)}

    # any further fits (e.g. a joint L(N, D) fit): their numeric fields side by side, uninterpreted
    other = {}
    for name in sorted((set(s_fits) | set(r_fits)) - set(SWEEPS)):
        a, b = s_fits.get(name) or {}, r_fits.get(name) or {}
        fields = sorted(k for k in set(a) | set(b)
                        if isinstance(a.get(k, b.get(k)), (int, float)) and not isinstance(a.get(k, b.get(k)), bool))
        other[name] = {"in_sim": name in s_fits, "in_real": name in r_fits,
                       **{k: side_by_side(a.get(k), b.get(k), interval(a, k), interval(b, k)) for k in fields}}
    return {"sim": s_info, "real": r_info, "same_mode": same_mode, "same_corpus": bool(same_corpus),
            "notes": notes, "difference_convention": "real minus sim", "sweeps": sweeps, "other_fits": other}


# ----------------------------------------------------------------------------------------------------
# outputs: the verdict table and the figure
# ----------------------------------------------------------------------------------------------------

def ci_text(ci, digits=3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "n/a"


def num(v, fmt=".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def print_verdict(report: dict) -> None:
    s, r = report["sim"], report["real"]
    rse.log(f"sim:  {s['path']} (mode {s['mode']}, {s['corpus']}{', simulated' if s['simulated'] else ''})")
    rse.log(f"real: {r['path']} (mode {r['mode']}, {r['corpus']}{', simulated' if r['simulated'] else ''})")
    rse.log(f"  {'sweep':<7} {'b sim':>8} {'95% CI':>18} {'b real':>8} {'95% CI':>18} {'real-sim':>9} "
            f"{'overlap':>8} {'R2 sim':>7} {'R2 real':>7}")
    for sweep, c in report["sweeps"].items():
        e = c["exponent"]
        rse.log(f"  {sweep:<7} {num(e['sim']):>8} {ci_text(e['sim_ci95']):>18} {num(e['real']):>8} "
                f"{ci_text(e['real_ci95']):>18} {num(e['difference'], '+.4f'):>9} {str(e['intervals_overlap']):>8} "
                f"{num(c['r2']['sim'], '.3f'):>7} {num(c['r2']['real'], '.3f'):>7}")
    for sweep, c in report["sweeps"].items():
        rse.log(f"  {sweep}: {c['verdict']}")
    for note in report["notes"]:
        rse.log(f"  note: {note}")


def residuals(points: list, sweep: str, fit: dict):
    """(x, relative residual) of a sweep's usable runs about its fit: (measured - fitted) / fitted."""
    key = SWEEPS[sweep][0]
    runs = rse.usable_runs(points, sweep)
    x = np.array([r[key] for r in runs], dtype=float)
    y = np.array([r["loss"] for r in runs], dtype=float)
    if not fit.get("available") or not len(x):
        return x, np.full(len(x), np.nan)
    f = rse.power_law(x, fit["a"], fit["b"], fit["c"])
    return x, (y - f) / f


def draw_exponent_panel(ax_exp, c: dict, sim: dict, sweep: str, var: str, styles: dict) -> None:
    """The two exponents with their intervals side by side, and the sim's true exponent (and, for a
    c = 0 fit, the true log-log slope it estimates)."""
    e = c["exponent"]
    for i, role in enumerate(styles):
        color = styles[role][0]
        b, ci = e[role], e[f"{role}_ci95"]
        if b is None:
            ax_exp.text(i, 0.5, "fit\nunavailable", ha="center", va="center", color=color,
                        transform=ax_exp.get_xaxis_transform())
            continue
        yerr = [[b - ci[0]], [ci[1] - b]] if ci else None
        ax_exp.errorbar([i], [b], yerr=yerr, fmt=styles[role][1], color=color, ms=9, capsize=8, lw=2)
        ax_exp.annotate(f"{b:.3f}\n95% CI {ci_text(ci)}", (i, b), textcoords="offset points",
                        xytext=(14, 0), fontsize=8, va="center")
    truth = ((sim.get("true_law") or {}).get("sweeps") or {}).get(sweep, {})
    if truth.get("b") is not None:
        ax_exp.axhline(truth["b"], color="gray", ls=":", lw=1.2, label=f"sim's true exponent {truth['b']:.3f}")
        if c["sim"]["form"] == "two_parameter" and truth.get("loglog_slope") is not None:
            # what a c = 0 fit of the sim's points estimates: the true law's log-log slope over them
            ax_exp.axhline(truth["loglog_slope"], color="tab:blue", ls=":", lw=1.2,
                           label=f"sim's true log-log slope {truth['loglog_slope']:.3f} (c = 0 fits)")
        ax_exp.legend(fontsize=8, loc="best")
    ax_exp.set_xlim(-0.6, 1.9)
    ax_exp.set_xticks([0, 1], ["sim", "real"])
    ax_exp.set_ylabel(f"exponent b of L = c + a/{var}^b")
    ax_exp.set_title(f"{sweep}: exponents (overlap: {e['intervals_overlap']})", fontsize=11)
    ax_exp.grid(True, axis="y", alpha=0.3)


def build_comparison_figure(sim: dict, real: dict, report: dict):
    """Rows: the two sweeps. Columns: points and fitted curves on the same axes; the exponents with
    their intervals side by side; the residuals about each fit."""
    styles = {"sim": ("tab:blue", "o", "sim"), "real": ("tab:orange", "s", "real")}
    data = {"sim": sim, "real": real}
    fig, axes = rse.plt.subplots(2, 3, figsize=(18, 10.5))
    for row, (sweep, (key, var)) in enumerate(SWEEPS.items()):
        c = report["sweeps"][sweep]
        ax_fit, ax_exp, ax_res = axes[row]
        spans = [c[role]["x_range"] for role in styles if c[role]["x_range"]]
        lo = min(s[0] for s in spans) / 1.5 if spans else 1.0
        hi = max(s[1] for s in spans) * 1.5 if spans else 10.0
        grid = np.logspace(np.log10(lo), np.log10(hi), 400)
        tops = []
        for role, (color, marker, label) in styles.items():
            fit = c[role]
            runs = rse.usable_runs(data[role]["points"], sweep)
            ax_fit.scatter([r[key] for r in runs], [r["loss"] for r in runs], color=color,
                           marker=marker, s=55, zorder=5, label=f"{label}: {report[role]['mode']}, "
                                                               f"{report[role]['corpus']}")
            if fit["available"]:
                # solid over the fit's own points, dashed where it extrapolates into the other's range
                inside = (grid >= fit["x_range"][0]) & (grid <= fit["x_range"][1])
                law = rse.power_law(grid, fit["a"], fit["b"], fit["c"])
                ax_fit.plot(grid, np.where(inside, law, np.nan), "-", color=color, lw=1.8,
                            label=f"{label} fit: {fit['c']:.3g} + {fit['a']:.3g}/{var}^{fit['b']:.3f} "
                                  f"(R² {fit['r2']:.3f})")
                ax_fit.plot(grid, np.where(inside, np.nan, law), "--", color=color, lw=1, alpha=0.6)
                tops.append(max(r["loss"] for r in runs))
            x, res = residuals(data[role]["points"], sweep, fit)
            ax_res.plot(x, 100 * res, marker=marker, color=color, ls="none", ms=7, label=label)
        ax_fit.set_xscale("log")
        if tops:
            ax_fit.set_ylim(0, 1.25 * max(tops))
        ax_fit.set_xlabel("non-embedding parameters N" if sweep == "params" else "training tokens D")
        ax_fit.set_ylabel("final validation loss (nats/token)")
        ax_fit.set_title(f"{sweep} sweep: measured points and fits", fontsize=11)
        ax_fit.grid(True, which="both", alpha=0.3)
        ax_fit.legend(fontsize=7.5)

        draw_exponent_panel(ax_exp, c, sim, sweep, var, styles)

        ax_res.axhline(0, color="black", lw=0.8)
        ax_res.set_xscale("log")
        ax_res.set_xlabel("N" if sweep == "params" else "D")
        ax_res.set_ylabel("residual: (measured - fit) / fit  (%)")
        ax_res.set_title(f"{sweep}: residuals about each fit", fontsize=11)
        ax_res.grid(True, which="both", alpha=0.3)
        ax_res.legend(fontsize=8)
    fig.suptitle(f"sim ({report['sim']['mode']}, {report['sim']['corpus']}) vs real "
                 f"({report['real']['mode']}, {report['real']['corpus']})", fontsize=13)
    if report["notes"]:
        fig.text(0.5, 0.01, "; ".join(n.split(":")[0] for n in report["notes"]), ha="center", fontsize=9,
                 style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    return fig


# ----------------------------------------------------------------------------------------------------
# two recipes: each study's joint law and frontier, the effective-compute multiplier k(C) with paired draws
# ----------------------------------------------------------------------------------------------------

# Budgets the multiplier is reported at beyond the runs (FLOPs), always marked as extrapolations.
FAR_BUDGETS = (1e18, 1e21)
# ln N grid of the numerical frontier: 10 to 1e16 parameters, spacing 0.1 in ln N, refined by a parabola
FRONTIER_LOG_N = np.arange(math.log(10.0), math.log(1e16), 0.1)
# ln C grid of each base frontier that k(C) is read from (inverted by interpolation)
INVERSE_LOG_C = np.linspace(math.log(1e4), math.log(1e30), 131)
# multiplier curve drawn and saved: from a decade below the runs to the largest far budget
N_CURVE = 60
K_AXIS_MIN, K_AXIS_MAX = 1e-3, 1e3     # the figure's k axis at most; beyond, k is a number in the report


@dataclass(frozen=True)
class Study:
    """One recipe's finished study: its runs as points, its joint law refitted here (with bootstrap
    draws), and its FLOPs-per-token model."""
    label: str                  # "a" (baseline) or "b" (variant)
    path: Path
    results: dict
    points: list[dict]          # {'name', 'N', 'D', 'loss', 'flops'}
    joint: dict
    overhead: tuple[float, float] | None    # FLOPs per token = 6 N + exp(c0) N^c1; None: 6 N


def study_identity(results: dict) -> dict:
    """What makes two studies' losses comparable: corpus, tokenizer, vocabulary, and how N is counted
    (a missing setting is Kaplan's non-embedding count, the runner's)."""
    corpus = (results.get("environment") or {}).get("corpus") or {}
    cfg = results.get("config") or {}
    return {"corpus": corpus.get("sha256") or corpus.get("name"), "corpus_name": corpus.get("name"),
            "tokenizer": corpus.get("tokenizer"), "vocab_size": corpus.get("vocab_size") or cfg.get("vocab_size"),
            "n_count": cfg.get("n_count") or results.get("n_count") or "non-embedding"}


def unfinished_runs(results: dict) -> list[str]:
    """Runs of the study's plan that have not ended for good (a missing record counts), by name."""
    exps = results["points"]
    open_runs = [e["name"] for e in exps if e["status"] not in rse.FINAL_STATUSES]
    if results.get("simulated"):
        return open_runs
    try:         # the plan its settings define; a settings dict from another version is skipped
        cfg = results["config"]
        fields = {f.name for f in dataclasses.fields(rse.RunConfig)}
        plan = rse.build_plan(rse.RunConfig(**{k: v for k, v in cfg.items() if k in fields}),
                              rse.PRESETS[cfg["mode"]])
        done = {e["name"] for e in exps if e["status"] in rse.FINAL_STATUSES}
        open_runs += sorted({e.name for e in plan} - done - set(open_runs))
    except (KeyError, TypeError, ValueError, rse.UserError):
        pass
    return open_runs


def load_study(text: str, label: str, n_bootstrap: int, seed: int) -> Study:
    """A finished study with a joint law, or a one-line UserError saying why not."""
    flag = f"--{label}"
    path = results_path(text)
    results = read_study_file(path, flag, "train the recipe first (python run_scaling_experiments_enhanced.py "
                                          "...) or pass its results folder")
    return study_from_results(results, path, label, n_bootstrap, seed)


def study_from_results(results: dict, path: Path, label: str, n_bootstrap: int, seed: int) -> Study:
    """The Study of a results dict: its joint law refitted here from its runs, so that the bootstrap
    draws (`_samples`, which results.json leaves out) come from the fitting code's own resampling."""
    flag = f"--{label}"
    open_runs = unfinished_runs(results)
    if open_runs or not results.get("fits"):
        what = f"{len(open_runs)} runs not finished ({', '.join(open_runs[:3])}{', ...' if len(open_runs) > 3 else ''})" \
            if open_runs else "no fits yet"
        raise rse.UserError(f"{flag}: {path} is an unfinished study: {what}; rerun its command to finish it")
    saved = (results.get("fits") or {}).get("joint") or {}
    if not saved.get("available"):
        raise rse.UserError(f"{flag}: {path} has no joint law L(N, D) to compare ({saved.get('reason', 'none fitted')})")
    # N counted as the study counted it (the two studies' counts are checked equal), so the refit is its fit
    points = sorted((dict(p) for p in rse.runs_as_points(results["points"], study_identity(results)["n_count"])),
                    key=lambda p: (p["N"], p["D"], str(p["name"])))
    for p in points:           # the real FLOPs per token; a simulation's are 6 N (C = 6 N D)
        p["flops_per_token"] = p["flops"] / p["D"] if not results.get("simulated") else None
    joint = rse.fit_joint_law([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                              n_bootstrap, seed, rows=rse.point_rows(points))
    if not joint.get("available") or joint.get("_samples") is None:
        raise rse.UserError(f"{flag}: {path}: its joint law cannot be refitted with bootstrap draws "
                            f"({joint.get('reason') or joint.get('note')})")
    return Study(label, path, results, points, joint, flops_overhead(points))


def flops_overhead(points: list[dict]) -> tuple[float, float] | None:
    """FLOPs per token beyond 6 N (the output layer, attention over the context) as exp(c0) N^c1, a
    least-squares line in log-log over the study's model sizes; None when the records lack FLOPs per
    token or it is 6 N (a simulation)."""
    rows = {(p["N"], p["flops_per_token"]) for p in points}
    if not rows or any(f is None for _, f in rows):
        return None
    n = np.array([r[0] for r in rows]); extra = np.array([r[1] for r in rows]) - 6 * n
    if np.any(extra <= 0):
        return None
    if len(set(n)) == 1:
        return float(np.log(extra[0]) - 0.5 * np.log(n[0])), 0.5
    c1, c0 = np.polyfit(np.log(n), np.log(extra), 1)
    return float(c0), float(c1)


def flops_per_token_of(n, overhead) -> np.ndarray:
    n = np.asarray(n, float)
    return 6 * n if overhead is None else 6 * n + np.exp(overhead[0]) * n ** overhead[1]


def frontier(params, log_c, overhead) -> tuple[np.ndarray, np.ndarray]:
    """(loss, N) at the compute-optimal point of each law (rows of `params`: E, A, B, alpha, beta, each
    (S,)) at each budget exp(log_c): min over N of L(N, C / FLOPs-per-token(N)), on FRONTIER_LOG_N refined
    by a parabola through the best grid point and its neighbours. Each (S, n_budgets); NaN where the
    optimum leaves the grid or the law is degenerate."""
    E, A, B, al, be = (np.asarray(v, float)[:, None] for v in params)
    log_n = FRONTIER_LOG_N
    log_fpt = np.log(flops_per_token_of(np.exp(log_n), overhead))
    h = log_n[1] - log_n[0]
    loss = np.full((len(E), len(log_c)), np.nan)
    n_opt = np.full_like(loss, np.nan)
    rows = np.arange(len(E))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for j, lc in enumerate(np.atleast_1d(log_c)):
            log_d = lc - log_fpt                                              # (G,)
            L = E + A * np.exp(-al * log_n) + B * np.exp(-be * log_d)          # (S, G)
            L = np.where(np.isfinite(L), L, np.inf)
            i = np.clip(np.argmin(L, axis=1), 1, len(log_n) - 2)
            lm, l0, lp = L[rows, i - 1], L[rows, i], L[rows, i + 1]
            curv = lm - 2 * l0 + lp
            inside = (np.argmin(L, axis=1) == i) & (curv > 0) & np.isfinite(l0)
            shift = np.where(inside, 0.5 * (lm - lp) / np.where(curv > 0, curv, 1), 0.0)
            loss[:, j] = np.where(inside, l0 - (lm - lp) ** 2 / (8 * np.where(curv > 0, curv, 1)), np.nan)
            n_opt[:, j] = np.where(inside, np.exp(log_n[i] + shift * h), np.nan)
    return loss, n_opt


def multipliers(base_params, variant_params, log_c, base_overhead, variant_overhead) -> np.ndarray:
    """k(C) = C_base(L_variant*(C)) / C for each paired law (row) and budget: the compute the baseline's
    frontier needs to reach the variant's compute-optimal loss at C. inf where the variant's loss lies
    below the baseline's floor E (no budget reaches it), NaN where a frontier is undefined. (S, n)."""
    lv, _ = frontier(variant_params, log_c, variant_overhead)
    lb, _ = frontier(base_params, INVERSE_LOG_C, base_overhead)
    E_b = np.asarray(base_params[0], float)
    k = np.full(lv.shape, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for s in range(len(E_b)):
            reducible = lb[s] - E_b[s]
            ok = np.isfinite(reducible) & (reducible > 0)
            if ok.sum() < 2:
                continue
            x, y = np.log(reducible[ok])[::-1], INVERSE_LOG_C[ok][::-1]      # ln(L* - E) rising, ln C falling
            target = np.log(lv[s] - E_b[s])
            log_cb = np.interp(target, x, y, left=np.nan, right=np.nan)
            k[s] = np.where(lv[s] <= E_b[s], np.inf, np.exp(log_cb - log_c))
    return k


def law_params(joint: dict) -> list[np.ndarray]:
    return [np.array([joint[k]]) for k in ("E", "A", "B", "alpha", "beta")]


def shared_floor_fit(a: Study, b: Study) -> dict:
    """Both studies' joint laws refitted together with one E (rse.fit_joint_laws_shared_floor), started
    from each study's own fit, with as many bootstrap draws as each study's own fit was given."""
    n_boot = max(s.joint["n_bootstrap"] + s.joint.get("n_bootstrap_failed", 0) for s in (a, b))
    studies = [{"N": [p["N"] for p in s.points], "D": [p["D"] for p in s.points],
                "loss": [p["loss"] for p in s.points], "rows": rse.point_rows(s.points),
                "theta": [math.log(s.joint["A"]), s.joint["alpha"], math.log(s.joint["B"]), s.joint["beta"],
                          math.log(max(s.joint["E"], 1e-300))]} for s in (a, b)]
    fit = rse.fit_joint_laws_shared_floor(studies, n_boot, rse.BOOTSTRAP_SEED)
    if not fit.get("available") or fit.get("_samples") is None:
        raise rse.UserError(f"the two studies' laws cannot be fitted together with one E "
                            f"({fit.get('reason') or 'no bootstrap draws'})")
    return fit


def paired_draws(shared: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The baseline's and the variant's law from each draw of the shared-E fit (one draw refits both, so
    draw i is a pair); draws with a non-finite parameter on either side are left out."""
    pa, pb = rse.shared_floor_params(shared["_samples"], 0), rse.shared_floor_params(shared["_samples"], 1)
    ok = np.all([np.isfinite(v) for v in (*pa, *pb)], axis=0)
    return [v[ok] for v in pa], [v[ok] for v in pb]


def percentile_ci(draws) -> list[float] | None:
    """The 2.5th and 97.5th percentiles over draws, inf kept (a draw whose k is unbounded), NaN left out."""
    d = np.asarray(draws, float)
    d = np.sort(d[~np.isnan(d)])
    if len(d) < 20:
        return None
    # order statistics (as np.percentile's 'lower'/'higher'): an interpolation would turn inf into NaN
    return [float(d[int(np.floor(0.025 * (len(d) - 1)))]), float(d[int(np.ceil(0.975 * (len(d) - 1)))])]


def frontier_exponent(params) -> np.ndarray:
    """alpha beta / (alpha + beta): L*(C) - E falls as C to minus this under C = 6 N D."""
    al, be = np.asarray(params[3], float), np.asarray(params[4], float)
    return al * be / (al + be)


def study_flops(study: Study, real: bool) -> np.ndarray:
    return np.array([(p["flops_per_token"] if real else 6 * p["N"]) * p["D"] for p in study.points])


def compare_recipes(a: Study, b: Study) -> dict:
    """The report of baseline `a` against variant `b` (comparison_report.json), or a UserError when they
    cannot be compared (other corpus, tokenizer or N count; no common budget)."""
    ia, ib = study_identity(a.results), study_identity(b.results)
    for key, what in (("corpus", "corpora"), ("tokenizer", "tokenizers"), ("vocab_size", "vocabularies"),
                      ("n_count", "N counts")):
        if ia[key] != ib[key]:
            raise rse.UserError(f"the studies used different {what} ({ia[key]} vs {ib[key]}): their losses are "
                                f"not comparable; compare recipes trained on the same data and tokenizer")
    real = all(p["flops_per_token"] is not None for p in a.points + b.points)
    if not real:                # one study without FLOPs per token: both count C = 6 N D
        a, b = (dataclasses.replace(s, overhead=None) for s in (a, b))
    fa, fb = study_flops(a, real), study_flops(b, real)
    lo, hi = max(fa.min(), fb.min()), min(fa.max(), fb.max())
    if lo > hi:
        raise rse.UserError(f"no overlapping budgets: the baseline's runs span {fa.min():.3g}-{fa.max():.3g} "
                            f"FLOPs, the variant's {fb.min():.3g}-{fb.max():.3g}; a multiplier needs both "
                            f"studies measured at some common compute")
    shared = shared_floor_fit(a, b)
    pa, pb = paired_draws(shared)
    point_a, point_b = law_params(shared["laws"][0]), law_params(shared["laws"][1])
    budgets = [("at_largest_common_budget", hi, False), ("at_smallest_common_budget", lo, False)]
    budgets += [(budget_key(c), c, True) for c in FAR_BUDGETS]
    grid_c = np.logspace(np.log10(min(fa.min(), fb.min()) / 10), np.log10(max(FAR_BUDGETS)), N_CURVE)
    log_c = np.log(np.concatenate([[c for _, c, _ in budgets], grid_c]))     # the budgets, then the curve
    k_hat = multipliers(point_a, point_b, log_c, a.overhead, b.overhead)[0]
    k_draws = multipliers(pa, pb, log_c, a.overhead, b.overhead)
    multiplier = {}
    for j, (key, c, far) in enumerate(budgets):
        ci = percentile_ci(k_draws[:, j])
        multiplier[key] = {"flops": float(c), "k": finite_or_none(k_hat[j]),
                           "ci95": [finite_or_none(v) for v in ci] if ci else None,
                           "k_unbounded": bool(k_hat[j] == np.inf), "extrapolation": bool(far and c > hi)}
    nb = len(budgets)
    curve_hat = k_hat[nb:]
    bands = [percentile_ci(k_draws[:, nb + j]) for j in range(len(grid_c))]
    return {
        "baseline": describe_study(a, fa), "variant": describe_study(b, fb),
        "compute": ("FLOPs per token x D from the records (each study's FLOPs per token modelled as 6 N + "
                    "c N^p over its sizes, for the frontier)" if real else "C = 6 N D (N non-embedding)"),
        "measured_common_range": [float(lo), float(hi)],
        "fit": "joint fit with shared E",
        "shared_fit": shared_fit_report(shared),
        "multiplier": multiplier,
        "multiplier_definition": "k(C) = C_baseline(L_variant*(C)) / C: the compute the baseline's frontier "
                                 "needs to reach the variant's compute-optimal loss at C; k > 1: the variant "
                                 "is better. Both laws from one fit with a shared E; 95% interval: "
                                 "percentiles over its bootstrap draws, each a refit of both studies",
        "n_paired_draws": int(len(pa[0])),
        "exponents": exponent_report(point_a, point_b, pa, pb, multiplier),
        "crossover": crossover(grid_c, curve_hat, lo, hi),
        "rungs": rung_report(a, b, multiplier),
        "multiplier_curve": {"flops": grid_c.tolist(), "k": [finite_or_none(v) for v in curve_hat],
                             "lo": [finite_or_none(bd[0]) if bd else None for bd in bands],
                             "hi": [finite_or_none(bd[1]) if bd else None for bd in bands]},
    }


def budget_key(flops: float) -> str:
    """'at_1e18_flops': the multiplier object's key for a far budget."""
    return f"at_{flops:.0e}_flops".replace("+", "")


def finite_or_none(v):
    return float(v) if v is not None and np.isfinite(v) else None


def describe_study(s: Study, flops: np.ndarray) -> dict:
    j = s.joint
    ident = study_identity(s.results)
    return {"path": str(s.path), "mode": s.results.get("mode"),
            "arch": (s.results.get("config") or {}).get("arch", "gpt2"), "simulated": bool(s.results.get("simulated")),
            "corpus": ident["corpus_name"], "tokenizer": ident["tokenizer"], "n_count": ident["n_count"],
            "n_runs": len(s.points), "flops_range": [float(flops.min()), float(flops.max())],
            "joint": {k: j[k] for k in ("E", "A", "B", "alpha", "beta", "r2", "n_points")},
            "joint_ci95": {k: j["ci95"][k] for k in ("E", "alpha", "beta")},
            "flops_per_token_overhead": list(s.overhead) if s.overhead else None}


def shared_fit_report(shared: dict) -> dict:
    """The shared-E fit in the report: E with its interval, both laws, its objective and noise scales."""
    keys = ("E_at_bound", "draws_E_at_bound", "huber", "n_points", "dof", "n_bootstrap", "n_bootstrap_failed",
            "method")
    return {"E": shared["E"], "E_ci95": shared["ci95"]["E"],
            "laws": dict(zip(("baseline", "variant"), shared["laws"])), **{k: shared[k] for k in keys}}


def exponent_report(point_a, point_b, pa, pb, multiplier: dict) -> dict:
    """Whether the frontiers' exponents differ (then k changes with C), and how k changes: the laws of
    the fit k is read from (point_a, point_b) and its paired draws (pa, pb)."""
    ga, gb = frontier_exponent(point_a)[0], frontier_exponent(point_b)[0]
    diff = frontier_exponent(pb) - frontier_exponent(pa)
    ci = percentile_ci(diff)
    differ = bool(ci is not None and (ci[0] > 1e-6 or ci[1] < -1e-6))     # not float round-off
    near, far = multiplier["at_largest_common_budget"], multiplier[budget_key(max(FAR_BUDGETS))]
    k_near, k_far = k_value(near), k_value(far)
    trend = None
    if np.isfinite(k_near) and np.isfinite(k_far) and k_near > 0 and k_far > 0:
        trend = math.log10(k_far / k_near) / math.log10(far["flops"] / near["flops"])
    if differ:
        how = (f"the frontier exponents differ (variant {gb:.3f} vs baseline {ga:.3f}): k changes with C, "
               f"from {k_near:.3g} at {near['flops']:.3g} FLOPs to {k_far:.3g} at {far['flops']:.0e}"
               + (" (unbounded: the variant's frontier goes below the baseline's floor E)" if k_far == math.inf else ""))
    else:
        how = (f"the frontier exponents agree within their interval (variant {gb:.3f} vs baseline {ga:.3f}); "
               f"the fitted k still moves from {k_near:.3g} to {k_far:.3g} at {far['flops']:.0e}")
    return {"baseline": {"alpha": float(point_a[3][0]), "beta": float(point_a[4][0]), "frontier_exponent": float(ga)},
            "variant": {"alpha": float(point_b[3][0]), "beta": float(point_b[4][0]), "frontier_exponent": float(gb)},
            "frontier_exponent_difference": float(gb - ga), "difference_ci95": ci, "differ": differ,
            "log10_k_per_decade": trend, "how": how}


# The numerical frontier's error in log k (its grid and parabola refinement: about 3e-5 measured on two
# identical laws); a |log k| below this is no difference between the recipes.
LOG_K_TOLERANCE = 1e-4


def crossover(grid_c: np.ndarray, k: np.ndarray, lo: float, hi: float) -> dict | None:
    """The budget where the fitted frontiers cross (k = 1), if they do on the curve's span."""
    lk = np.log(np.where(np.isfinite(k) & (k > 0), k, np.nan))
    lk = np.where(np.abs(lk) < LOG_K_TOLERANCE, 0.0, lk)     # equal frontiers (k = 1 to within it) never cross
    for j in range(len(grid_c) - 1):
        if np.isfinite(lk[j]) and np.isfinite(lk[j + 1]) and lk[j] * lk[j + 1] < 0:
            t = lk[j] / (lk[j] - lk[j + 1])
            c = float(np.exp(np.log(grid_c[j]) + t * np.log(grid_c[j + 1] / grid_c[j])))
            where = "within the runs" if lo <= c <= hi else ("beyond the runs" if c > hi else "below the runs")
            return {"flops": c, "where": where,
                    "winner_above": "variant" if lk[j + 1] > 0 else "baseline"}
    return None


def rung_report(a: Study, b: Study, multiplier: dict) -> dict:
    """Loss difference (variant - baseline) at every rung both trained (matched by run name, so the same
    shape and D), the winner per rung, and whether the small rungs' winner is the extrapolated one."""
    by_name = {p["name"]: p for p in b.points}
    rows = []
    for p in sorted(a.points, key=lambda p: 6 * p["N"] * p["D"]):
        q = by_name.get(p["name"])
        if q is None:
            continue
        diff = q["loss"] - p["loss"]
        rows.append({"name": p["name"], "N_baseline": p["N"], "N_variant": q["N"], "D": p["D"],
                     "loss_baseline": p["loss"], "loss_variant": q["loss"], "difference": diff,
                     "winner": "variant" if diff < 0 else "baseline" if diff > 0 else "tie"})
    far = multiplier[budget_key(max(FAR_BUDGETS))]
    k_far = k_value(far)
    extrapolated = None if np.isnan(k_far) else "tie" if abs(math.log(k_far)) < LOG_K_TOLERANCE else (
        "variant" if k_far > 1 else "baseline")
    small = rows[: max(1, len(rows) // 3)]                  # the cheapest third of the common rungs
    small_mean = float(np.mean([r["difference"] for r in small])) if small else None
    small_winner = None if small_mean is None else (
        "variant" if small_mean < 0 else "baseline" if small_mean > 0 else "tie")
    for r in rows:
        r["agrees_with_extrapolated"] = r["winner"] == extrapolated
    return {"rows": rows, "n_common": len(rows), "small_rungs": [r["name"] for r in small],
            "small_rungs_mean_difference": small_mean, "small_rungs_winner": small_winner,
            "extrapolated_winner": extrapolated, "extrapolated_at_flops": far["flops"],
            "rank_stable": (small_winner == extrapolated) if rows else None,
            "share_of_rungs_agreeing": (float(np.mean([r["agrees_with_extrapolated"] for r in rows]))
                                        if rows else None)}


def k_value(entry: dict) -> float:
    """The entry's k as a number: inf where unbounded (the variant's loss below the baseline's floor)."""
    return math.inf if entry.get("k_unbounded") else (math.nan if entry["k"] is None else entry["k"])


def k_text(entry: dict) -> str:
    ci = entry["ci95"]
    fmt = lambda v: "inf" if v is None else f"{v:.3g}"   # noqa: E731   (None in a ci95: unbounded)
    k = "inf" if entry.get("k_unbounded") else fmt(entry["k"]) if entry["k"] is not None else "n/a"
    return f"{k} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else f"{k} [n/a]"


def print_recipe_verdict(report: dict) -> None:
    a, b = report["baseline"], report["variant"]
    rse.log(f"baseline: {a['path']} (mode {a['mode']}, arch {a['arch']}, {a['n_runs']} runs)")
    rse.log(f"variant:  {b['path']} (mode {b['mode']}, arch {b['arch']}, {b['n_runs']} runs)")
    rse.log(f"  compute: {report['compute']}; both measured {report['measured_common_range'][0]:.3g}-"
            f"{report['measured_common_range'][1]:.3g} FLOPs")
    sf = report["shared_fit"]
    ci = sf["E_ci95"]
    rse.log(f"  fit: {report['fit']}: E {sf['E']:.3f} [{num(ci and ci[0], '.3f')}, {num(ci and ci[1], '.3f')}] "
            f"(own fits: baseline {a['joint']['E']:.3f}, variant {b['joint']['E']:.3f})")
    rse.log(f"  {'budget':<28} {'FLOPs':>9}  k (95% CI, {report['n_paired_draws']} paired draws)")
    for key, m in report["multiplier"].items():
        note = "  (extrapolation)" if m["extrapolation"] else ""
        rse.log(f"  {key:<28} {m['flops']:>9.3g}  {k_text(m)}{note}")
    e = report["exponents"]
    for role in ("baseline", "variant"):
        x = e[role]
        rse.log(f"  {role:<9} alpha {x['alpha']:.3f}  beta {x['beta']:.3f}  frontier exponent "
                f"{x['frontier_exponent']:.3f}")
    rse.log(f"  exponents: {e['how']}")
    c = report["crossover"]
    rse.log("  crossover: " + (f"the frontiers cross at {c['flops']:.3g} FLOPs ({c['where']}); above it the "
                                f"{c['winner_above']} wins" if c else "none between a decade below the runs and 1e21"))
    r = report["rungs"]
    rse.log(f"  rungs both trained: {r['n_common']}; variant better at "
            f"{sum(x['winner'] == 'variant' for x in r['rows'])}")
    for x in r["rows"]:
        rse.log(f"    {x['name']:<22} N {rse.format_count(x['N_baseline']):>6}/{rse.format_count(x['N_variant']):<6} "
                f"D {rse.format_count(x['D']):>6}  {x['loss_baseline']:.4f} -> {x['loss_variant']:.4f} "
                f"({x['difference']:+.4f}, {x['winner']})")
    rse.log(f"  rank stability: small rungs' winner {r['small_rungs_winner']}, extrapolated winner at "
            f"{r['extrapolated_at_flops']:.0e} {r['extrapolated_winner']}: "
            f"{'stable' if r['rank_stable'] else 'NOT stable'}")


def build_recipe_figure(report: dict, a: Study, b: Study):
    """Left: both frontiers L*(C), each study's own fit with its 95% band and the shared-E fit's (dashed),
    and every run at its compute; right: k(C) with its band, the common measured range shaded, k = 1
    marked."""
    fig, (ax_f, ax_k) = rse.plt.subplots(1, 2, figsize=(15, 6))
    grid = np.array(report["multiplier_curve"]["flops"])
    real = report["compute"].startswith("FLOPs per token")
    for s, color, role in ((a, "tab:blue", "baseline"), (b, "tab:orange", "variant")):
        params = law_params(s.joint)
        overhead = report[role]["flops_per_token_overhead"]
        loss, _ = frontier(params, np.log(grid), overhead)
        draws, _ = frontier(rse._joint_params(s.joint["_samples"]), np.log(grid), overhead)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(draws, [2.5, 97.5], axis=0)
        info = report[role]
        ax_f.plot(grid, loss[0], color=color, lw=1.8, label=f"{role} ({info['arch']}) frontier: E {s.joint['E']:.3g}, "
                                                            f"alpha {s.joint['alpha']:.3f}, beta {s.joint['beta']:.3f}")
        ax_f.fill_between(grid, lo, hi, color=color, alpha=0.2)
        shared, _ = frontier(law_params(report["shared_fit"]["laws"][role]), np.log(grid), overhead)
        ax_f.plot(grid, shared[0], color=color, lw=1.2, ls="--",
                  label=f"{role} in the shared-E fit (E {report['shared_fit']['E']:.3g}): k is read from these")
        ax_f.scatter(study_flops(s, real), [p["loss"] for p in s.points], color=color, s=18, zorder=5,
                     label=f"{role} runs")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("training compute C (FLOPs)")
    ax_f.set_ylabel("validation loss (nats/token)")
    ax_f.set_title("compute-optimal frontiers (95% bands) and the runs", fontsize=11)
    ax_f.grid(True, which="both", alpha=0.3)
    ax_f.legend(fontsize=8)
    cur = report["multiplier_curve"]
    nan = lambda xs: np.array([np.nan if v is None else v for v in xs], float)   # noqa: E731
    ax_k.plot(grid, nan(cur["k"]), color="black", lw=1.8, label="k(C), fitted")
    hi_band = np.array([K_AXIS_MAX * 10 if v is None else v for v in cur["hi"]], float)    # None: unbounded
    ax_k.fill_between(grid, nan(cur["lo"]), hi_band, color="gray", alpha=0.3, label="95% band (paired draws)")
    lo_c, hi_c = report["measured_common_range"]
    ax_k.axvspan(lo_c, hi_c, color="tab:green", alpha=0.15, label="both studies measured")
    ax_k.axhline(1.0, color="tab:red", ls=":", lw=1.2, label="k = 1: no difference")
    unbounded = []
    for key, m in report["multiplier"].items():
        if m["k"] is not None:
            ax_k.plot(m["flops"], m["k"], "o", color="black", mfc="white" if m["extrapolation"] else "black")
        elif m["k_unbounded"]:
            unbounded.append(f"{m['flops']:.0e}")
    if unbounded:
        ax_k.text(0.98, 0.97, f"k unbounded at {', '.join(unbounded)} FLOPs: the variant's frontier falls below "
                  f"the baseline's floor E", transform=ax_k.transAxes, ha="right", va="top", fontsize=8)
    shown = [v for v in nan(cur["k"])[(grid >= lo_c / 10) & (grid <= max(hi_c * 1e3, 1e18))] if np.isfinite(v)]
    if shown:
        ax_k.set_ylim(max(K_AXIS_MIN, min(min(shown), 1.0) / 3), min(K_AXIS_MAX, max(max(shown), 1.0) * 3))
    ax_k.set_xscale("log")
    ax_k.set_yscale("log")
    ax_k.set_xlim(grid[0], grid[-1])
    ax_k.set_xlabel("compute C of the variant (FLOPs)")
    ax_k.set_ylabel("effective-compute multiplier k(C)")
    near = report["multiplier"]["at_largest_common_budget"]
    ax_k.set_title(f"k = {k_text(near)} at {near['flops']:.3g} FLOPs (open: extrapolations)", fontsize=11)
    ax_k.grid(True, which="both", alpha=0.3)
    ax_k.legend(fontsize=8)
    fig.suptitle(f"does the variant scale? {Path(report['variant']['path']).parent.name} "
                 f"({report['variant']['arch']}) vs baseline {Path(report['baseline']['path']).parent.name} "
                 f"({report['baseline']['arch']})", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def run_recipe_comparison(args) -> int:
    try:
        if not (args.a and args.b):
            raise rse.UserError("--a BASELINE and --b VARIANT go together: give both results folders")
        a = load_study(args.a, "a", args.bootstrap, rse.BOOTSTRAP_SEED)
        b = load_study(args.b, "b", args.bootstrap, rse.BOOTSTRAP_SEED + 1)
        report = compare_recipes(a, b)
        out_dir = Path(args.output_dir)
        rse.prepare_output_dir(out_dir)
    except rse.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    rse.write_json_atomic(out_dir / "comparison_report.json", report)
    print_recipe_verdict(report)
    figure = out_dir / "recipe_comparison.png"
    try:
        rse.save_figure_atomic(build_recipe_figure(report, a, b), figure)
    except Exception as e:       # the report is already on disk; say what failed and go on
        rse.log(f"figure: could not draw {figure.name} ({type(e).__name__}: {e})")
    rse.log(f"  report: {out_dir / 'comparison_report.json'}")
    rse.log(f"  figure: {figure}")
    return 0


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = rse._Parser(description="Compare a simulated and a real scaling study: fits, exponents with "
                                "intervals, predictions, residuals.")
    p.add_argument("--sim", default=DEFAULT_SIM, help=f"results folder or results.json (default {DEFAULT_SIM})")
    p.add_argument("--real", default=DEFAULT_REAL, help=f"results folder or results.json (default {DEFAULT_REAL})")
    p.add_argument("--output-dir", default="comparison_results", help="default comparison_results")
    g = p.add_argument_group("two recipes: the effective-compute multiplier")
    g.add_argument("--a", metavar="BASELINE", help="the baseline recipe's results folder or results.json")
    g.add_argument("--b", metavar="VARIANT", help="the variant recipe's results folder or results.json")
    g.add_argument("--bootstrap", type=rse.positive_int, default=rse.N_BOOTSTRAP,
                   help=f"bootstrap draws of each joint law behind the multiplier's interval (default {rse.N_BOOTSTRAP})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.a or args.b:
        return run_recipe_comparison(args)
    try:
        real, real_path = load_results(args.real, "real")
        if results_path(args.sim).exists():
            sim, sim_path = load_results(args.sim, "sim")
        else:
            sim, sim_path = simulate_for(real, results_path(args.sim))
        out_dir = Path(args.output_dir)
        rse.prepare_output_dir(out_dir)
    except rse.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    report = compare(sim, real, sim_path, real_path)
    rse.write_json_atomic(out_dir / "comparison_report.json", report)
    print_verdict(report)
    try:
        rse.save_figure_atomic(build_comparison_figure(sim, real, report), out_dir / "quick_vs_real_comparison.png")
    except Exception as e:       # the report is already on disk; say what failed and go on
        rse.log(f"figure: could not draw quick_vs_real_comparison.png ({type(e).__name__}: {e})")
    rse.log(f"  report: {out_dir / 'comparison_report.json'}")
    rse.log(f"  figure: {out_dir / 'quick_vs_real_comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

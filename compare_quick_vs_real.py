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
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse

SWEEPS = {"params": ("n_params_nonembedding", "N"), "data": ("tokens", "D")}
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


def load_results(text: str, role: str) -> tuple[dict, Path]:
    path = results_path(text)
    flag = "--sim" if role == "sim" else "--real"
    if not path.is_file():
        raise rse.UserError(f"{flag}: no results at {path}; create them with `{creating_command(path, role)}` "
                            f"or pass {flag} PATH")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise rse.UserError(f"{flag}: cannot read {path} as JSON ({e}); rerun "
                            f"`{creating_command(path, role)}`") from None
    if not isinstance(results, dict) or not isinstance(results.get("experiments"), list):
        raise rse.UserError(f"{flag}: {path} is not a results.json of the runner or the demo (no "
                            f"'experiments' list)")
    return results, path


def simulate_for(real: dict, sim_file: Path) -> tuple[dict, Path]:
    """The demo's study of the real run's mode, written where --sim points: Chinchilla's law, or
    Kaplan's where the mode's runs lie too far outside Chinchilla's (tiny)."""
    mode = real.get("mode") if real.get("mode") in rse.PRESETS else "quick"
    folder = sim_file.parent
    for law in demo.LAWS:
        try:
            results = demo.simulated_study(["--mode", mode], law, demo.DEFAULT_NOISE, 0, folder)
            break
        except rse.UserError:
            if law == demo.LAWS[-1]:
                raise
    rse.prepare_output_dir(folder)
    rse.finish_results(results, folder)
    rse.log(f"sim: no results at {sim_file}; simulated mode '{mode}' under the {law} law there (as `python "
            f"quick_scaling_demo.py --mode {mode} --law {law} --output-dir {folder}` would)")
    return results, folder / "results.json"


def fits_of(results: dict) -> tuple[dict, list, str]:
    """The file's fits and predictions, or, for a run that has not finished (its fits still empty),
    fits made here with the runner's own code from its completed experiments."""
    fits = results.get("fits") or {}
    if all(isinstance(fits.get(s), dict) and "available" in fits[s] for s in SWEEPS):
        return fits, results.get("predictions") or [], "results.json"
    fits = rse.fit_sweeps(results["experiments"])
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


def fit_record(fit: dict, experiments: list, sweep: str) -> dict:
    key = SWEEPS[sweep][0]
    xs = [r[key] for r in rse.usable_runs(experiments, sweep)]
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
            "vocab_size": corpus.get("vocab_size"), "n_experiments": len(results["experiments"])}


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
        sf = fit_record(s_fits.get(sweep, {}), sim["experiments"], sweep)
        rf = fit_record(r_fits.get(sweep, {}), real["experiments"], sweep)
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


def residuals(experiments: list, sweep: str, fit: dict):
    """(x, relative residual) of a sweep's usable runs about its fit: (measured - fitted) / fitted."""
    key = SWEEPS[sweep][0]
    runs = rse.usable_runs(experiments, sweep)
    x = np.array([r[key] for r in runs], dtype=float)
    y = np.array([r["final_val_loss"] for r in runs], dtype=float)
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
            runs = rse.usable_runs(data[role]["experiments"], sweep)
            ax_fit.scatter([r[key] for r in runs], [r["final_val_loss"] for r in runs], color=color,
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
                tops.append(max(r["final_val_loss"] for r in runs))
            x, res = residuals(data[role]["experiments"], sweep, fit)
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
# CLI
# ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = rse._Parser(description="Compare a simulated and a real scaling study: fits, exponents with "
                                "intervals, predictions, residuals.")
    p.add_argument("--sim", default=DEFAULT_SIM, help=f"results folder or results.json (default {DEFAULT_SIM})")
    p.add_argument("--real", default=DEFAULT_REAL, help=f"results folder or results.json (default {DEFAULT_REAL})")
    p.add_argument("--output-dir", default="comparison_results", help="default comparison_results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

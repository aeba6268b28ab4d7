"""The guide's path (issue 14, the rest): changed settings in the default folder move the earlier results
aside, the figures and the plan's progress after every run, --dry-run, one writer per output folder, the
memory check, and how fits with a floor at its bound or a negative exponent are written. Every training
run here is the real CLI on a byte-level token file with 25K-parameter models for a few steps."""
import json
import os
import re
import signal
import subprocess
import sys

import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SCRIPT, SECONDS_SIZED, on_cpu, run_cli, run_records

pytestmark = pytest.mark.filterwarnings("ignore::scipy.optimize.OptimizeWarning")


def fast(byte_tokens, *extra):
    """SECONDS_SIZED on the byte file, smaller still: params-N25K and data-D1K (same shape), 6 steps."""
    return [*SECONDS_SIZED, "--data", byte_tokens, "--vocab-size", "256", "--param-sizes", "25K",
            "--data-sizes", "1K", "--data-model-size", "25K", "--max-steps", "6", "--eval-interval", "3",
            "--log-interval", "2", *map(str, extra)]


def popen(args, cwd):
    return subprocess.Popen([sys.executable, str(SCRIPT), *on_cpu(args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_until(proc, needle: str, seen: list[str]) -> str:
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"'{needle}' never printed:\n{''.join(seen)[-3000:]}")


def test_changed_settings_in_the_default_folder_move_the_earlier_results_aside(tmp_path, byte_tokens):
    r = run_cli(fast(byte_tokens), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / "scaling_results_tiny_v2"
    assert json.loads((folder / "results.json").read_text())["config"]["steps"] == 6

    r = run_cli(fast(byte_tokens, "--max-steps", "8"), tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    archives = list(folder.glob("previous-*"))
    assert len(archives) == 1
    old = json.loads((archives[0] / "results.json").read_text())
    assert old["config"]["steps"] == 6 and (archives[0] / "runs" / "params-N25K-seed0.json").exists()
    moved = [line for line in r.stdout.splitlines() if "moved the earlier" in line]
    assert len(moved) == 1 and "steps 6 -> 8 (--max-steps" in moved[0] and str(archives[0].relative_to(tmp_path)) in moved[0]
    assert moved[0].startswith("settings changed (") and "in the default output folder" in moved[0]
    new = json.loads((folder / "results.json").read_text())
    params = [e for e in run_records(folder) if rse.ROLE_N in rse.roles_of(e)]
    assert new["config"]["steps"] == 8 and params[0]["steps_done"] == 8
    assert "resume:" not in r.stdout                       # started over, nothing taken from the old runs

    # the same folder named with --output-dir: the refusal, in one line, before any work
    r = run_cli(fast(byte_tokens, "--max-steps", "6", "--output-dir", folder), tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "steps 8 -> 6 (--max-steps" in r.stderr
    assert "holds results made with other settings" in r.stderr
    assert len(list(folder.glob("previous-*"))) == 1


def test_figure_and_progress_after_every_run(tmp_path, byte_tokens):
    out = tmp_path / "out"
    proc = popen(fast(byte_tokens, "--output-dir", out), tmp_path)
    seen: list[str] = []
    first = read_until(proc, "progress: 1/2 runs", seen)
    png = out / "scaling_laws_complete.png"
    assert png.exists() and png.stat().st_size > 10_000          # drawn before the second run starts
    assert not list(out.glob(".*.tmp*"))                          # written atomically: no leftover
    redrawn = [line for line in seen if line.startswith("figure: redrawn")]
    assert len(redrawn) == 1 and "interim: 1 of 2 runs, 100 bootstrap resamples" in redrawn[0]
    rest = proc.stdout.read()              # communicate() would skip what the line iterator buffered
    assert proc.wait(timeout=300) == 0
    log = "".join(seen) + rest
    res = json.loads((out / "results.json").read_text())
    t1, t2 = (p["D"] for p in res["points"])
    assert (t1, t2) == (6 * 8 * 64, 2 * 8 * 64)                   # 6 steps; D = 1K needs 2 steps
    assert first.startswith(f"progress: 1/2 runs, {rse.format_count(t1)}/{rse.format_count(t1 + t2)} tokens "
                            f"({100 * t1 / (t1 + t2):.0f}%), elapsed ")
    assert "left (from the speed so far)" in first
    last = [line for line in log.splitlines() if line.startswith("progress: 2/2 runs")]
    assert len(last) == 1 and f"{rse.format_count(t1 + t2)}/{rse.format_count(t1 + t2)} tokens (100%)" in last[0]
    assert "left" not in last[0]
    assert log.count("figure: redrawn") == 1                      # the last run's figure is the final one
    assert log.index("figure: redrawn") < log.index("experiment 2/2")


def test_plan_progress_time_left():
    cfg = rse.RunConfig(mode="tiny", param_sizes=[25_000, 100_000], data_sizes=[40_000],
                        data_model_size=25_000, steps=10, batch_size=4, grad_accum=1, context_length=100,
                        vocab_size=512, lr=None)
    plan = rse.build_plan(cfg, rse.PRESETS["tiny"])
    a, b, c = plan
    p = rse.plan_progress(plan, {a.run_id}, {a.run_id}, 12.0, None)
    assert (p["runs_done"], p["runs_total"]) == (1, 3)
    assert (p["tokens_done"], p["tokens_total"]) == (4_000, 4_000 + 4_000 + 40_000)
    assert p["left_s"] == pytest.approx(12.0 / a.flops * (b.flops + c.flops))
    assert p["left_from"] == "from the speed so far"
    # a run finished earlier is done but not part of the measured speed
    p = rse.plan_progress(plan, {a.run_id, b.run_id}, {b.run_id}, 5.0, None)
    assert p["left_s"] == pytest.approx(5.0 / b.flops * c.flops)
    p = rse.plan_progress(plan, {a.run_id}, {a.run_id}, 12.0, {a.name: 1.0, b.name: 2.0, c.name: 30.0})
    assert p["left_s"] == 32.0 and p["left_from"] == "from the plan's estimate"
    assert rse.plan_progress(plan, {a.run_id}, set(), 0.0, None)["left_s"] is None
    assert rse.progress_line({**p, "elapsed_s": 75.0}) == (
        "progress: 1/3 runs, 4K/48K tokens (8%), elapsed 1m15s, about 32s left (from the plan's estimate)")


def test_dry_run_without_estimate_prepares_nothing(tmp_path):
    cache = tmp_path / "cache"
    r = run_cli(["--mode", "quick", "--data", "builtin", "--dry-run", "--no-estimate", "--cache-dir", cache],
                tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split()[0] for line in r.stdout.splitlines() if re.match(r"  (params|data)-", line)]
    assert rows == ["params-N5M", "params-N20M", "params-N50M", "data-D10M", "data-D50M", "data-D100M"]
    n_chars = sum(p.stat().st_size for p in rse.builtin_corpus_files()[1])
    n_train = round(n_chars * 0.95 / 3.0)
    assert f"data: {rse.format_count(n_train)} training tokens (estimated from its" in r.stdout
    assert f"data-D100M {100_000_000 / n_train:.2f} epochs" in r.stdout
    assert "data-D50M, data-D100M read more than 4 epochs" in r.stdout
    assert "memory: the largest run (params-N50M) needs about" in r.stdout
    assert "dry run: nothing prepared, trained or written" in r.stdout
    assert list(tmp_path.iterdir()) == []                          # no output folder, no cache


def test_dry_run_times_the_plan_on_random_tokens(tmp_path, byte_tokens):
    r = run_cli([a for a in fast(byte_tokens) if a != "--no-estimate"] + ["--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if re.match(r"  (params|data)-", line)]
    assert len(rows) == 2 and all(not line.rstrip().endswith(" -") for line in rows)
    assert "estimated training time:" in r.stdout
    n_train = len(rse.load_token_file(byte_tokens, 256).train)
    assert f"data: {rse.format_count(n_train)} training tokens (the token file)" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_one_writer_per_folder_and_a_killed_run_does_not_block(tmp_path, byte_tokens):
    out = tmp_path / "out"
    args = fast(byte_tokens, "--max-steps", "400", "--checkpoint-every", "2steps", "--output-dir", out)
    first = popen(args, tmp_path)
    seen: list[str] = []
    try:
        read_until(first, "[params-N25K-seed0] step 4/400", seen)
        second = run_cli(args, tmp_path, timeout=60)                # refused at once: it does not wait
        assert second.returncode == 2
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"is in use by another run (pid {first.pid} on " in line
        assert ", started 20" in line and second.stdout == ""
        assert first.poll() is None                                 # the first is not disturbed
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    held = (out / ".results.json.lock").read_text()
    assert held.startswith(f"pid {first.pid} ")                   # the dead run's leftover text stays...
    r = run_cli(args, tmp_path)                                   # ...and blocks nothing: it resumes
    assert r.returncode == 0, r.stderr[-2000:]
    assert "continuing params-N25K-seed0 from checkpoints" in r.stdout
    assert [e["steps_done"] for e in run_records(out)] == [400, 2]


def test_a_run_that_cannot_fit_in_memory_is_refused(tmp_path, byte_tokens):
    # tiny's own sizes at 100K tokens per sequence (under WSD, 6.4M tokens per step leave the shortest
    # horizon a 1-step branch, refused in its own words); at 10M (cosine): ~8 TB, more than any host's RAM
    r = run_cli(["--mode", "tiny", "--context-length", "100000", "--output-dir", tmp_path / "out"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: data-D999K: a WSD branch of 1 steps would start its cooldown at step 0, inside the 39-step warmup; "
        "choose longer horizons (or fewer tokens per step)")
    r = run_cli(["--mode", "tiny", "--schedule", "cosine", "--context-length", "10000000", "--output-dir",
                 tmp_path / "out"], tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: params-N400K would need about 8213.6 GB")
    assert "at batch 64 x context 10000000, more than this machine's RAM" in line and "--context-length" in line
    assert "data:" not in r.stdout                                 # refused before the corpus is read
    # a context longer than the corpus: one line too, not a traceback
    r = run_cli(fast(byte_tokens, "--context-length", "100000", "--output-dir", tmp_path / "out"), tmp_path)
    assert r.returncode == 2 and "is longer than this corpus's validation split" in r.stderr
    cfg = rse.RunConfig(mode="tiny", param_sizes=[25_000], data_sizes=[1_000], data_model_size=25_000,
                        steps=10, batch_size=8, grad_accum=1, context_length=100_000, vocab_size=256, lr=None)
    runs = rse.build_plan(cfg, rse.PRESETS["tiny"])
    need = rse.estimated_run_memory_bytes(runs[0], cfg)
    one = rse.estimated_run_memory_bytes(runs[0], rse.dataclasses.replace(cfg, batch_size=1))
    # CUDA retries smaller micro-batches: only a run that cannot fit one sequence is refused
    assert "needs about" in rse.check_run_memory(runs, cfg, "cuda", ((need + one) // 2, "the GPU's memory"))
    with pytest.raises(rse.UserError, match="at one sequence per micro-batch"):
        rse.check_run_memory(runs, cfg, "cuda", (one - 1, "the GPU's memory"))
    with pytest.raises(rse.UserError):
        rse.check_run_memory(runs, cfg, "cpu", (need - 1, "this machine's RAM"))


def fit_results(c_at_bound: bool, b: float) -> dict:
    fit = {"available": True, "c": 2.294e-67 if c_at_bound else 1.5, "a": 15.63, "b": b, "r2": 0.99,
           "n_points": 4, "dof": 1, "ci95": {}, "note": None, "c_at_bound": c_at_bound}
    return {"fits": {"params": fit, "data": {"available": False, "reason": "no runs", "n_points": 0},
                     "joint": {"available": False, "reason": "too few runs"}},
            "holdout": {}, "compute_optimal": {}, "predictions": []}


def test_a_floor_at_its_bound_and_a_negative_exponent_are_written_plainly(capsys):
    results = fit_results(True, 0.1766)
    rse.flag_rising_losses(results["fits"])
    rse.log_fit_summary(results)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("  fit params: L = 0 (at its bound) + 15.63/x^0.1766  R2 0.9900")
    assert results["fits"]["params"]["loss_rises"] is False and "e-67" not in line
    results = fit_results(False, -0.0003)
    rse.flag_rising_losses(results["fits"])
    rse.log_fit_summary(results)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("  fit params: L = 1.5 + 15.63 * x^+0.0003  R2")
    assert "the loss did not fall with N" in line and "^--" not in line and "^-0" not in line
    assert results["fits"]["params"]["loss_rises"] is True
    joint = {"available": True, "E": 1e-70, "E_at_bound": True, "A": 400.0, "B": 300.0, "alpha": 0.34,
             "beta": -0.02, "r2": 0.9, "n_points": 9}
    fits = {"joint": joint}
    rse.flag_rising_losses(fits)
    assert joint["loss_rises_with"] == ["D"] and joint["note"].startswith("the loss did not fall with D")
    rse.log_fit_summary({"fits": fits, "holdout": {}, "compute_optimal": {}, "predictions": []})
    assert "joint fit: L = 0 (at its bound) + 400/N^0.3400 + 300 * D^+0.0200  R2" in capsys.readouterr().out


def curve_run(sweep: str, n: int, d: int, loss: float) -> dict:
    """An old-style run record with its curve; the name makes its run_id unique within the figure."""
    return {"name": f"{sweep}-N{n}-D{d}", "sweep": sweep, "status": "completed", "n_params_nonembedding": n,
            "tokens": d, "seed": 0, "final_val_loss": loss,
            "curve": {"tokens": [1, d], "train_loss": [6, loss], "eval_tokens": [1, d], "val_loss": [6, loss]}}


def test_figure_legend_and_panel_colours():
    results = fit_results(True, -0.05)
    rse.flag_rising_losses(results["fits"])
    runs = [curve_run("params", n, 10_000, 3.0) for n in (10_000, 40_000, 160_000)] + \
           [curve_run("data", 40_000, d, 3.0) for d in (10_000, 40_000)]
    results["points"] = rse.as_points(runs)
    curves = {p["run_id"]: r["curve"] for p, r in zip(results["points"], runs)}
    assert len(curves) == len(runs)
    fig = rse.build_scaling_figure(results, curves)
    try:
        ax1, ax2, ax3, ax4 = fig.axes[:4]
        legend = [t.get_text() for t in ax1.get_legend().get_texts()]
        fit_label = next(t for t in legend if t.startswith("fit: L"))
        assert fit_label.startswith("fit: L = 0 (at its bound) + 15.6 * N^+0.050")
        assert "the loss did not fall with N" in fit_label and "^--" not in fit_label
        cividis, viridis = rse.matplotlib.colormaps["cividis"], rse.matplotlib.colormaps["viridis"]
        dots3 = [ln.get_color() for ln in ax3.get_lines() if ln.get_marker() == "o"]
        dots4 = [ln.get_color() for ln in ax4.get_lines() if ln.get_marker() == "o"]
        assert [tuple(c) for c in dots3] == [cividis(0.0), cividis(0.5), cividis(1.0)]   # blue .. yellow
        assert [tuple(c) for c in dots4] == [viridis(0.0), viridis(1.0)]                 # purple .. yellow
    finally:
        rse.plt.close(fig)


def test_interim_figures_are_due_after_the_first_run_then_after_four_times_their_cost(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(rse.time, "time", lambda: now[0])
    clock = rse.RedrawClock()
    assert clock.due()                              # the first finished run always gets its figures
    clock.drawn(now[0] - 2.0)                       # a redraw that took 2 s, ending now
    now[0] += 7.9
    assert not clock.due()                          # a second-long run later: not yet (8 s = 4 x 2 s)
    now[0] += 0.1
    assert clock.due()
    clock.drawn(now[0] - 0.5)                       # cheaper redraws are due sooner
    now[0] += 2.0
    assert clock.due()

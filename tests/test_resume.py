"""Long runs survive (issue 5): resume after SIGKILL and SIGTERM, exact checkpoints, divergence, repeated
seeds, out-of-memory retries, a guarded output folder and the early checks. Every run here is the real CLI
on a byte-level token file (no tokenizer to train) with models of 25K and 100K parameters for 16-32 steps."""
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SCRIPT, on_cpu, run_records
from inject import patch_failures

pytestmark = pytest.mark.filterwarnings("ignore::scipy.optimize.OptimizeWarning")


def small_args(byte_tokens, out, *extra):
    return [str(a) for a in [
            "--mode", "tiny", "--schedule", "cosine", "--data", byte_tokens, "--vocab-size", "256",
            "--param-sizes", "25K,100K",
            "--data-sizes", "1K,2K", "--max-steps", "12", "--batch-size", "4", "--context-length", "32",
            "--eval-interval", "6", "--eval-batches", "1", "--log-interval", "3", "--no-estimate",
            "--checkpoint-every", "3steps", "--output-dir", out, *extra]]


class _SignalOnLine(io.StringIO):
    """A stdout that sends `sig` to this very process when a line containing `trigger` is written."""

    def __init__(self, trigger, sig):
        super().__init__()
        self.trigger, self.sig, self.sent = trigger, sig, False

    def write(self, text):
        n = super().write(text)
        if self.trigger and not self.sent and self.trigger in text:
            self.sent = True
            os.kill(os.getpid(), self.sig)
        return n


def main_in_process(args, env_extra=None, signal_on=None) -> tuple[int, str, str]:
    """The CLI's own main() with its argv, in this process (saves the seconds of importing torch in a
    new one). signal_on=(line, signal): deliver a real signal to this process when the log prints it."""
    import contextlib
    out, err = _SignalOnLine(*(signal_on or (None, None))), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env_extra or {})}
    os.environ.update(env_extra or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = rse.main([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


def cli(args, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *on_cpu(args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_and_signal(args, cwd, wait_for: str, sig) -> tuple[int, str, str]:
    """Start the CLI, send `sig` as soon as a stdout line contains `wait_for`, return (rc, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, str(SCRIPT), *on_cpu(args)], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if wait_for in line:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=120)
    return p.returncode, "".join(lines) + out, err


def load(out: Path) -> tuple[dict, list[dict]]:
    """A study folder's results.json and its runs' full records (curves live only under runs/)."""
    return json.loads((out / "results.json").read_text()), run_records(out)


def assert_same_results(a: tuple[dict, list[dict]], b: tuple[dict, list[dict]]):
    """Bit-for-bit the same training outcome: losses, curves, the points table and fits."""
    (res_a, runs_a), (res_b, runs_b) = a, b
    assert [e["run_id"] for e in runs_a] == [e["run_id"] for e in runs_b]
    for x, y in zip(runs_a, runs_b):
        assert y["status"] == x["status"] == "completed"
        assert y["final_val_loss"] == x["final_val_loss"], x["run_id"]
        assert y["initial_loss"] == x["initial_loss"]
        assert y["curve"] == x["curve"], x["run_id"]
        assert y["experiment_hash"] == x["experiment_hash"]
    assert res_a["points"] == res_b["points"]
    assert res_a["fits"] == res_b["fits"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, byte_tokens):
    """One uninterrupted run, the reference for every resume test."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    rc, _, err = main_in_process(small_args(byte_tokens, out))
    assert rc == 0, err[-2000:]
    return out, load(out)


def test_baseline_records_and_removes_checkpoints(baseline):
    out, (res, exps) = baseline
    assert [e["run_id"] for e in exps] == ["params-N25K-seed0", "params-N100K-seed0", "data-D1K-seed0",
                                           "data-D2K-seed0"]
    assert [e["steps"] for e in exps] == [12, 12, 8, 16]                # D / (4 x 32) tokens per step
    for e in exps:
        assert e["status"] == "completed" and e["final_val_loss"] < e["initial_loss"] - 0.3     # it learned
        assert e["resumed_at_steps"] == [] and e["seed"] == 0
        assert (out / "runs" / f"{e['run_id']}.json").exists()
    assert list((out / "checkpoints").iterdir()) == []                  # removed once each run was recorded
    assert res["fits"]["params"]["available"] and res["fits"]["data"]["available"]


def test_sigkill_mid_experiment_then_same_command_gives_identical_results(tmp_path, byte_tokens, baseline):
    out = tmp_path / "out"
    args = small_args(byte_tokens, out)
    rc, stdout, _ = start_and_signal(args, tmp_path, "[params-N100K-seed0] checkpoint at step 3/12",
                                     signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # killed inside the second experiment: the first is recorded, the second only has its checkpoint
    assert (out / "runs" / "params-N25K-seed0.json").exists()
    assert not (out / "runs" / "params-N100K-seed0.json").exists()
    assert (out / "checkpoints" / "params-N100K-seed0.pt").exists()
    rc, stdout, stderr = main_in_process(args)                          # the same command again
    assert rc == 0, stderr[-2000:]
    assert "resume: 1 of 4 runs finished earlier" in stdout
    assert "[params-N25K-seed0] start" not in stdout                     # not retrained
    res, runs = load(out)
    resumed = runs[1]["resumed_at_steps"]
    assert len(resumed) == 1 and 3 <= resumed[0] < 12                    # continued mid-run, not from 0
    assert_same_results(baseline[1], (res, runs))
    assert list((out / "checkpoints").iterdir()) == []


def test_sigterm_checkpoints_writes_results_and_says_how_to_resume(tmp_path, byte_tokens, baseline):
    """In this process: the handler is the one main() installs, the signal a real SIGTERM."""
    out = tmp_path / "out"
    args = small_args(byte_tokens, out, "--checkpoint-every", "1h")      # only the signal checkpoints
    rc, stdout, stderr = main_in_process(args, signal_on=("[data-D1K-seed0] step 3/8", signal.SIGTERM))
    assert rc == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM: saving a checkpoint" in stdout
    last = stderr.strip().splitlines()[-1]
    assert "interrupted by SIGTERM in data-D1K-seed0 at step" in last
    assert "Resume with the same command: python run_scaling_experiments_enhanced.py --mode tiny" in last
    assert "--checkpoint-every 1h" in last
    res, runs = load(out)
    assert [e["status"] for e in runs] == ["completed", "completed", "interrupted"]
    assert [p["status"] for p in res["points"]] == ["completed", "completed", "interrupted"]
    # an interrupted run has no record under runs/ (those are finished runs): where it stopped is in the
    # message and in its checkpoint
    stopped_at = int(last.split("interrupted by SIGTERM in data-D1K-seed0 at step ")[1].split("/8")[0])
    assert 3 <= stopped_at < 8
    assert rse.read_checkpoint_header(out / "checkpoints" / "data-D1K-seed0.pt")["step"] == stopped_at
    assert res["fits"]["params"]["available"]                           # fits of the finished runs
    assert (out / "checkpoints" / "data-D1K-seed0.pt").exists()
    rc, stdout, stderr = main_in_process(args)
    assert rc == 0, stderr[-2000:]
    assert "resuming from its checkpoint at step 3/8" in stdout
    assert_same_results(baseline[1], load(out))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL             # main() put the default back


@pytest.fixture(scope="module")
def two_seeds_with_nan(tmp_path_factory, byte_tokens):
    out = tmp_path_factory.mktemp("seeds") / "out"
    with pytest.MonkeyPatch.context() as mp:
        patch_failures(mp.setattr, nan="params-N100K-seed1:5")
        rc, stdout, err = main_in_process(small_args(byte_tokens, out, "--seeds", "2"))
    assert rc == 0, err[-2000:]
    return stdout, load(out)


def test_injected_nan_marks_one_run_diverged_and_leaves_the_rest(two_seeds_with_nan):
    stdout, (res, runs) = two_seeds_with_nan
    bad = [e for e in runs if e["status"] != "completed"]
    assert [e["run_id"] for e in bad] == ["params-N100K-seed1"]
    d = bad[0]
    assert d["status"] == "diverged" and d["diverged_at_step"] == 5 and d["final_val_loss"] is None
    assert (d["name"], d["seed"]) == ("params-N100K", 1)
    # the last finite loss is step 4's: finite and already below the untrained loss
    assert math.isfinite(d["last_good_loss"]) and d["last_good_loss"] < d["initial_loss"] - 0.3
    assert d["curve"]["step"] == [3]                                    # nothing logged past the divergence
    assert res["excluded_from_fits"] == ["params-N100K-seed1"]
    row = next(p for p in res["points"] if p["run_id"] == "params-N100K-seed1")
    assert row["status"] == "diverged" and row["loss"] is None
    assert res["fits"]["params"]["available"] and res["fits"]["params"]["n_points"] == 3
    assert math.isfinite(res["fits"]["params"]["b"])
    assert "DIVERGED at step 5/12" in stdout and "left out of the fits: params-N100K-seed1 (diverged)" in stdout
    assert "params-N100K-seed1] diverged: non-finite loss at step 5/12" in stdout


def test_two_seeds_write_two_runs_per_experiment_and_fit_both(two_seeds_with_nan, baseline):
    _, (res, exps) = two_seeds_with_nan
    assert [(e["name"], e["seed"]) for e in exps] == [(n, s) for s in (0, 1) for n in
                                                      ("params-N25K", "params-N100K", "data-D1K", "data-D2K")]
    assert len({e["run_id"] for e in exps}) == 8
    # seed 0 is the baseline run exactly; seed 1 is a different initialisation and data order
    for e, b in zip(exps[:4], baseline[1][1]):
        assert e["final_val_loss"] == b["final_val_loss"]
    for a, b in zip(exps[:4], exps[4:]):
        if b["status"] == "completed":
            assert a["final_val_loss"] != b["final_val_loss"]
            assert abs(a["final_val_loss"] - b["final_val_loss"]) < 0.5
    assert res["fits"]["data"]["n_points"] == 4                         # both seeds of both data runs
    x = [e["tokens"] for e in exps if rse.ROLE_D in e["roles"]]
    y = [e["final_val_loss"] for e in exps if rse.ROLE_D in e["roles"]]
    refit = rse.fit_power_law(x, y)
    assert refit["b"] == pytest.approx(res["fits"]["data"]["b"])
    # the figure shows each data size's mean over the seeds with its range
    fig = rse.build_scaling_figure(res, {e["run_id"]: e["curve"] for e in exps})
    bars = [c for c in fig.axes[1].containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 1
    means = bars[0].lines[0].get_ydata()
    for i, d in enumerate(sorted(set(x))):
        ys = [v for t, v in zip(x, y) if t == d]
        assert means[i] == pytest.approx(sum(ys) / 2)


def test_corrupt_or_foreign_results_json_is_reported_not_overwritten(tmp_path, byte_tokens):
    for content in ('{"schema_version": 1, "experiments": [', '{"my": "own file"}'):
        out = tmp_path / f"out{len(content)}"
        out.mkdir()
        (out / "results.json").write_text(content)
        r = cli(small_args(byte_tokens, out), tmp_path)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "results.json" in lines[0] and "left untouched" in lines[0]
        assert (out / "results.json").read_text() == content
        assert not (out / "runs").exists()


def test_changed_setting_is_refused_and_fresh_moves_old_results_aside(tmp_path, byte_tokens, baseline):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    before = (out / "results.json").read_bytes()
    rc, _, err = main_in_process(small_args(byte_tokens, out, "--max-steps", "8", "--lr", "0.003"))
    assert rc == 2
    line = err.strip()
    assert len(line.splitlines()) == 1 and "holds results made with other settings" in line
    # the settings are compared run by run: --lr changes every run's peak LR (each from its width's rule)
    old_lr = baseline[1][1][0]["peak_lr"]
    assert "steps 12 -> 8 (--max-steps" in line and f"peak_lr {old_lr} -> 0.003 (--lr, 4 runs)" in line
    assert "--fresh" in line
    assert (out / "results.json").read_bytes() == before
    rc, _, err = main_in_process(small_args(byte_tokens, out, "--max-steps", "6", "--data-sizes", "0.5K",
                                            "--fresh"))
    assert rc == 0, err[-2000:]
    archived = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(archived) == 1
    assert (archived[0] / "results.json").read_bytes() == before
    assert sorted(p.name for p in (archived[0] / "runs").iterdir()) == sorted(
        f"{e['run_id']}.json" for e in baseline[1][1])
    _, new = load(out)
    assert [e["steps"] for e in new] == [6, 6, 4]


def test_out_of_memory_retries_with_half_the_micro_batch(tmp_path, byte_tokens, baseline, monkeypatch, capsys):
    """A CUDA out-of-memory error (simulated: the model raises torch.OutOfMemoryError for micro-batches
    over 2 sequences) is retried with micro-batches of 2 and twice the micro-steps: same results."""
    import torch
    real_forward = rse.GPT.forward

    def limited(self, idx, targets=None):
        if idx.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_forward(self, idx, targets)
    monkeypatch.setattr(rse.GPT, "forward", limited)
    out = tmp_path / "out"
    assert rse.main(small_args(byte_tokens, out, "--param-sizes", "25K", "--data-sizes", "1K")) == 0
    log = capsys.readouterr().out
    assert "out of memory with micro-batches of 4 sequences" in log and "retrying with 2 and 2 micro-steps" in log
    _, runs = load(out)
    reference = {e["run_id"]: e for e in baseline[1][1]}
    assert [e["run_id"] for e in runs] == ["params-N25K-seed0", "data-D1K-seed0"]
    for e in runs:
        b = reference[e["run_id"]]
        assert e["status"] == "completed"
        assert e["micro_batch_size"] == 2 and e["micro_steps_per_step"] == 2
        assert len(e["oom_retries"]) == 1 and e["oom_retries"][0]["micro_batch_size"] == 4
        assert e["tokens"] == b["tokens"]                                 # same effective batch
        # the same sequences per step: equal up to float summation order
        assert e["final_val_loss"] == pytest.approx(b["final_val_loss"], abs=2e-3)
        assert e["curve"]["train_loss"][0] == pytest.approx(b["curve"]["train_loss"][0], abs=1e-4)


def test_early_checks_exit_2_before_training(tmp_path, byte_tokens, monkeypatch, capsys):
    import collections
    import torch
    Usage = collections.namedtuple("Usage", "total used free")
    # a disk nearly full
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    assert rse.main(small_args(byte_tokens, tmp_path / "o1")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "only 5 MiB free" in err and "--output-dir" in err
    monkeypatch.undo()
    # data that exists but cannot be read (reading /proc/self/mem at offset 0 fails on Linux, even as root)
    if Path("/proc/self/mem").exists():
        args = small_args(byte_tokens, tmp_path / "o2")
        args[args.index("--data") + 1] = "/proc/self/mem"
        args[args.index("--vocab-size") + 1] = "512"        # a text source: the vocabulary check passes
        assert rse.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--data /proc/self/mem: cannot be read" in err
    # a device that was asked for but is missing
    missing = "cuda" if not torch.cuda.is_available() else (
        "mps" if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()) else None)
    if missing:
        assert rse.main([*small_args(byte_tokens, tmp_path / "o3"), "--device", missing]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--device {missing}" in err
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o / "results.json").exists() and not (tmp_path / o / "runs").exists()


def test_checkpoint_every_and_seeds_parsing():
    assert rse.parse_checkpoint_every("5m") == (300.0, None)
    assert rse.parse_checkpoint_every("90s") == (90.0, None)
    assert rse.parse_checkpoint_every("1h") == (3600.0, None)
    assert rse.parse_checkpoint_every("45") == (45.0, None)
    assert rse.parse_checkpoint_every("200steps") == (None, 200)
    for bad in ("0", "5 minutes", "-3s", "1.5steps", "soon"):
        with pytest.raises(rse.UserError):
            rse.parse_checkpoint_every(bad)
    assert rse.parse_seeds(None, 7) == [7]
    assert rse.parse_seeds("3", 0) == [0, 1, 2]
    assert rse.parse_seeds("3", 5) == [5, 6, 7]
    assert rse.parse_seeds("0,1,2", 9) == [0, 1, 2]
    assert rse.parse_seeds("5,", 0) == [5]
    for bad in ("0", "a,b", "-1,2"):
        with pytest.raises(rse.UserError):
            rse.parse_seeds(bad, 0)


def test_definition_hash_ignores_plan_position_and_device_but_not_settings():
    cfg = rse.RunConfig(mode="tiny", param_sizes=[25_000], data_sizes=[2048], data_model_size=100_000, steps=16,
                        batch_size=4, grad_accum=1, context_length=32, vocab_size=256, lr=None)
    exp = rse.build_plan(cfg, rse.PRESETS["tiny"])[0]
    corpus = {"sha256": "ab" * 32, "tokenizer": "pre-tokenized (.bin)", "validation_split": "last 5%"}
    h = rse.definition_hash(rse.run_definition(exp, corpus))
    wider = rse.RunConfig(**{**cfg.__dict__, "param_sizes": [25_000, 100_000], "device": "cuda"})
    assert rse.definition_hash(rse.run_definition(rse.build_plan(wider, rse.PRESETS["tiny"])[0], corpus)) == h
    import dataclasses
    for change in ({"batch_size": 8}, {"warmup_frac": 0.2}, {"eval_batches": 2}):
        # the setting given on the command line reaches the run's spec and its hash...
        other = rse.RunConfig(**{**cfg.__dict__, **change})
        assert rse.definition_hash(rse.run_definition(rse.build_plan(other, rse.PRESETS["tiny"])[0], corpus)) != h
        # ...and the hash depends on that field itself, not only on what the plan derives from it
        assert rse.definition_hash(rse.run_definition(dataclasses.replace(exp, **change), corpus)) != h
    assert rse.definition_hash(rse.run_definition(exp, {**corpus, "sha256": "cd" * 32})) != h
    assert rse.definition_hash(rse.run_definition(dataclasses.replace(exp, seed=1), corpus)) != h

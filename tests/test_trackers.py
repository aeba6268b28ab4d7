"""Runs in the tools people already use (issue 27): --tracker tensorboard and wandb (each run's curves
against tokens seen, a WSD branch as its own run, the study's fits and figures, a SIGKILLed run resumed
without a point written twice), a missing library in one line, and runs.csv, which --fit-csv refits
exactly. Every run is the real CLI on a byte-level token file: 25K and 100K parameters, 8-16 steps."""
import csv
import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse
from conftest import SCRIPT, run_records
from test_resume import main_in_process

pytestmark = pytest.mark.filterwarnings("ignore::scipy.optimize.OptimizeWarning",
                                        "ignore::DeprecationWarning", "ignore::UserWarning")

TOKENS_PER_STEP = 4 * 32
KILL_LINE = "[params-N100K-seed0] step 8/16"    # after its checkpoint at step 7 (every 3 steps, and at 4), before 10


def ladder(byte_tokens, out, *extra):
    """Four runs: two sizes with a WSD branch each at step 4 (tokens 512); the 25K runs are the data sweep."""
    return [str(a) for a in [
        "--mode", "tiny", "--data", byte_tokens, "--vocab-size", "256", "--param-sizes", "25K,100K",
        "--data-sizes", "1K,2K", "--max-steps", "16", "--batch-size", "4", "--context-length", "32",
        "--eval-interval", "4", "--eval-batches", "1", "--log-interval", "2", "--no-estimate", "--device", "cpu",
        "--bootstrap", "20", "--schedule", "wsd", "--warmup-steps", "2", "--horizons", "0.5x,1x",
        "--cooldown-frac", "0.5", "--checkpoint-every", "3steps", "--output-dir", out, *extra]]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def expected_points(e: dict) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (tokens, value) of a run's record, from where the run starts (a branch: its branch step)."""
    c, start = e["curve"], (e.get("branch_step") or 0) * TOKENS_PER_STEP
    return {"val/loss": [(t, v) for t, v in zip(c["eval_tokens"], c["val_loss"]) if t >= start],
            "train/loss": [(t, v) for t, v in zip(c["tokens"], c["train_loss"]) if t >= start]}


def kill_then_rerun(args, cwd, env_extra=None) -> tuple[int, str, str]:
    """SIGKILL the command when KILL_LINE is printed (mid-run, after a checkpoint), then run it again."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    p = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith(KILL_LINE):
            p.send_signal(signal.SIGKILL)
            break
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    return main_in_process(args, env_extra)


# --- TensorBoard -----------------------------------------------------------------------------------

def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of one run folder as (step, value), read by TensorBoard's own reader (which
    applies the purges a resumed writer asks for)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_images(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


@pytest.fixture(scope="module")
def tb_study(tmp_path_factory, byte_tokens):
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tb") / "out"
    rc, stdout, err = main_in_process(ladder(byte_tokens, out, "--tracker", "tensorboard"))
    assert rc == 0, err[-2000:]
    return out, results(out), run_records(out)


def assert_tb_curves_match(out: Path, records: list[dict]):
    for e in records:
        got = tb_scalars(out / "tb" / e["run_id"])
        for tag, points in expected_points(e).items():
            assert [s for s, _ in got[tag]] == [t for t, _ in points], (e["run_id"], tag)
            # the curves keep 5 decimals of a train loss
            assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], abs=1e-5)
        steps = [s for s, _ in got["train/loss"]]
        for tag in ("train/lr", "speed/tokens_per_s", "speed/mfu"):
            assert [s for s, _ in got[tag]] == steps or (e["branch_of"] and tag.startswith("speed")), tag


def test_tensorboard_holds_every_runs_curves_against_tokens_and_the_fits(tb_study):
    out, res, records = tb_study
    runs = {e["run_id"]: e for e in records}
    assert len(runs) == 4 and all(e["status"] == "completed" for e in runs.values())
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted([*runs, "fits"])
    assert_tb_curves_match(out, records)
    # a branch is a run of its own whose first point is its stable run's at the branch step (tokens 512)
    branch, stable = runs["params-N25K@1.02K-seed0"], runs["params-N25K-seed0"]
    got_b, got_s = tb_scalars(out / "tb" / branch["run_id"]), tb_scalars(out / "tb" / stable["run_id"])
    assert branch["branch_step"] == 4
    assert got_b["val/loss"][0] == (512, pytest.approx(dict(got_s["val/loss"])[512]))
    assert got_b["train/loss"][0] == (512, pytest.approx(dict(got_s["train/loss"])[512]))
    assert got_s["val/loss"][0] == (0, pytest.approx(stable["initial_loss"]))
    # the study: each law's numbers as summary values, both figures as images
    fits = tb_scalars(out / "tb" / "fits")
    for sweep in ("params", "data"):
        assert fits[f"fit/{sweep}_b"][-1][1] == pytest.approx(res["fits"][sweep]["b"], rel=1e-6)
        assert fits[f"fit/{sweep}_b"][-1][0] == 4                      # the runs fitted
    assert set(tb_images(out / "tb" / "fits")) == {"figures/scaling_laws_complete", "figures/compute_optimal"}


def test_sigkill_mid_run_then_rerun_writes_no_tensorboard_point_twice(tb_study, byte_tokens, tmp_path):
    _, _, ref = tb_study
    out = tmp_path / "out"
    rc, stdout, err = kill_then_rerun(ladder(byte_tokens, out, "--tracker", "tensorboard"), tmp_path)
    assert rc == 0, err[-2000:]
    assert "[params-N100K-seed0] resuming from its checkpoint at step" in stdout
    records = run_records(out)
    resumed = next(e for e in records if e["run_id"] == "params-N100K-seed0")["resumed_at_steps"]
    assert len(resumed) == 1
    # the killed process wrote points past its checkpoint; the resumed writer purged and rewrote them
    assert len(list((out / "tb" / "params-N100K-seed0").glob("events.*"))) == 2
    for e in records:
        for tag, points in tb_scalars(out / "tb" / e["run_id"]).items():
            steps = [s for s, _ in points]
            assert steps == sorted(set(steps)), (e["run_id"], tag)          # each step once, in order
    assert_tb_curves_match(out, ref)                                         # and the same as never killed


def test_parallel_children_write_each_run_once_and_the_parent_the_fits(byte_tokens, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    rc, stdout, err = main_in_process(ladder(byte_tokens, out, "--tracker", "tensorboard", "--parallel", "2"))
    assert rc == 0, err[-2000:]
    assert "parallel: 2 runs in 2 processes at once" in stdout
    res = results(out)
    runs = [p["run_id"] for p in res["points"]]
    assert sorted(p.name for p in (out / "tb").iterdir()) == sorted([*runs, "fits"])
    for run_id in runs:                                  # one writer per run: one event file each
        assert len(list((out / "tb" / run_id).glob("events.*"))) == 1, run_id
    assert_tb_curves_match(out, run_records(out))
    assert tb_scalars(out / "tb" / "fits")["fit/params_b"][-1][1] == pytest.approx(res["fits"]["params"]["b"], rel=1e-6)


# --- Weights & Biases (offline) ----------------------------------------------------------------------

def wandb_records(path: Path):
    """The records of one offline run's .wandb file (wandb 0.2x-0.3x ships no Python reader for it): a
    7-byte header, then LevelDB-style log blocks of 32 KiB whose chunks (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last) carry protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def wandb_runs(out: Path) -> dict[str, dict]:
    """name -> {'ids', 'group', 'history': [(key, step, value)], 'summary': {key: value}} over every
    offline run folder (a resumed run has one per process)."""
    runs = {}
    for f in sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))):
        name = None
        for r in wandb_records(Path(f)):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                name = r.run.display_name
                run = runs.setdefault(name, {"ids": set(), "group": r.run.run_group, "history": [], "summary": {}})
                run["ids"].add(r.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                runs[name]["history"] += [(k, r.history.step.num, v) for k, v in items.items()]
            elif kind == "summary":
                runs[name]["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                              for i in r.summary.update})
    return runs


def test_wandb_offline_holds_each_runs_history_and_a_sigkilled_run_logs_no_step_twice(
        tb_study, byte_tokens, tmp_path):
    pytest.importorskip("wandb")
    _, _, ref = tb_study
    out = tmp_path / "out"
    rc, stdout, err = kill_then_rerun(ladder(byte_tokens, out, "--tracker", "wandb"), tmp_path,
                                      {"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert rc == 0, err[-2000:]
    res = results(out)
    runs = wandb_runs(out)
    assert sorted(runs) == sorted([p["run_id"] for p in res["points"]] + ["fits"])
    assert {r["group"] for r in runs.values()} == {"out/tiny"}
    assert all(len(r["ids"]) == 1 for r in runs.values())          # the resumed run went on in the same id
    for e in ref:
        history = runs[e["run_id"]]["history"]
        for tag, points in expected_points(e).items():
            steps = [s for k, s, _ in history if k == tag]
            assert len(steps) == len(set(steps)), (e["run_id"], tag)           # never a step twice
            missing = {t for t, _ in points} - set(steps)
            assert set(steps) <= {t for t, _ in points}
            # a SIGKILL loses what wandb had not flushed (every 15 s) of the killed run; the others are whole
            assert not missing or e["run_id"] == "params-N100K-seed0", (e["run_id"], tag, missing)
            values = {s: v for k, s, v in history if k == tag}
            assert [values[t] for t, _ in points if t in values] == pytest.approx(
                [v for t, v in points if t in values], abs=1e-5)
    summary = runs["fits"]["summary"]
    for sweep in ("params", "data"):
        assert summary[f"fit/{sweep}_b"] == pytest.approx(res["fits"][sweep]["b"], rel=1e-12)
    figures = {k.split("/")[1] for k, _, _ in runs["fits"]["history"] if k.startswith("figures/")}
    assert figures == {"scaling_laws_complete", "compute_optimal"}             # wandb.Image's keys nest


# --- a missing library, runs.csv ---------------------------------------------------------------------

@pytest.mark.parametrize("tracker,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_library_is_one_line_and_exit_2_before_any_work(tracker, module, monkeypatch, tmp_path,
                                                                          byte_tokens):
    monkeypatch.setitem(sys.modules, module, None)          # `import` raises ImportError
    out = tmp_path / "out"
    rc, stdout, err = main_in_process(ladder(byte_tokens, out, "--tracker", tracker))
    assert rc == 2
    assert err.strip() == f"error: --tracker {tracker} needs the {tracker} package: pip install {tracker}"
    assert not out.exists()


def test_runs_csv_beside_results_lists_every_finished_run(tb_study):
    out, res, records = tb_study
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [r["run_id"] for r in rows] == [e["run_id"] for e in records]
    for r, e in zip(rows, records):
        assert (r["name"], r["roles"], r["branch_of"], r["seed"], r["status"]) == (
            e["name"], "+".join(e["roles"]), e["branch_of"] or "", str(e["seed"]), "completed")
        # N is the count the study's joint law used (the default, total), both counts beside it
        assert r["n_count"] == res["fits"]["joint"]["n_count"] == "total"
        assert (float(r["N"]), float(r["N_nonembedding"]), float(r["N_total"]), float(r["D"]),
                float(r["loss"])) == (e["n_params_total"], e["n_params_nonembedding"], e["n_params_total"],
                                      e["tokens"], e["final_val_loss"])
        assert float(r["flops"]) == e["flops_per_token"] * e["tokens"] > 6 * e["n_params_nonembedding"] * e["tokens"]


@pytest.mark.parametrize("mode", ["quick", "tiny"])       # tiny: WSD rows, so branch_of is filled in
def test_fit_csv_on_runs_csv_gives_the_studys_joint_law(tmp_path, capsys, mode):
    study = tmp_path / "demo"
    law = ["--law", "tiny"] if mode == "tiny" else []      # Chinchilla's law is above chance at tiny's sizes
    assert demo.main(["--mode", mode, *law, "--output-dir", str(study)]) == 0
    res = results(study)
    rows = list(csv.DictReader((study / "runs.csv").open()))
    assert len(rows) == len(res["points"]) and {r["status"] for r in rows} == {"completed"}
    assert rse.main(["--fit-csv", str(study / "runs.csv"), "--output-dir", str(tmp_path / "refit"),
                     "--bootstrap", "50"]) == 0
    joint, again = res["fits"]["joint"], results(tmp_path / "refit")["fits"]["joint"]
    assert joint["available"] and again["n_points"] == joint["n_points"]
    for key in ("E", "A", "B", "alpha", "beta"):
        assert math.isclose(again[key], joint[key], rel_tol=1e-6), key
    # a diverged run's row (no loss) is skipped, not an error
    text = (study / "runs.csv").read_text().splitlines()
    header = text[0].split(",")
    cells = text[1].split(",")
    cells[header.index("status")], cells[header.index("loss")] = "diverged", ""
    (tmp_path / "with_diverged.csv").write_text("\n".join([text[0], ",".join(cells), *text[2:]]) + "\n")
    assert len(rse.read_runs_csv(tmp_path / "with_diverged.csv")) == len(rows) - 1


def test_a_failing_tracker_is_one_log_line_and_sends_nothing_more(capsys, tmp_path):
    class Unreachable(rse.Tracker):
        def open_run(self, exp, tokens, resumed):
            return "a run"

        def write(self, exp, run, tokens, values):
            raise ConnectionError("no route to host")

    exp = rse.RunSpec("params-N25K", n_layer=2, d_model=32, n_head=2, steps=8, peak_lr=5e-3, batch_size=4,
                      context_length=32, vocab_size=256, roles=(rse.ROLE_N, rse.ROLE_JOINT), target=25000)
    state = rse.TrainState()
    state.curve.update(eval_step=[0], eval_tokens=[0], val_loss=[5.5])
    tracker = Unreachable(tmp_path, 128, study=True)
    with tracker:
        tracker.start_run(exp, state)                       # writes the untrained model's loss: fails
        tracker.point(exp, 256, {"train/loss": 5.0})
        tracker.study({"points": [], "fits": {}}, tmp_path)
        tracker.end_run(exp, None)
    said = capsys.readouterr().out.splitlines()
    assert said == ["tracker: writing params-N25K-seed0 failed (ConnectionError: no route to host); the study "
                    "goes on without it"]
    assert tracker.failed and tracker.runs == {}


def test_under_torchrun_only_rank_0_writes_and_only_the_whole_plans_process_writes_the_fits(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = SimpleNamespace(tracker="tensorboard", output_dir=str(tmp_path), tokens_per_step=128, mode="tiny")
    assert type(rse.open_tracker(cfg, rse.RunScope(), is_main=False)) is rse.NullTracker
    whole = rse.open_tracker(cfg, rse.RunScope(), is_main=True)
    assert type(whole) is rse.TensorBoardTracker and whole.with_study
    for part in (rse.RunScope(only=["params-N25K"], child=2), rse.RunScope(shard=(0, 2))):
        assert not rse.open_tracker(cfg, part, is_main=True).with_study
    assert type(rse.open_tracker(SimpleNamespace(**{**vars(cfg), "tracker": "none"}), rse.RunScope(), True)) \
        is rse.NullTracker


def test_a_resumed_writer_opens_past_the_second_of_the_folders_event_files(tmp_path):
    """TensorBoard reads a run folder's event files in name order, and a name starts with its second: a
    resumed run's writer opened in the killed one's second could sort first (its points then read as
    orphans and are dropped; seen once in the suite, when the rerun started within a second)."""
    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.99999.0").write_bytes(b"")
    rse.wait_past_event_files(tmp_path)
    assert int(time.time()) > now
    rse.wait_past_event_files(tmp_path / "absent")                  # a new run's folder: nothing to wait for

"""One run spec and one points table (issue 24): RunSpec is the one list of what defines a run, every run
says which laws it feeds, results.json's points table is what the fits read, and --fit-only still reads
folders written before the spec (schema 1)."""
import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import quick_scaling_demo as demo
import run_scaling_experiments_enhanced as rse
from conftest import run_cli

SCHEMA1 = Path(__file__).parent / "data" / "schema1_tiny"
CORPUS = {"sha256": "ab" * 32, "tokenizer": "bpe 512", "validation_split": "every 20th"}


def tiny_plan():
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny"]))
    return cfg, preset, rse.build_plan(cfg, preset)


# ---------------------------------------------------------------------------------------------------
# the spec: one list of what defines a run
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WithLabelSmoothing(rse.RunSpec):
    """A setting a future change might add to the spec, with nothing else edited."""
    label_smoothing: float = 0.0


def test_a_field_added_to_the_spec_changes_the_hash_the_settings_check_and_the_record_together(tmp_path):
    cfg, _, plan = tiny_plan()
    base = plan[0]
    spec = WithLabelSmoothing(**{f.name: getattr(base, f.name) for f in dataclasses.fields(rse.RunSpec)})
    new = dataclasses.replace(spec, label_smoothing=0.1)
    # the definition and its hash
    assert rse.run_definition(new, CORPUS)["label_smoothing"] == 0.1
    assert rse.definition_hash(rse.run_definition(new, CORPUS)) != rse.definition_hash(rse.run_definition(spec, CORPUS))
    # the record: it carries the definition, hence the field
    rec = rse.run_record(new, CORPUS, status="completed", final_val_loss=3.0)
    assert rec["definition"]["label_smoothing"] == 0.1
    assert rec["experiment_hash"] == rse.definition_hash(rse.run_definition(new, CORPUS))
    # the settings check: a record of the same run without the field's new value is named as changed
    store = rse.RunStore(tmp_path)
    store.save(rse.run_record(spec, CORPUS, status="completed", final_val_loss=3.0))
    changed = rse.changed_settings(None, cfg, [new], store, rse.CheckpointPolicy(), CORPUS)
    assert changed == "label_smoothing 0.0 -> 0.1 (1 runs)"
    assert rse.changed_settings(None, cfg, [spec], store, rse.CheckpointPolicy(), CORPUS) is None
    # the roles are not part of the definition: what a run feeds does not change what it is
    assert rse.run_definition(dataclasses.replace(base, roles=()), None) == rse.run_definition(base, None)


def test_the_spec_is_frozen_and_the_plan_copies_every_setting_from_the_config():
    cfg, _, plan = tiny_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan[0].steps = 1
    for spec in plan:
        for key, value in rse.config_settings(cfg).items():
            assert getattr(spec, key) == value, key
        assert spec.tokens == spec.steps * cfg.tokens_per_step
    assert set(rse.run_definition_keys()) == {f.name for f in dataclasses.fields(rse.RunSpec)} - {"roles", "target"}


# ---------------------------------------------------------------------------------------------------
# roles: which laws each run of tiny's grid feeds
# ---------------------------------------------------------------------------------------------------

def test_tiny_plan_roles():
    cfg, _, plan = tiny_plan()
    ln = [e for e in plan if e.has(rse.ROLE_N)]
    ld = [e for e in plan if e.has(rse.ROLE_D)]
    assert len(plan) == 21 and all(e.has(rse.ROLE_JOINT) for e in plan)
    assert sorted(e.name for e in ln) == ["params-N100K@4M", "params-N220K", "params-N25K@4M", "params-N400K",
                                          "params-N56K@4M"]
    assert {e.tokens for e in ln} == {1952 * cfg.tokens_per_step}          # every size at 4M tokens
    assert len(ld) == 7 and {e.branch_of or e.name for e in ld} == {"params-N25K"}
    assert sorted(e.tokens for e in ld) == sorted(cfg.data_sizes)
    assert [e.name for e in plan if e.has(rse.ROLE_N) and e.has(rse.ROLE_D)] == ["params-N25K@4M"]


def test_schema1_records_get_their_roles_from_the_old_flags():
    recs = json.loads((SCHEMA1 / "results.json").read_text())["experiments"]
    roles = {e["name"]: rse.roles_of(e) for e in recs}
    _, _, plan = tiny_plan()
    assert roles == {e.name: e.roles for e in plan}
    assert rse.roles_of({"sweep": "validate"}) == (rse.ROLE_VALIDATION,)
    assert rse.roles_of({"sweep": "data"}) == (rse.ROLE_D, rse.ROLE_JOINT)
    assert rse.roles_of({"sweep": "params", "in_param_sweep": None}) == (rse.ROLE_N, rse.ROLE_JOINT)


# ---------------------------------------------------------------------------------------------------
# the points table
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-demo")
    assert demo.main(["--mode", "tiny", "--law", "tiny", "--output-dir", str(out)]) == 0
    return out


def test_l_of_n_is_read_straight_from_the_points_table(tiny_study):
    text = (tiny_study / "results.json").read_text()
    res = json.loads(text)
    assert res["schema_version"] == rse.SCHEMA_VERSION == 2 and "experiments" not in res
    assert len(text) < 60_000                                     # compact enough for an editor
    ln = [p for p in res["points"] if "L(N)" in p["roles"]]
    assert sorted(p["N_nonembedding"] for p in ln) == sorted(p["N_nonembedding"] for p in ln) and len(ln) == 5
    assert {p["D"] for p in ln} == {3997696}
    fit = rse.fit_power_law([p["N_nonembedding"] for p in ln], [p["loss"] for p in ln], 200, rse.BOOTSTRAP_SEED)
    assert fit["b"] == pytest.approx(res["fits"]["params"]["b"], rel=1e-12)
    assert res["fits"]["params"]["n_points"] == 5 and res["fits"]["data"]["n_points"] == 7
    assert res["fits"]["joint"]["n_points"] == 21
    # curves and full definitions live under runs/ only
    assert all(set(p) == set(rse.POINT_COLUMNS) for p in res["points"])
    rec = json.loads((tiny_study / "runs" / f"{ln[0]['run_id']}.json").read_text())
    assert rec["curve"]["val_loss"][-1] == ln[0]["loss"] and "definition" in rec


def test_rollout_headline_is_not_written_twice(tiny_study):
    ro = json.loads((tiny_study / "results.json").read_text())["holdout"]["rollout_joint"]
    assert "headline" not in ro
    head = rse.rollout_headline(ro)
    assert head is ro["cutoffs"][ro["headline_cutoff"]] and head["runs"]
    assert all("runs" not in c for c in ro["cutoffs"] if c is not head)


# ---------------------------------------------------------------------------------------------------
# --fit-only on a folder written before the spec (schema 1: 0cf71dd's layout)
# ---------------------------------------------------------------------------------------------------

def test_fit_only_reads_a_schema1_folder_and_refits_its_laws(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(SCHEMA1, folder)
    old = json.loads((folder / "results.json").read_text())
    r = run_cli(["--fit-only", folder, "--bootstrap", "100", "--n-count", "non-embedding"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((folder / "results.json").read_text())
    assert res["schema_version"] == 2 and len(res["points"]) == 21
    assert res["merged_from"]["run_records"] == 21
    assert [p for p in res["points"] if p["status"] != "completed"] == []
    joint = res["fits"]["joint"]
    for key in ("E", "alpha", "beta"):                  # the same law the old runner fitted to these runs
        assert joint[key] == pytest.approx(old["fits"]["joint"][key], rel=1e-6), key
    assert res["fits"]["params"]["n_points"] == 5 and res["fits"]["data"]["n_points"] == 7
    # and a run of today's runner in that folder is refused in one line, naming --fresh
    r = run_cli(["--mode", "tiny", "--device", "cpu", "--output-dir", folder, "--max-steps", "400"], tmp_path)
    assert r.returncode == 2 and "--fresh" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fit_only_reads_a_schema1_results_file_alone(tmp_path):
    file = tmp_path / "results.json"
    shutil.copy(SCHEMA1 / "results.json", file)
    r = run_cli(["--fit-only", file, "--bootstrap", "100", "--n-count", "non-embedding"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(file.read_text())
    assert res["schema_version"] == 2 and len(res["points"]) == 21 and res["fits"]["joint"]["available"]
    assert (tmp_path / "scaling_laws_complete.png").exists()


# ---------------------------------------------------------------------------------------------------
# the demo: every preset under every law simulates falling sweeps, each run at its own N and D
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(rse.PRESETS))
@pytest.mark.parametrize("law", demo.LAWS)
def test_demo_sweeps_fall_for_every_preset_and_law(mode, law):
    try:
        results, records = demo.simulated_study(["--mode", mode], law, 0.0, 0, Path("unused"))
    except rse.UserError as e:        # Chinchilla's law puts tiny's runs above chance: refused, said why
        assert (mode, law) == ("tiny", "chinchilla") and "no better than chance" in str(e)
        return
    points = results["points"]
    assert [p["run_id"] for p in points] == [r["run_id"] for r in records]
    for sweep, key, other in (("params", "N_nonembedding", "D"), ("data", "D", "N_nonembedding")):
        row = sorted((p[key], p["loss"]) for p in points if rse.SWEEP_ROLE[sweep] in p["roles"])
        assert len(row) >= 3 and len({p[other] for p in points if rse.SWEEP_ROLE[sweep] in p["roles"]}) == 1
        losses = [loss for _, loss in row]
        assert all(b < a for a, b in zip(losses, losses[1:])), (sweep, row)   # falls along its own variable
    for p in points:                  # each run is the law at its own N and D (noise 0)
        n, d = p["N_nonembedding"], p["D"]
        if law in demo.JOINT_LAWS:
            want = rse.joint_law(n, d, **demo.JOINT_LAWS[law])
        elif mode == "tiny":          # a WSD grid: Kaplan's L(N, D), eq. 1.5
            want = ((8.8e13 / n) ** (0.076 / 0.095) + 5.4e13 / d) ** 0.095
        else:                         # two lines: each sweep's own one-variable law
            want = (8.8e13 / n) ** 0.076 if rse.ROLE_N in p["roles"] else (5.4e13 / d) ** 0.095
        assert p["loss"] == pytest.approx(want, rel=1e-12), p["name"]


def test_an_earlier_versions_study_in_the_default_folder_is_moved_aside(tmp_path, corpus_file, cache_dir):
    """The README's command where an earlier version left its results: moved aside as changed settings
    are, not refused (a folder the user names is refused instead, above)."""
    from conftest import SECONDS_SIZED
    shutil.copytree(SCHEMA1, tmp_path / "scaling_results_tiny_v2")
    r = run_cli([*SECONDS_SIZED, "--data", corpus_file, "--cache-dir", cache_dir], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "an earlier version's results in the default output folder" in r.stdout
    moved = list((tmp_path / "scaling_results_tiny_v2").glob("previous-*/results.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["schema_version"] == 1
    res = json.loads((tmp_path / "scaling_results_tiny_v2" / "results.json").read_text())
    assert res["schema_version"] == 2 and len(res["points"]) == 4

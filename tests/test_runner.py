"""The runner (issue 2): parameter counts, shapes, LR schedule, data split and cache, the real CLI."""
import dataclasses
import json
import math

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SECONDS_SIZED, run_cli, run_records


@pytest.mark.parametrize("n_layer,d_model,vocab,ctx", [(2, 32, 512, 64), (4, 320, 1000, 128), (3, 96, 257, 16)])
def test_parameter_counts_match_the_model(n_layer, d_model, vocab, ctx):
    model = rse.GPT(rse.GPTConfig(vocab, ctx, n_layer, d_model, d_model // 32))
    nonemb, total = model.count_params()
    assert nonemb == rse.n_params_nonembedding(n_layer, d_model) == n_layer * (12 * d_model**2 + 13 * d_model) + 2 * d_model
    assert total == rse.n_params_total(n_layer, d_model, vocab, ctx) == nonemb + (vocab + ctx) * d_model
    # tied output layer: no separate (V, C) matrix
    assert sum(p.numel() for p in model.parameters()) == total


def test_initialisation_rule():
    """Embeddings N(0, 0.02) (GPT-2's; tied to the output layer), qkv and the MLP's first layer
    N(0, sqrt(2 / (5 d_model))), the residual projections zero, biases zero, LayerNorm gains one."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = rse.GPT(rse.GPTConfig(512, 32, 2, 96, 6))
    assert rse.init_std(96) == pytest.approx(0.0645497, rel=1e-5) and rse.init_std(1000) == pytest.approx(0.02)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight") or name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("emb.weight"):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.0645497, rel=0.05), name
        else:
            assert torch.all(p == 1), name                           # LayerNorm gains
    # the untrained model predicts near-uniformly: its loss is about ln(vocabulary)
    idx, targets = torch.randint(0, 512, (2, 8, 32))
    assert abs(model(idx, targets).item() - math.log(512)) < 0.05


def test_tiny_shapes_are_the_documented_ladder():
    p = rse.PRESETS["tiny"]
    shapes = [rse.choose_shape(n, p) for n in p.param_sizes]
    assert shapes == [(2, 32, 2), (2, 48, 3), (2, 64, 4), (2, 96, 6), (2, 128, 8)]
    assert [rse.n_params_nonembedding(l, d) for l, d, _ in shapes] == [25472, 56640, 100096, 223872, 396800]
    # the grid: the three narrower sizes trained once to 8M tokens with branches at 1M-4M, the two wider
    # to 4M with branches at 1M and 2M; the data sweep is the 25K model's row, which branches at its
    # seven sizes (the horizons and the points halfway between them), so no run trains twice
    cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny"]))
    plan = rse.build_plan(cfg, p)
    assert len(plan) == 21 and rse.plan_warmup_steps(cfg) == 39
    assert not own_data_sweep(plan)
    data_steps = [488, 690, 976, 1380, 1952, 2760, 3904]
    assert [(e.n_params_nonembedding, e.steps) for e in plan if e.has(rse.ROLE_D)] == [(25472, s) for s in data_steps]
    for n, steps in ((25472, 3904), (56640, 3904), (100096, 3904), (223872, 1952), (396800, 1952)):
        row = [e for e in plan if e.n_params_nonembedding == n]
        assert [e.steps for e in row] == (data_steps if n == 25472 else
                                          [s for s in (488, 976, 1952, 3904) if s <= steps])
        assert [e.name for e in row if not e.branch_of] == [row[-1].name] and row[-1].steps == steps
        # L(N) is every size at the D all rows reach (4M); a row's other runs feed the joint law only
        assert [e.steps for e in row if e.has(rse.ROLE_N)] == [1952]
        assert not [e for e in row if e.steps != 1952 and e.has(rse.ROLE_N)]
        assert all(e.has(rse.ROLE_JOINT) for e in row)
    points = rse.as_points([rse.run_record(e, None, status="completed", final_val_loss=3.0) for e in plan])
    assert [p["D"] for p in rse.usable_runs(points, "params")] == [1952 * 2048] * 5
    assert rse.sweep_fixed_values(points) == {"params": 1952 * 2048, "data": 25472}
    assert len(rse.usable_runs(points, "data")) == 7
    # another ladder size as the data model: its row is the data sweep, branched at every data size
    cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny", "--data-model-size", "100K"]))
    plan = rse.build_plan(cfg, p)
    assert [e.steps for e in plan if e.has(rse.ROLE_D)] == data_steps and len(plan) == 21
    assert {e.n_params_nonembedding for e in plan if e.has(rse.ROLE_D)} == {100096}
    assert not own_data_sweep(plan)
    # a wider size's row is shorter than the data sweep's sizes: its own runs, as are other data sizes
    # and a model not in the ladder
    for extra in (["--data-model-size", "220K"], ["--data-sizes", "0.5M,1M,2M"], ["--data-model-size", "6.6K"]):
        cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny", *extra]))
        plan = rse.build_plan(cfg, p)
        assert own_data_sweep(plan) and own_data_sweep(plan) == [e for e in plan if e.has(rse.ROLE_D)]
    # other sizes, steps or horizons: every row to the same length, the stable runs are the parameter sweep
    for extra in (["--max-steps", "1000"], ["--param-sizes", "25K,100K"], ["--horizons", "0.5x,1x"]):
        cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny", *extra]))
        plan = rse.build_plan(cfg, p)
        stable = [e for e in plan if e.name.startswith("params-") and not e.branch_of]
        assert cfg.row_steps is None and {e.steps for e in stable} == {cfg.steps}
        assert [e for e in plan if e.has(rse.ROLE_N)] == stable
    cfg, _ = rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny"]))
    with pytest.raises(rse.UserError, match="one horizon of"):
        rse.build_plan(dataclasses.replace(cfg, row_steps=[3904, 3904, 3904, 1952, 1000]), p)


def own_data_sweep(plan):
    """The data sweep's own runs (named data-D...): present only when no row of the parameter sweep
    can serve as the data sweep."""
    return [e for e in plan if e.name.startswith("data-")]


@pytest.mark.parametrize("mode", ["quick", "standard", "full"])
def test_gpu_preset_shapes_keep_kaplans_aspect_ratio(mode):
    p = rse.PRESETS[mode]
    for target in p.param_sizes:
        n_layer, d_model, n_head = rse.choose_shape(target, p)
        assert 32 <= d_model / n_layer <= 128
        assert d_model == 64 * n_head
        assert abs(math.log(rse.n_params_nonembedding(n_layer, d_model) / target)) < math.log(1.25)


def test_lr_schedule_values():
    peak, total = 1e-3, 1000                      # warmup = 100 steps
    assert rse.lr_at(0, total, peak) == pytest.approx(1e-5)
    assert rse.lr_at(99, total, peak) == pytest.approx(peak)          # end of warmup
    middle = 100 + (999 - 100) / 2                                     # half-way through the cosine
    assert rse.lr_at(middle, total, peak) == pytest.approx(peak * (0.1 + 0.9 * 0.5))
    assert rse.lr_at(999, total, peak) == pytest.approx(0.1 * peak)   # last step: 10% of peak
    values = [rse.lr_at(s, total, peak) for s in range(100, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:]))            # decays monotonically


def test_default_lr_rule():
    assert rse.default_peak_lr(32) == 5e-3                                  # the cap
    assert rse.default_peak_lr(96, 0.3) == pytest.approx(3.125e-3)          # tiny's rule
    assert rse.default_peak_lr(256) == pytest.approx(1.5625e-3)
    assert rse.default_peak_lr(768) == pytest.approx(5.208e-4, rel=1e-3)


def test_parse_count():
    assert rse.parse_count("25K") == 25_000
    assert rse.parse_count("0.3M") == 300_000
    assert rse.parse_count("1B") == 10**9
    assert rse.parse_count_list("10M,1M,3M") == [10**6, 3 * 10**6, 10**7]
    for bad in ("-5M", "0", "abc", "1X"):
        with pytest.raises(rse.UserError):
            rse.parse_count(bad)


def test_train_and_validation_never_overlap(tmp_path):
    docs = [f"doc{d}\n" + "".join(f"marker-{d}-{i}\n" for i in range(3000)) for d in range(4)]
    train, val = rse.split_pieces(docs)
    assert len(val) >= 2 and len(train) > 10 * len(val) // 2
    train_lines = {line for piece in train for line in piece.splitlines()}
    val_lines = {line for piece in val for line in piece.splitlines()}
    assert not (train_lines & val_lines)
    # nothing lost, nothing duplicated
    assert sorted(train_lines | val_lines) == sorted(line for d in docs for line in d.splitlines())


def test_token_cache_is_reused_and_splits_decode_apart(tmp_path, corpus_file):
    cache = tmp_path / "cache"
    c1 = rse.load_corpus(str(corpus_file), 300, cache)
    entries = list(cache.iterdir())
    assert len(entries) == 1
    mtime = (entries[0] / "train.bin").stat().st_mtime_ns
    c2 = rse.load_corpus(str(corpus_file), 300, cache)
    assert (entries[0] / "train.bin").stat().st_mtime_ns == mtime            # not rebuilt
    assert np.array_equal(np.asarray(c1.train), np.asarray(c2.train))
    assert c1.record["sha256"] == c2.record["sha256"]
    assert c1.record["n_train_tokens"] + c1.record["n_val_tokens"] == len(c1.train) + len(c1.val)
    rse.load_corpus(str(corpus_file), 320, cache)                             # other vocabulary: new entry
    assert len(list(cache.iterdir())) == 2
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(c1.record["tokenizer_path"])
    text = corpus_file.read_text()
    val_text = tok.decode(np.asarray(c1.val).tolist())
    train_text = tok.decode(np.asarray(c1.train).tolist())
    assert len(val_text) + len(train_text) == len(text)                       # byte-level BPE is lossless
    assert set(val_text.splitlines()) <= set(text.splitlines())               # whole lines of the corpus
    assert 0.02 < len(val_text) / len(text) < 0.10                            # about 5% held out
    assert int(np.asarray(c1.train).max()) < 300


def test_end_to_end_cli_writes_results_and_figure(tmp_path, corpus_file, cache_dir):
    out = tmp_path / "out"
    r = run_cli([*SECONDS_SIZED, "--data", corpus_file, "--cache-dir", cache_dir, "--output-dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "device: cpu" in r.stdout.splitlines()[0] and "torch" in r.stdout.splitlines()[0]
    res = json.loads((out / "results.json").read_text())
    for key in ("schema_version", "mode", "config", "environment", "points", "fits", "predictions"):
        assert key in res
    assert res["environment"]["corpus"]["vocab_size"] == 512
    assert len(res["environment"]["corpus"]["sha256"]) == 64
    exps = run_records(out)
    assert [tuple(e["roles"]) for e in exps] == [(rse.ROLE_N, rse.ROLE_JOINT)] * 2 + [(rse.ROLE_D, rse.ROLE_JOINT)] * 2
    for e in exps:
        for key in ("name", "roles", "n_params_nonembedding", "n_params_total", "n_layer", "d_model", "n_head",
                    "tokens", "steps", "epochs", "initial_loss", "final_val_loss", "status", "wall_time_s",
                    "tokens_per_s", "curve"):
            assert key in e, key
        assert e["status"] == "completed"
        assert abs(e["initial_loss"] - math.log(512)) < 0.3          # untrained model: near ln(vocabulary)
        assert e["final_val_loss"] < e["initial_loss"] - 1.0          # it learned
        assert e["final_val_loss"] == e["curve"]["val_loss"][-1]      # reported loss is the last validation loss
        assert e["tokens"] == e["steps"] * 8 * 64
        assert set(e["curve"]) >= {"step", "tokens", "train_loss", "val_loss", "lr"}
    assert exps[0]["n_params_nonembedding"] == 25472 and exps[1]["n_params_nonembedding"] == 100096
    assert [e["steps"] for e in exps] == [30, 30, 31, 62]              # D / (8 * 64) tokens per step
    for sweep in ("params", "data"):
        fit = res["fits"][sweep]
        assert fit["n_points"] == 2 and fit["form"] == "two_parameter" and fit["note"]
    names = {p["name"] for p in res["predictions"]}
    assert {"GPT-2", "GPT-3", "LLaMA", "Llama 3"} <= {n.split(" (")[0] for n in names}
    png = out / "scaling_laws_complete.png"
    assert png.stat().st_size > 20_000
    fig = rse.build_scaling_figure(res, rse.saved_curves(out))
    assert len(fig.axes) == 4
    assert [ax.get_title()[:2] for ax in fig.axes] == ["1.", "2.", "3.", "4."]


@pytest.mark.parametrize("args,needle", [
    (["--mode", "huge"], "unknown mode 'huge'"),
    (["--max-steps", "0"], "must be positive"),
    (["--max-steps", "-3"], "must be positive"),
    (["--param-sizes", "1M,-2M"], "positive count"),
    (["--data", "/no/such/corpus.txt"], "no such file or folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    r = run_cli([*args, "--output-dir", tmp_path / "o"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_unwritable_output_folder(tmp_path, corpus_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = run_cli(["--mode", "tiny", "--data", corpus_file, "--output-dir", blocker / "sub"], tmp_path)
    assert r.returncode == 2 and "cannot write to output folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_fit_recovers_known_power_law():
    x = np.array([1e5, 3e5, 1e6, 3e6, 1e7])
    y = rse.power_law(x, 40.0, 0.3, 2.0)
    fit = rse.fit_power_law(x, y)
    assert fit["form"] == "three_parameter"
    assert fit["b"] == pytest.approx(0.3, rel=1e-3)
    assert fit["c"] == pytest.approx(2.0, rel=1e-3)
    assert fit["a"] == pytest.approx(40.0, rel=1e-2)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)
    assert rse.fit_power_law([1e5], [3.0])["available"] is False

"""The guide's path (issue 14): natural text by default, a Hub stream prepared only as far as the plan
needs (the cap and its cache rule), the offline refusal, the repetition note past 4 epochs, counts and
the vocabulary check. Offline: every dataset is built here; nothing reaches the Hub."""
import json

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SECONDS_SIZED, make_text, run_cli

datasets = pytest.importorskip("datasets")

VOCAB = 300
BPE_CHARS = 40_000          # the BPE sample of every preparation below: the same tokenizer for every cap
VAL_CHARS = 1_500           # the capped validation set: ~8 rows of ~200 characters, full after ~150 rows


def make_rows(n_rows: int, seed: int = 0) -> list[str]:
    lines = make_text(5 * n_rows, seed).splitlines()
    return ["\n".join(lines[i:i + 5]) + "\n" for i in range(0, len(lines), 5)]


@pytest.fixture(scope="module")
def rows():
    return make_rows(4000, seed=7)


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("stream") / "rows"
    folder.mkdir()
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return folder


@pytest.fixture
def small_val(monkeypatch):
    monkeypatch.setattr(rse, "CAPPED_VAL_CHARS", VAL_CHARS)


def capped_validation_rows(rows: list[str]) -> list[str]:
    """Every 20th row (10, 30, ...) until the rows taken hold VAL_CHARS characters."""
    taken, chars = [], 0
    for i, r in enumerate(rows):
        if i % 20 == 10 and chars < VAL_CHARS:
            taken.append(r)
            chars += len(r)
    return taken


def prepare(folder, cache, cap):
    return rse.load_corpus(str(folder), VOCAB, cache, bpe_sample_chars=BPE_CHARS, max_train_tokens=cap)


def test_a_capped_stream_is_not_read_past_the_cap(tmp_path, small_val):
    n_docs, read = 1_000_000, {"docs": 0}          # a million rows, made only when asked for

    def documents():
        for k in range(n_docs):
            read["docs"] += 1
            yield (make_text(5, seed=k % 50),)

    source = rse.CorpusSource("endless", documents, "endless-v1", rse.PIECE_CHARS, None, {})
    meta = rse.build_token_cache(source, VOCAB, tmp_path / "entry", bpe_sample_chars=BPE_CHARS,
                                 max_train_tokens=20_000)
    # two passes (BPE sample, then encoding), each stopping near the cap: a few hundred rows of a million
    assert meta["exhausted"] is False and meta["max_train_tokens"] == 20_000
    assert 20_000 <= meta["n_train_tokens"] < 23_000
    assert meta["n_documents"] < 1_000 and read["docs"] < 2_000
    assert meta["bpe_training_chars"] < BPE_CHARS + 500          # the sample stops at its bound too


def test_cap_stops_the_stream_and_bounds_validation(tmp_path, jsonl_folder, rows, small_val):
    c = prepare(jsonl_folder, tmp_path / "cache", 20_000)
    rec = c.record
    assert rec["max_train_tokens"] == 20_000 and rec["stream_exhausted"] is False
    assert 20_000 <= rec["n_train_tokens"] < 23_000
    assert rec["n_documents"] < len(rows) / 4                    # the stream stopped early
    assert rec["n_characters"] < sum(map(len, rows)) / 4
    # validation: every 20th row until 3,000 characters, then none; decoding gives exactly those rows
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(rec["tokenizer_path"])
    want = capped_validation_rows(rows)
    assert 5 <= len(want) < 12 and tok.decode(np.asarray(c.val).tolist()) == "".join(want)
    assert "until validation holds 1,500 characters" in rec["validation_split"]


def test_a_larger_plan_rebuilds_a_shorter_cache_and_a_smaller_plan_reuses_a_larger(
        tmp_path, jsonl_folder, rows, small_val, capsys):
    cache = tmp_path / "cache"
    small = prepare(jsonl_folder, cache, 20_000)
    small_train, small_val_tokens = np.array(small.train), np.array(small.val)
    capsys.readouterr()
    big = prepare(jsonl_folder, cache, 60_000)                   # needs more: never the shorter cache
    out = capsys.readouterr().out
    assert "fewer than the 60K this plan needs: preparing it again" in out
    assert big.record["cache_key"] == small.record["cache_key"]
    assert 60_000 <= big.record["n_train_tokens"] < 66_000
    assert big.record["fingerprint"] != small.record["fingerprint"]
    # same BPE sample and the same full validation set: the rebuilt cache extends the shorter one
    assert np.array_equal(np.asarray(big.val), small_val_tokens)
    assert np.array_equal(np.asarray(big.train[:len(small_train)]), small_train)
    # a smaller plan is served by the larger cache as it is
    medium = prepare(jsonl_folder, cache, 30_000)
    out = capsys.readouterr().out
    assert "using cached tokens" in out and "tokenizing" not in out
    assert medium.record["n_train_tokens"] == big.record["n_train_tokens"]
    assert medium.record["fingerprint"] == big.record["fingerprint"]
    assert medium.record["cache_max_train_tokens"] == 60_000 and medium.record["max_train_tokens"] == 30_000


def test_an_exhausted_stream_serves_any_cap(tmp_path, jsonl_folder, rows, small_val, capsys):
    cache = tmp_path / "cache"
    whole = prepare(jsonl_folder, cache, 10**9)                  # more than the rows hold
    assert whole.record["stream_exhausted"] is True and whole.record["n_documents"] == len(rows)
    capsys.readouterr()
    again = prepare(jsonl_folder, cache, 10**10)
    assert "using cached tokens" in capsys.readouterr().out
    assert again.record["fingerprint"] == whole.record["fingerprint"]


def test_preparation_cap_follows_the_plan():
    def cfg_for(*argv):
        return rse.config_from_args(rse.build_parser().parse_args(list(argv)))

    cfg, preset = cfg_for("--mode", "quick")
    assert cfg.data == rse.NATURAL_TEXT == "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
    # quick's largest run is data-D100M: round(100M / 8,192) = 12,207 steps of 32 x 256 tokens
    assert rse.preparation_cap(cfg, preset) == 104_999_731 == round(12_207 * 8_192 * 1.05)
    cfg, preset = cfg_for("--mode", "standard", "--data-sizes", "10M,20M")  # the params sweep is larger now
    assert rse.preparation_cap(cfg, preset) == 43_008_000         # 5,000 steps x 8,192 tokens x 1.05
    cfg, preset = cfg_for("--mode", "quick", "--max-tokens", "50M")
    assert rse.preparation_cap(cfg, preset) == 50_000_000
    cfg, preset = cfg_for("--mode", "tiny")
    assert cfg.data == "builtin" and rse.preparation_cap(cfg, preset) is None   # a local corpus: whole


def test_max_tokens_caps_a_local_text_file_through_the_cli(tmp_path, cache_dir):
    corpus = tmp_path / "text.txt"
    corpus.write_text(make_text(20_000, seed=11))                # ~170K tokens at vocabulary 512
    out = tmp_path / "out"
    r = run_cli([*SECONDS_SIZED, "--param-sizes", "25K", "--data-sizes", "1K", "--max-steps", "3",
                 "--data", corpus, "--max-tokens", "30K", "--cache-dir", cache_dir, "--output-dir", out],
                tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    rec = res["environment"]["corpus"]
    assert res["config"]["max_tokens"] == 30_000 and rec["max_train_tokens"] == 30_000
    assert 30_000 <= rec["n_train_tokens"] < 34_000 and rec["stream_exhausted"] is False
    assert rec["n_characters"] < len(corpus.read_text()) / 3


def test_offline_default_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    r = run_cli(["--mode", "quick", "--output-dir", out], tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert "--data hf:HuggingFaceFW/fineweb-edu:sample-10BT (the default of --mode quick)" in line
    assert "HF_HUB_OFFLINE is set" in line and "--data builtin" in line and "--data path/to/text" in line
    # 100M tokens over the built-in corpus's training text at 3 characters per token
    n_chars = sum(p.stat().st_size for p in rse.builtin_corpus_files()[1])
    epochs = 12_207 * 8_192 / (n_chars * 0.95 / 3.0)
    assert f"largest run, 100M tokens, would read about {epochs:.0f} epochs" in line
    assert r.stdout == "" and not out.exists()                  # nothing done before the refusal


def test_unreachable_host_is_named(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert rse.hub_unreachable_reason() == "HF_DATASETS_OFFLINE is set"
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    reason = rse.hub_unreachable_reason("no-such-host.invalid", 1.0)
    assert reason.startswith("no connection to no-such-host.invalid (")
    assert rse.is_hub_stream("hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    assert not rse.is_hub_stream("builtin")


def test_repetition_past_four_epochs_is_named():
    cfg = rse.RunConfig(mode="tiny", param_sizes=[25_000], data_sizes=[40_000, 41_000, 100_000],
                        data_model_size=25_000, steps=10, batch_size=4, grad_accum=1, context_length=100,
                        vocab_size=512, lr=None)
    plan = rse.build_plan(cfg, rse.PRESETS["tiny"])
    assert [e.tokens for e in plan] == [4_000, 40_000, 40_800, 100_000]
    b = rse.check_data_budget(plan, 10_000)
    assert [r["epochs"] for r in b["runs"]] == [0.4, 4.0, 4.08, 10.0]
    assert b["epochs_over_4"] == ["data-D41K", "data-D100K"]     # 4.0 epochs exactly is not past 4
    b = rse.check_data_budget(plan, 9_000)
    assert b["epochs_over_4"] == ["data-D40K", "data-D41K", "data-D100K"]
    note = b["repetition_warning"]
    assert note.startswith("data-D40K, data-D41K, data-D100K read more than 4 epochs")
    assert "repetition curve" in note and "Muennighoff et al. 2023" in note
    assert rse.data_budget_lines(b)[-1] == f"warning: {note}"
    fresh = rse.check_data_budget(plan, 200_000)
    assert fresh["epochs_over_4"] == [] and fresh["repetition_warning"] is None
    assert rse.repetition_note({}) is None                       # an older results.json


@pytest.mark.parametrize("n,text", [(999_999_999, "1B"), (1e9, "1B"), (1.5e9, "1.5B"), (1e12, "1T"),
                                    (999_997_440, "1B"), (999_500, "1M"), (25_000, "25K"),
                                    (1_580_032, "1.58M"), (1.75e11, "175B"), (512, "512"), (2.5e15, "2,500T")])
def test_format_count(n, text):
    assert rse.format_count(n) == text


def test_full_modes_largest_data_run_is_named_and_logged_as_1B():
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(["--mode", "full"]))
    last = rse.build_plan(cfg, preset)[-1]
    assert last.tokens == 999_997_440 and last.name == "data-D1B" and rse.format_count(last.tokens) == "1B"


def test_small_vocabulary_is_refused_before_the_corpus_is_read(tmp_path):
    missing = tmp_path / "no-such-corpus"   # reading it would fail differently: the vocabulary comes first
    with pytest.raises(rse.UserError, match="--vocab-size 10 is too small .* at least 257"):
        rse.config_from_args(rse.build_parser().parse_args(["--mode", "tiny", "--vocab-size", "10",
                                                             "--data", str(missing)]))
    with pytest.raises(rse.UserError, match="--vocab-size 256 is too small"):
        rse.load_corpus(str(missing), 256, tmp_path / "cache")
    rse.check_vocab_size(256, "tokens.bin")                      # a token file needs no BPE

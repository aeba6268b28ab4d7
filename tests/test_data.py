"""Real corpora at real scale (issue 8): Hugging Face dataset folders, streaming preparation with bounded
memory, uint32 tokens, and the data-repetition check. Offline: every dataset is built here."""
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import ROOT, SECONDS_SIZED, make_text, run_cli, run_records

datasets = pytest.importorskip("datasets")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# one parameter-sweep run and one data-sweep run, 10 and 8 steps of 4 x 32 tokens: seconds per CLI run
FAST = [*SECONDS_SIZED, "--param-sizes", "25K", "--data-sizes", "1K", "--max-steps", "10", "--eval-interval", "5",
        "--eval-batches", "1", "--batch-size", "4", "--context-length", "32"]


def make_rows(n_rows: int, seed: int = 0) -> list[str]:
    lines = make_text(5 * n_rows, seed).splitlines()
    return ["\n".join(lines[i:i + 5]) + "\n" for i in range(0, len(lines), 5)]


@pytest.fixture(scope="module")
def rows():
    return make_rows(800)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("saved") / "stories"
    datasets.Dataset.from_dict({"story": rows, "id": list(range(len(rows)))}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def jsonl_folder(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("jsonl") / "shards"
    folder.mkdir()
    for k in range(3):                      # rows 0-266, 267-533, 534-799: shard order = row order
        chunk = rows[k * 267:(k + 1) * 267]
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in chunk))
    return folder


def read_results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("kind", ["save_to_disk", "jsonl"])
def test_dataset_folder_is_prepared_and_trained_through_the_cli(tmp_path, kind, saved_dataset, jsonl_folder,
                                                                 rows, cache_dir):
    data, extra = ((saved_dataset, ["--text-column", "story"]) if kind == "save_to_disk"
                   else (f"hf:{jsonl_folder}", []))
    out = tmp_path / "out"
    r = run_cli([*FAST, "--data", data, *extra, "--cache-dir", cache_dir, "--output-dir", out], tmp_path,
                env_extra=OFFLINE)
    assert r.returncode == 0, r.stderr[-2000:]
    res = read_results(out)
    corpus = res["environment"]["corpus"]
    assert corpus["source"] == {"save_to_disk": "save_to_disk folder", "jsonl": "jsonl files"}[kind]
    assert corpus["n_documents"] == 800 and corpus["n_characters"] == sum(map(len, rows))
    assert corpus["split"] == "train" and corpus["text_column"] == ("story" if kind == "save_to_disk" else "text")
    assert len(corpus["sha256"]) == 64 and len(corpus["fingerprint"]) == 64 and len(corpus["files_sha256"]) == 64
    # the same rows in the same order give the same text hash whichever way they are stored
    import hashlib
    assert corpus["sha256"] == hashlib.sha256(b"".join(t.encode() + b"\x00" for t in rows)).hexdigest()
    # every 20th row (rows 10, 30, 50, ...) is validation, whole: decoding the split gives exactly them
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(corpus["tokenizer_path"])
    entry = cache_dir / corpus["cache_key"]
    val = np.fromfile(entry / "val.bin", dtype=np.uint16)
    train = np.fromfile(entry / "train.bin", dtype=np.uint16)
    eot = tok.token_to_id(rse.EOT_TOKEN)
    assert (val == eot).sum() == 40 and (train == eot).sum() == 760
    assert tok.decode(val.tolist()) == "".join(rows[10::20])
    assert corpus["n_train_tokens"] == len(train) and corpus["n_val_tokens"] == len(val)
    exps = run_records(out)
    assert [e["status"] for e in exps] == ["completed", "completed"]
    assert abs(exps[0]["initial_loss"] - math.log(512)) < 0.3 and exps[0]["final_val_loss"] < exps[0]["initial_loss"] - 0.5
    assert res["data_budget"]["n_train_tokens"] == len(train)
    assert [x["epochs"] for x in res["data_budget"]["runs"]] == [round(e["tokens"] / len(train), 4) for e in exps]


def test_streaming_pieces_do_not_depend_on_block_boundaries():
    docs = [make_text(3000, seed=s) for s in range(3)] + ["no newline at all " * 3000]
    train, val = rse.split_pieces(docs)
    rng = np.random.default_rng(0)

    def blocks(doc):                          # the same text in random-sized blocks, as a file streams it
        cuts = np.sort(rng.integers(0, len(doc), size=40))
        return [doc[a:b] for a, b in zip([0, *cuts], [*cuts, len(doc)])]

    size = rse.piece_size(sum(map(len, docs)))
    pieces = list(rse.iter_pieces([blocks(d) for d in docs], size))
    assert [p for p, v in pieces if not v] == train and [p for p, v in pieces if v] == val
    assert len(val) == len(pieces) // 20 and all(len(p) <= size for p, _ in pieces)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    import numpy as np
    import run_scaling_experiments_enhanced as rse

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

    # warm the tokenizer library first (its thread pool and allocator arenas are a fixed cost of the
    # library, not of the corpus), then sample the resident set every 5 ms while the corpus is prepared
    rse.set_tokenizer_threads(1)
    tok = rse.train_bpe(["warm up the tokenizer " * 2000] * 4, 300)
    tok.encode_batch(["warm up " * 20000])
    peak, base, done = [0.0], rss_mb(), [False]

    def watch():
        while not done[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.time()
    c = rse.load_corpus({corpus!r}, 512, Path({cache!r}), num_proc=1, bpe_sample_chars=300_000)
    prepare_s = time.time() - t0
    offsets = rse.batch_offsets(len(c.train), 64, 8, 0, 1, 2)
    window = np.asarray(c.train[offsets[0]:offsets[0] + 64])
    done[0] = True
    peak[0] = max(peak[0], rss_mb())
    print(json.dumps({{"growth_mb": peak[0] - base, "prepare_s": prepare_s, "record": c.record,
                       "window": window.tolist(), "dtype": str(c.train.dtype)}}))
""")


def test_corpus_larger_than_preparation_memory_is_prepared_and_sampled(tmp_path):
    base = make_text(20000, seed=3)
    corpus = tmp_path / "big.txt"
    with open(corpus, "w") as f:              # ~25 MB written in parts: the test never holds it either
        for k in range(25):
            f.write(f"part {k}\n{base}")
    size_mb = corpus.stat().st_size / 1e6
    probe = MEMORY_PROBE.format(root=str(ROOT), corpus=str(corpus), cache=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"prepared {size_mb:.1f} MB in {m['prepare_s']:.1f}s, peak RSS growth {m['growth_mb']:.1f} MB")
    assert size_mb > 3 * m["growth_mb"], m["growth_mb"]
    rec = m["record"]
    assert rec["n_characters"] == len(base) * 25 + sum(len(f"part {k}\n") for k in range(25))
    # the BPE saw an even sample of about 300K characters, not the whole corpus, and says so
    assert rec["bpe_training_text"].endswith(f"1 in {math.ceil(rec['n_characters'] / 300_000)} training pieces")
    assert 300_000 <= int(rec["bpe_training_text"].split(" ")[0].replace(",", "")) < 300_000 + rse.PIECE_CHARS
    from tokenizers import Tokenizer
    text = Tokenizer.from_file(rec["tokenizer_path"]).decode(m["window"])
    assert len(text) > 64 and text in corpus.read_text()     # a real window of the corpus, decoded back


def test_uint32_tokens(tmp_path):
    # a .u32.bin file: ids above 65,535 survive, and the CLI trains on it
    rng = np.random.default_rng(0)
    ids = (np.arange(40_000) % 7 + rng.integers(0, 2, 40_000) * 65_990).astype(np.uint32)   # max 65,996
    path = tmp_path / "tokens.u32.bin"
    ids.tofile(path)
    c = rse.load_corpus(str(path), 70_000, tmp_path / "cache")
    assert c.train.dtype == np.uint32 and c.record["token_dtype"] == "uint32"
    assert len(c.train) == 38_000 and np.array_equal(np.asarray(c.val), ids[38_000:])
    assert int(np.asarray(c.train).max()) == int(ids[:38_000].max()) > 65_535
    with pytest.raises(rse.UserError, match="--vocab-size 65997"):
        rse.load_corpus(str(path), 65_536, tmp_path / "cache")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01" * 2001)
    with pytest.raises(rse.UserError, match="whole number of uint16"):
        rse.load_corpus(str(odd), 512, tmp_path / "cache")
    # the text path's writer stores ids as uint32 once the vocabulary passes 65,536
    assert rse.token_dtype(65_536) == np.uint16 and rse.token_dtype(65_537) == np.uint32
    tok = rse.train_bpe([make_text(200)], 300)
    w = rse._TokenWriter(tmp_path / "w.bin", tok, np.uint32, 1000)
    pieces = make_text(50).splitlines(keepends=True)
    for p in pieces:
        w.add(p)
    w.close()
    written = np.fromfile(tmp_path / "w.bin", dtype=np.uint32)
    assert len(written) == w.n_tokens == sum(len(tok.encode(p).ids) + 1 for p in pieces)
    assert tok.decode(written.tolist()) == "".join(pieces)
    out = tmp_path / "out"
    r = run_cli(["--mode", "tiny", "--schedule", "cosine", "--vocab-size", "66000", "--data", path,
                 "--param-sizes", "25K",
                 "--data-sizes", "256", "--data-model-size", "25K", "--max-steps", "3", "--batch-size", "4",
                 "--context-length", "32", "--eval-batches", "1", "--no-estimate", "--output-dir", out], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = read_results(out)
    assert res["environment"]["corpus"]["token_dtype"] == "uint32"
    assert abs(run_records(out)[0]["initial_loss"] - math.log(66_000)) < 0.3


def test_data_budget_counts_epochs_and_refuses_under_no_repeat():
    cfg = rse.RunConfig(mode="tiny", param_sizes=[25_000], data_sizes=[10_000, 100_000], data_model_size=25_000,
                        steps=10, batch_size=4, grad_accum=1, context_length=100, vocab_size=512, lr=None)
    plan = rse.build_plan(cfg, rse.PRESETS["tiny"])
    assert [e.tokens for e in plan] == [4_000, 10_000, 100_000]
    b = rse.check_data_budget(plan, 40_000)
    assert [r["epochs"] for r in b["runs"]] == [0.1, 0.25, 2.5] and b["max_epochs"] == 2.5 and b["repeats"]
    assert [r["tokens_missing"] for r in b["runs"]] == [0, 0, 60_000]
    assert len(rse.data_budget_lines(b)) == 1 and "2.50 epochs" in rse.data_budget_lines(b)[0]
    with pytest.raises(rse.UserError, match="100,000 tokens .* 40,000 training tokens, 60,000 missing"):
        rse.check_data_budget(plan, 40_000, no_repeat=True)
    assert not rse.check_data_budget(plan, 100_000, no_repeat=True)["repeats"]     # exactly one pass: allowed
    line, past_4 = rse.data_budget_lines(rse.check_data_budget(plan, 5_000))     # several runs: one line,
    assert line.startswith("warning: 2 runs repeat") and "data-D10K 2.00 epochs" in line  # and one for 20 epochs
    assert "data-D100K 20.00 epochs" in line and "95K more tokens" in line
    assert past_4.startswith("warning: data-D100K reads more than 4 epochs") and "repetition curve" in past_4


def test_repetition_warning_and_no_repeat_refusal_through_the_cli(tmp_path, cache_dir):
    small = tmp_path / "small.txt"            # a few thousand tokens, fewer than the 4K asked for
    small.write_text(make_text(300, seed=5))
    args = [*FAST, "--data", small, "--data-sizes", "4K", "--cache-dir", cache_dir]
    refused = run_cli([*args, "--no-repeat", "--output-dir", tmp_path / "no"], tmp_path, env_extra=OFFLINE)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "--no-repeat: data-D4K trains on 3,968 tokens" in lines[0], refused.stderr
    assert not (tmp_path / "no" / "results.json").exists()
    n_train = int(lines[0].split("corpus has ")[1].split(" ")[0].replace(",", ""))
    assert f"{3_968 - n_train:,} missing" in lines[0]
    # without --no-repeat the same plan runs, says how many epochs, and records them
    out = tmp_path / "yes"
    r = run_cli([*args, "--max-steps", "2", "--output-dir", out], tmp_path, env_extra=OFFLINE)
    assert r.returncode == 0, r.stderr[-2000:]
    epochs = 3_968 / n_train                  # round(4000 / 128) = 31 steps of 4 x 32 tokens
    assert f"warning: data-D4K trains on 3.97K tokens, {epochs:.2f} epochs" in r.stdout
    res = read_results(out)
    assert res["data_budget"]["n_train_tokens"] == n_train and res["data_budget"]["repeats"]
    assert run_records(out)[1]["epochs"] == round(epochs, 4)


def test_missing_datasets_library_is_one_line(tmp_path):
    fake = tmp_path / "no_datasets" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('datasets is not installed')\n")
    r = run_cli(["--mode", "tiny", "--data", "hf:roneneldan/TinyStories", "--output-dir", tmp_path / "o"],
                tmp_path, env_extra={"PYTHONPATH": str(fake.parent)})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install datasets" in lines[0], r.stderr

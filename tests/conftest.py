"""Shared fixtures: a small generated corpus, a shared token cache, and a runner for the real CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import torch
except ImportError:                 # the demo's tests run without torch
    torch = None

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SCRIPT = ROOT / "run_scaling_experiments_enhanced.py"

# Arguments that make a real end-to-end run take seconds on a 2-core CPU: tiny's machinery on two cosine
# sweeps (the seed's design; tests/test_wsd.py covers tiny's own WSD grid and its branches).
SECONDS_SIZED = ["--mode", "tiny", "--schedule", "cosine", "--vocab-size", "512", "--param-sizes", "25K,100K",
                 "--data-sizes", "16K,32K", "--data-model-size", "6.6K", "--max-steps", "30", "--batch-size", "8",
                 "--context-length", "64", "--eval-interval", "15", "--eval-batches", "2",
                 "--log-interval", "10", "--no-estimate"]


def make_text(n_sentences: int, seed: int = 0) -> str:
    """Pseudo-English with real structure (a small grammar), so models of different sizes learn it."""
    rng = np.random.default_rng(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "a small bird", "the teacher", "our team"]
    verbs = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers"]
    objects = ["the ball", "a red house", "the river", "an apple", "the long road", "a quiet song"]
    tails = ["today", "in the morning", "after dinner", "with care", "again and again", "at night"]
    lines = []
    for i in range(n_sentences):
        s = (f"{subjects[rng.integers(len(subjects))]} {verbs[rng.integers(len(verbs))]} "
             f"{objects[rng.integers(len(objects))]} {tails[rng.integers(len(tails))]}.")
        lines.append(s.capitalize() + (f" ({i % 97})" if i % 5 == 0 else ""))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text(12000))
    return path


@pytest.fixture(scope="session")
def byte_tokens(tmp_path_factory, corpus_file) -> Path:
    """The generated corpus as bytes in a uint16 token file: vocabulary 256, no tokenizer to train."""
    path = tmp_path_factory.mktemp("bytes") / "corpus.bin"
    np.frombuffer(corpus_file.read_bytes(), dtype=np.uint8).astype(np.uint16).tofile(path)
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(autouse=True)
def trains_on_the_cpu(monkeypatch):
    """Every test trains on the CPU, whatever the machine has: on a CUDA or Apple GPU, --device auto would
    switch on bf16 and torch.compile and other memory checks, and the tests' numbers are the CPU's. In
    this process CUDA and MPS look absent (a test about choosing a device patches them back in); child
    processes see no CUDA GPU, and the tests' command lines say --device cpu (on_cpu)."""
    if torch is not None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        if getattr(torch.backends, "mps", None) is not None:
            monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def on_cpu(args) -> list[str]:
    """A test's runner arguments with --device cpu added, unless the test picks a device itself."""
    args = [str(a) for a in args]
    return args if "--device" in args else [*args, "--device", "cpu"]


def run_cli(args, cwd, script=SCRIPT, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    args = on_cpu(args) if Path(script) == SCRIPT else list(map(str, args))
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# Tests marked slow (minutes on 2 cores) run only when asked: `pytest -m slow ...` or RUN_SLOW=1.
def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long statistical checks; run with -m slow or RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or "") or os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def run_records(out_dir) -> list[dict]:
    """A study folder's runs as full records (curves, definitions, timings), in results.json's points
    order: each run's file under runs/, or its points-table row where it has none (an interrupted run)."""
    out_dir = Path(out_dir)
    points = json.loads((out_dir / "results.json").read_text())["points"]
    out = []
    for p in points:
        path = out_dir / "runs" / f"{p['run_id']}.json"
        out.append(json.loads(path.read_text()) if path.exists() else dict(p))
    return out

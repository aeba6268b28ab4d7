"""Shared fixtures: a small generated corpus, a shared token cache, and a runner for the real CLI."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def run_cli(args, cwd, script=SCRIPT, timeout=600, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env,
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

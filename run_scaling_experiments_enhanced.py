#!/usr/bin/env python3
"""Measure neural scaling laws on your own machine, in one command.

    python run_scaling_experiments_enhanced.py --mode tiny     # CPU, minutes
    python run_scaling_experiments_enhanced.py --mode quick    # one GPU

Trains a ladder of GPT-style models (a parameter sweep at fixed steps and a data sweep at a fixed model
size), fits L(N) = c + a/N^b and L(D) = c + a/D^b, extrapolates to well-known model scales and writes
`results.json` (first) and the 2x2 figure `scaling_laws_complete.png` (after) into
`scaling_results_<mode>_v2/`.

Map of this file, in data-flow order:
    1. errors and small helpers      UserError, size parsing, atomic JSON
    2. presets                       modes, experiment plans, model-shape and learning-rate rules
    3. data                          built-in corpus, text/bin loaders, Hugging Face datasets, streaming
                                     BPE tokenizer and token cache, the repetition check, batches
    4. model                         GPT-2 style decoder and its closed-form parameter counts
    5. training                      device setup, LR schedule, one experiment, the plan's time estimate
    6. fitting                       power-law fits and predictions (pure functions)
    7. figure                        the 2x2 matplotlib figure
    8. CLI                           argparse, main()

`quick_scaling_demo.py` and `compare_quick_vs_real.py` import from this file; nothing is copied.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
EOT_TOKEN = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------
# 1. errors and small helpers: the user-facing exception, size strings, atomic files
# ----------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits with status 2."""


_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str) -> int:
    """'25K' -> 25000, '0.3M' -> 300000, '1B' -> 10**9; must be positive."""
    s = text.strip().upper().replace("_", "")
    suffix = s[-1] if s and s[-1] in _SUFFIXES and not s[-1].isdigit() else ""
    number = s[: len(s) - len(suffix)]
    try:
        value = float(number) * _SUFFIXES[suffix]
    except ValueError:
        raise UserError(f"cannot read '{text}' as a count: use a number with an optional K, M or B suffix, "
                        f"e.g. 25K, 0.3M, 1B") from None
    if not math.isfinite(value) or value < 1:
        raise UserError(f"'{text}' must be a positive count (e.g. 25K, 0.3M, 1B)")
    return int(round(value))


def parse_count_list(text: str) -> list[int]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"'{text}' is an empty list: give comma-separated counts such as 1M,3M,10M")
    return sorted(set(parse_count(t) for t in items))


def format_count(n: float) -> str:
    """25000 -> '25K', 1580032 -> '1.58M', 1.75e11 -> '175B'."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file in the same folder and rename, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def log(msg: str = "") -> None:
    """One flushed line on stdout, readable under `tail -f`."""
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# 2. presets: the modes, the rule that turns a parameter target into a model shape, the LR rule
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """Everything a mode decides. Sizes are targets for non-embedding parameters (N) and tokens (D)."""
    name: str
    param_sizes: tuple[int, ...]
    data_sizes: tuple[int, ...]
    steps: int                      # optimizer steps of every parameter-sweep run
    data_model_size: int            # N target of the data sweep's one model
    batch_size: int = 32            # sequences per micro-batch
    context_length: int = 256
    vocab_size: int = 10_000
    # shape rule: fixed depth (tiny) or an aspect ratio d_model / n_layer in Kaplan's flat region
    n_layer: int | None = None
    aspect_range: tuple[float, float] = (32.0, 128.0)
    head_dim: int = 64
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 50


# tiny: depth-2 models of width 32, 64, 128, 256 (N = 25K, 100K, 397K, 1.58M) for 1,000 steps of 16 x 128
# tokens, and the width-64 model on 0.25M to 2M tokens; a 2,048-token BPE because a larger vocabulary's
# output layer dominates these widths (4,096 halved the speed of the small models). Measured end to end in
# under 10 minutes on a 2-core CPU; wider or deeper ladders at this token budget did not separate.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", (25_000, 100_000, 400_000, 1_600_000), (250_000, 500_000, 1_000_000, 2_000_000),
                   steps=1000, data_model_size=100_000, batch_size=16, context_length=128, vocab_size=2048,
                   n_layer=2, head_dim=32, eval_interval=200, eval_batches=20, log_interval=50),
    "quick": Preset("quick", (5 * 10**6, 20 * 10**6, 50 * 10**6), (10 * 10**6, 50 * 10**6, 100 * 10**6),
                    steps=3000, data_model_size=20 * 10**6),
    "standard": Preset("standard", tuple(x * 10**6 for x in (5, 10, 20, 50, 100)),
                       tuple(x * 10**6 for x in (10, 50, 100, 200, 500)), steps=5000,
                       data_model_size=20 * 10**6, eval_interval=500),
    "full": Preset("full", tuple(x * 10**6 for x in (5, 10, 20, 50, 100, 200, 500)),
                   tuple(x * 10**6 for x in (10, 50, 100, 200, 500, 1000)), steps=8000,
                   data_model_size=50 * 10**6, eval_interval=500),
}


def n_params_nonembedding(n_layer: int, d_model: int) -> int:
    """Kaplan's N: every weight except token and position embeddings (the output layer is tied to them).

    Per block: attention qkv 3d^2+3d and projection d^2+d, MLP d*4d+4d and 4d*d+d, two LayerNorms 4d,
    i.e. 12 d^2 + 13 d; plus the final LayerNorm's 2d.
    """
    return n_layer * (12 * d_model * d_model + 13 * d_model) + 2 * d_model


def n_params_total(n_layer: int, d_model: int, vocab_size: int, context_length: int) -> int:
    return n_params_nonembedding(n_layer, d_model) + vocab_size * d_model + context_length * d_model


def choose_shape(target: int, preset: Preset) -> tuple[int, int, int]:
    """(n_layer, d_model, n_head) whose non-embedding count is closest to `target` in log space.

    d_model is a multiple of the preset's head_dim (n_head = d_model / head_dim). With a fixed depth only
    the width varies; otherwise depths 1..64 are tried with d_model / n_layer kept inside the preset's
    aspect range (Kaplan et al. 2020 found loss flat within roughly 32..128 at fixed N), and among
    equally close shapes the aspect ratio nearest 64 wins.
    """
    hd = preset.head_dim
    layers = [preset.n_layer] if preset.n_layer else range(1, 65)
    best = None
    for n_layer in layers:
        width = math.sqrt(target / (12 * n_layer))
        for d_model in {max(hd, int(width // hd) * hd), max(hd, int(math.ceil(width / hd)) * hd)}:
            aspect = d_model / n_layer
            if not preset.n_layer and not (preset.aspect_range[0] <= aspect <= preset.aspect_range[1]):
                continue
            miss = abs(math.log(n_params_nonembedding(n_layer, d_model) / target))
            key = (round(miss, 3), abs(math.log(aspect / 64)))
            if best is None or key < best[0]:
                best = (key, (n_layer, d_model, d_model // hd))
    if best is None:
        raise UserError(f"no model shape fits a target of {format_count(target)} non-embedding parameters "
                        f"with d_model/n_layer in {preset.aspect_range}: choose a size of at least "
                        f"{format_count(n_params_nonembedding(1, int(preset.aspect_range[0])))}")
    return best[1]


def default_peak_lr(d_model: int) -> float:
    """Peak learning rate for a model of this width: min(1e-2, 0.4 / d_model).

    Measured here on the tiny ladder, the best rate falls with width and 2x past it costs 0.3-0.4 nats;
    0.4/d_model also lands within 15% of GPT-3's published rates (6e-4 at d=768, 2e-4 at d=2048).
    """
    return min(1e-2, 0.4 / d_model)


@dataclass
class Experiment:
    """One training run of the plan."""
    name: str
    sweep: str                     # "params" or "data"
    target: int                    # the preset's N (params sweep) or D (data sweep)
    n_layer: int
    d_model: int
    n_head: int
    steps: int
    tokens: int                    # tokens actually trained on: steps * tokens_per_step
    peak_lr: float
    n_params_nonembedding: int
    n_params_total: int

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params_nonembedding * self.tokens


@dataclass
class RunConfig:
    """Every setting of a run; recorded whole in results.json under `config`."""
    mode: str
    param_sizes: list[int]
    data_sizes: list[int]
    data_model_size: int
    steps: int
    batch_size: int
    grad_accum: int
    context_length: int
    vocab_size: int
    lr: float | None               # None: the per-width rule default_peak_lr
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 250
    eval_batches: int = 20
    log_interval: int = 50
    data: str = "builtin"
    device: str = "auto"
    output_dir: str = ""
    cache_dir: str = ""
    # data preparation (section 3): dataset column and split, tokenizer threads, BPE sample, repetition
    text_column: str = "text"
    split: str = "train"
    num_proc: int | None = None
    bpe_sample_chars: int | None = None       # None: BPE_SAMPLE_CHARS
    no_repeat: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length * self.grad_accum


def build_plan(cfg: RunConfig, preset: Preset) -> list[Experiment]:
    """The parameter sweep (every size, cfg.steps steps) then the data sweep (one size, D tokens each)."""
    def make(name, sweep, target, n_target, steps):
        n_layer, d_model, n_head = choose_shape(n_target, preset)
        return Experiment(
            name=name, sweep=sweep, target=target, n_layer=n_layer, d_model=d_model, n_head=n_head,
            steps=steps, tokens=steps * cfg.tokens_per_step,
            peak_lr=cfg.lr if cfg.lr is not None else default_peak_lr(d_model),
            n_params_nonembedding=n_params_nonembedding(n_layer, d_model),
            n_params_total=n_params_total(n_layer, d_model, cfg.vocab_size, cfg.context_length))

    plan = [make(f"params-N{format_count(n)}", "params", n, n, cfg.steps) for n in cfg.param_sizes]
    for d in cfg.data_sizes:
        steps = max(1, round(d / cfg.tokens_per_step))
        plan.append(make(f"data-D{format_count(d)}", "data", d, cfg.data_model_size, steps))
    return plan


# ----------------------------------------------------------------------------------------------------
# 3. data: built-in corpus, text/token files, HF datasets, streaming BPE + token cache, repetition, batches
# ----------------------------------------------------------------------------------------------------

VAL_EVERY = 20                     # every 20th piece of text (5%) is validation, never trained on
PIECE_CHARS = 100_000              # documents are cut into pieces of about this size before the split
READ_BLOCK_BYTES = 1 << 18         # text files are read and decoded 256 KiB at a time, never whole
# Characters per tokenizer call and thread. The Rust tokenizer keeps ~100 bytes per token until the
# call returns (ids, offsets, token strings), so this bounds preparation's memory: ~3 MB per thread.
ENCODE_CHARS_PER_THREAD = 1 << 17
# The BPE trains on at most this much training text. Merges for a 10K-65K vocabulary are settled long
# before 200M characters, and the trainer's word counts grow with the text it sees, so a huge corpus
# gets an evenly strided sample (recorded in results.json) instead of all of it.
BPE_SAMPLE_CHARS = 200_000_000


def builtin_corpus_files() -> tuple[str, list[Path]]:
    """The running interpreter's standard library: its .py sources (tests and pydoc's English topic
    documentation included, site-packages excluded), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    name = f"python-stdlib-{platform.python_version()}"
    return name, files


def text_corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"--data {path}: the folder holds no files; give a text file, a folder of text "
                        f"files or a .bin token file")
    return files


def is_binary_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\x00" in f.read(4096)


def iter_file_text(path: Path) -> Iterator[str]:
    """The file's text as decoded blocks (UTF-8, bad bytes replaced): a file larger than memory streams.
    The blocks join to exactly `path.read_bytes().decode('utf-8', errors='replace')`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_BLOCK_BYTES), b""):
            text = decoder.decode(block)
            if text:
                yield text
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def read_documents(files: list[Path], root: Path | None) -> list[str]:
    """Every text file whole, in memory (small corpora and tests only; load_corpus streams instead)."""
    docs = ["".join(iter_file_text(p)) for p in files if not is_binary_file(p)]
    if not any(docs):
        raise UserError(f"--data {root}: no UTF-8 text found")
    return docs


def piece_size(n_chars: int) -> int:
    """Characters per piece: PIECE_CHARS, smaller for a small corpus so it still yields ~400 pieces."""
    return int(min(PIECE_CHARS, max(1000, n_chars // 400)))


def iter_pieces(documents: Iterable[Iterable[str]], size: int) -> Iterator[tuple[str, bool]]:
    """(piece, is_validation) for every piece, streaming: each document (an iterable of text blocks) is
    cut into pieces of at most `size` characters, at the last line end inside the limit when there is
    one, and every VAL_EVERY-th piece counting across documents goes to validation. Holds one document's
    current block and one piece, never a whole document."""
    i = n_train = 0
    any_val = False
    held = None               # the latest training piece, held back: a corpus too small for a
    for doc in documents:     # validation piece gives its last training piece to validation instead
        blocks = iter(doc)
        buf, pos, exhausted = "", 0, False
        while True:
            while not exhausted and len(buf) - pos <= size:       # need > size chars to cut inside
                block = next(blocks, None)
                if block is None:
                    exhausted = True
                else:
                    buf, pos = buf[pos:] + block, 0
            if pos >= len(buf):
                break
            end = len(buf)
            if len(buf) - pos > size:
                end = pos + size
                nl = buf.rfind("\n", pos, end)
                end = nl + 1 if nl > pos else end
            piece, pos = buf[pos:end], end
            if i % VAL_EVERY == VAL_EVERY // 2:
                any_val = True
                yield piece, True
            else:
                if held is not None:
                    n_train += 1
                    yield held, False
                held = piece
            i += 1
    if held is None or (not any_val and n_train == 0):
        raise UserError("the corpus is too small to split into training and validation text")
    yield held, not any_val


def split_pieces(docs: list[str]) -> tuple[list[str], list[str]]:
    """Cut documents into pieces at line ends and give every VAL_EVERY-th piece to validation.
    Deterministic, and train and validation never share a character."""
    train, val = [], []
    for piece, is_val in iter_pieces(([d] for d in docs), piece_size(sum(len(d) for d in docs))):
        (val if is_val else train).append(piece)
    return train, val


@dataclass
class Corpus:
    """Token arrays (memory-mapped) and their record for results.json."""
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    record: dict


@dataclass
class CorpusSource:
    """Where text comes from, before tokenization: a re-iterable stream of documents (each an iterable
    of text blocks), what identifies it for the cache key, and its record for results.json."""
    name: str
    documents: Callable[[], Iterator[Iterable[str]]]   # a fresh pass over the corpus at every call
    identity: str             # content sha256, or dataset name + config + revision for a Hub stream
    piece_chars: int
    n_chars: int | None       # known before tokenizing (text files) or counted while tokenizing
    record: dict


def default_cache_dir() -> Path:
    env = os.environ.get("SCALING_LAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaling-lab"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def text_file_source(data: str) -> CorpusSource:
    """The built-in corpus, a text file or a folder of text files. One streaming pass hashes and counts
    the text, so the cache key is the content's sha256 and a second run tokenizes nothing."""
    if data == "builtin":
        name, files = builtin_corpus_files()
        root = None
    else:
        root = Path(data).expanduser()
        name, files = str(root.resolve()), text_corpus_files(root)
    files = [p for p in files if not is_binary_file(p)]      # binary files inside a text folder: skipped
    sha, n_chars = hashlib.sha256(), 0
    for p in files:
        for block in iter_file_text(p):
            sha.update(block.encode("utf-8"))
            n_chars += len(block)
        sha.update(b"\x00")
    if not n_chars:
        raise UserError(f"--data {root}: no UTF-8 text found")
    record = {"name": name, "source": "builtin" if data == "builtin" else "text files",
              "sha256": sha.hexdigest(), "n_files": len(files), "n_characters": n_chars}
    return CorpusSource(name, lambda: (iter_file_text(p) for p in files), sha.hexdigest(),
                        piece_size(n_chars), n_chars, record)


def load_corpus(data: str, vocab_size: int, cache_dir: Path, *, text_column: str = "text",
                split: str = "train", num_proc: int | None = None,
                bpe_sample_chars: int = BPE_SAMPLE_CHARS) -> Corpus:
    """Text corpora are tokenized once with a byte-level BPE and cached under a key made from the
    corpus's identity (content sha256, or Hub name + config + revision), the vocabulary and the split
    rule; a second run only memory-maps the cache. `data` is 'builtin', a text file or folder, a .bin
    token file, 'hf:NAME[:CONFIG][@REVISION]', or a local dataset folder (save_to_disk, parquet, jsonl)."""
    if data.endswith(".bin") and Path(data).expanduser().is_file():
        return load_token_file(Path(data).expanduser(), vocab_size)
    t0 = time.time()
    local = Path(data).expanduser()
    if data.startswith("hf:") or (data != "builtin" and local.exists() and dataset_files_kind(local)):
        source = dataset_source(data, text_column, split)
    else:
        if data != "builtin" and not local.exists():
            raise UserError(f"--data {data}: no such file or folder; give a text file, a folder of text "
                            f"files, a .bin token file, hf:NAME[:CONFIG], or 'builtin'")
        source = text_file_source(data)
    split_rule = f"every{VAL_EVERY}-of-{source.piece_chars}chars"
    key_text = f"{source.identity}|bpe-bytelevel-v1|{vocab_size}|{split_rule}"
    if source.n_chars is None or source.n_chars > bpe_sample_chars:
        key_text += f"|bpe-sample-{bpe_sample_chars}"       # only corpora the sample cap can touch
    entry = Path(cache_dir) / hashlib.sha256(key_text.encode()).hexdigest()[:16]
    if not (entry / "meta.json").exists():
        size = f", {source.n_chars / 1e6:.1f}M characters" if source.n_chars is not None else ""
        log(f"data: tokenizing {source.name} ({source.record.get('n_files', 'streamed')} files{size}) "
            f"with a {vocab_size}-token BPE; cached for later runs in {entry}")
        build_token_cache(source, vocab_size, entry, bpe_sample_chars=bpe_sample_chars, num_proc=num_proc)
    else:
        log(f"data: using cached tokens for {source.name} from {entry}")
    meta = json.loads((entry / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(entry / "val.bin", dtype=dtype, mode="r")
    if "tokens_sha256" not in meta:   # a cache written before fingerprints were recorded: add it once
        sha = hashlib.sha256()
        for split_name in ("train", "val"):
            sha.update(_file_sha256(entry / f"{split_name}.bin").encode())
        meta["tokens_sha256"] = sha.hexdigest()
        write_json_atomic(entry / "meta.json", meta)
    record = {**source.record,
              **{k: meta[k] for k in ("sha256", "n_documents", "n_characters") if k in meta},
              "tokenizer": f"byte-level BPE (Hugging Face tokenizers), vocabulary {vocab_size}",
              "tokenizer_path": str(entry / "tokenizer.json"), "vocab_size": vocab_size,
              "token_dtype": dtype.name, "n_train_tokens": int(len(train)), "n_val_tokens": int(len(val)),
              "validation_split": f"every {VAL_EVERY}th piece of <= {source.piece_chars} characters",
              "bpe_training_text": meta.get("bpe_training_text", "all training text"),
              "fingerprint": meta["tokens_sha256"], "cache_key": entry.name,
              "prepare_time_s": round(time.time() - t0, 2)}
    log(f"data: {format_count(len(train))} training and {format_count(len(val))} validation tokens "
        f"({time.time() - t0:.1f}s)")
    return Corpus(train, val, vocab_size, record)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


# --- Hugging Face datasets: Hub names, save_to_disk folders, parquet/jsonl files ---------------------

_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_ROW_FILE_KINDS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".jsonl.gz": "json",
                   ".json.gz": "json"}


def _row_file_kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((kind for ext, kind in _ROW_FILE_KINDS.items() if name.endswith(ext)), None)


def dataset_files_kind(path: Path) -> str | None:
    """'saved' for a datasets.save_to_disk folder, 'parquet' or 'json' for a file or folder holding only
    such files (hidden files ignored), None for anything else (read as plain text)."""
    if path.is_dir() and any((path / m).exists() for m in _SAVED_MARKERS):
        return "saved"
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                           and not any(part.startswith(".") for part in p.parts)]
    kinds = {_row_file_kind(p) for p in files}
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("--data hf:... and dataset folders need the Hugging Face datasets library: "
                        "pip install datasets") from None
    return datasets


def parse_hf_spec(data: str) -> tuple[str, str | None, str | None]:
    """'hf:NAME[:CONFIG][@REVISION]' -> (name, config, revision); 'hf:/a/path' -> ('/a/path', None, None)."""
    spec = data[3:] if data.startswith("hf:") else data
    revision = None
    if "@" in spec and not Path(spec).expanduser().exists():
        spec, revision = spec.rsplit("@", 1)
    if Path(spec).expanduser().exists():
        return spec, None, revision
    name, _, config = spec.partition(":")
    if not name:
        raise UserError(f"--data {data}: give a dataset name, e.g. hf:roneneldan/TinyStories or "
                        f"hf:HuggingFaceFW/fineweb-edu:sample-10BT")
    return name, config or None, revision


def hub_revision(name: str, revision: str | None) -> str | None:
    """The commit sha of a Hub dataset, or None when it cannot be asked (offline)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return revision
    try:
        from huggingface_hub import HfApi
        return HfApi().dataset_info(name, revision=revision, timeout=20).sha
    except Exception:          # offline, private or renamed: the run goes on, the record says unknown
        return revision


def dataset_source(data: str, text_column: str, split: str) -> CorpusSource:
    """Rows of a Hugging Face dataset, one document each, streamed (never loaded whole). A Hub dataset
    streams from the Hub; a save_to_disk folder is memory-mapped Arrow; parquet/jsonl files stream."""
    datasets = _import_datasets()
    name, config, revision = parse_hf_spec(data)
    local = Path(name).expanduser()
    record = {"name": data, "dataset": name, "config": config, "split": split, "text_column": text_column}
    if local.exists():
        kind = dataset_files_kind(local)
        if kind is None:
            raise UserError(f"--data {data}: not a dataset folder (save_to_disk output, or only .parquet or "
                            f"only .jsonl files); drop the hf: prefix to read it as text")
        files = ([p for p in sorted(local.rglob("*")) if p.suffix == ".arrow"] if kind == "saved"
                 else [local] if local.is_file()
                 else sorted(p for p in local.rglob("*") if p.is_file() and _row_file_kind(p)))
        sha = hashlib.sha256()              # identity: the data files' bytes, so a changed file re-tokenizes
        for p in files:
            sha.update(str(p.relative_to(local) if local.is_dir() else p.name).encode() + b"\x00")
            sha.update(_file_sha256(p).encode())
        identity = f"dataset-files|{sha.hexdigest()}|{split}|{text_column}"
        record.update(dataset=str(local.resolve()), source={"saved": "save_to_disk folder",
                      "parquet": "parquet files", "json": "jsonl files"}[kind],
                      files_sha256=sha.hexdigest(), n_files=len(files), revision=None)

        def open_rows():
            if kind == "saved":
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise UserError(f"--split {split}: {data} holds splits {', '.join(ds)}")
                    ds = ds[split]
                return ds
            return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                         streaming=True)
    else:
        revision = hub_revision(name, revision)
        identity = f"hub|{name}|{config}|{split}|{revision or 'unknown-revision'}|{text_column}"
        record.update(source="Hugging Face Hub (streamed)", revision=revision)
        if revision is None:
            log(f"data: could not resolve the Hub revision of {name}; the cache is keyed by name only")

        def open_rows():
            try:
                return datasets.load_dataset(name, config, split=split, streaming=True, revision=revision)
            except Exception as e:
                raise UserError(f"--data {data}: could not open it with datasets.load_dataset "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def documents():
        rows = open_rows()
        columns = rows.column_names
        if columns is not None and text_column not in columns:
            raise UserError(f"--text-column {text_column}: {data} has columns {', '.join(columns)}; pass "
                            f"--text-column NAME")
        rows = rows.select_columns([text_column])
        batches = rows.iter(batch_size=1000)
        for batch in batches:
            for text in batch[text_column]:
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise UserError(f"--text-column {text_column}: holds {type(text).__name__}, not text")
                yield (text,)

    # rows shorter than PIECE_CHARS are whole pieces: every 20th row is validation
    return CorpusSource(data, documents, identity, PIECE_CHARS, None, record)


# --- tokenizer and token files -------------------------------------------------------------------------

def set_tokenizer_threads(num_proc: int | None) -> None:
    """Threads of the Rust tokenizer (its rayon pool reads these once, at first use)."""
    if num_proc:
        os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(num_proc)
        if num_proc == 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"


def train_bpe(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def bpe_sample(pieces: Iterable[tuple[str, bool]], max_chars: int, stride: int, taken: dict) -> Iterator[str]:
    """Every `stride`-th training piece until `max_chars` characters; counts what it took in `taken`."""
    k = 0
    for piece, is_val in pieces:
        if is_val:
            continue
        if k % stride == 0:
            taken["chars"] += len(piece)
            yield piece
            if taken["chars"] >= max_chars:
                taken["capped"] = True
                return
        k += 1


class _TokenWriter:
    """Appends pieces' tokens (an end-of-text token after each) to a file in bounded batches."""

    def __init__(self, path: Path, tok, dtype, batch_chars: int):
        self.f, self.tok, self.dtype, self.batch_chars = open(path, "wb"), tok, dtype, batch_chars
        self.eot = np.array([tok.token_to_id(EOT_TOKEN)], dtype=dtype)
        self.batch, self.chars, self.n_tokens, self.sha = [], 0, 0, hashlib.sha256()
        self.encode = getattr(tok, "encode_batch_fast", tok.encode_batch)   # same ids, no offsets

    def add(self, piece: str) -> None:
        self.batch.append(piece)
        self.chars += len(piece)
        if self.chars >= self.batch_chars:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            ids = np.concatenate([a for e in self.encode(self.batch)
                                  for a in (np.asarray(e.ids, dtype=self.dtype), self.eot)])
            ids.tofile(self.f)
            self.sha.update(ids.tobytes())
            self.n_tokens += len(ids)
        self.batch, self.chars = [], 0

    def close(self) -> None:
        self.flush()
        self.f.close()


def build_token_cache(source: CorpusSource, vocab_size: int, entry: Path, *,
                      bpe_sample_chars: int = BPE_SAMPLE_CHARS, num_proc: int | None = None) -> dict:
    """Train the tokenizer on (a bounded sample of) the training pieces, encode both splits in bounded
    batches straight to disk (an end-of-text token after every piece), then move the folder into place
    in one rename. Nothing here holds more than a batch of text or tokens."""
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: use at least 257")
    set_tokenizer_threads(num_proc)
    t0 = time.time()
    stride = 1 if source.n_chars is None else max(1, math.ceil(source.n_chars / bpe_sample_chars))
    taken = {"chars": 0, "capped": False}
    tok = train_bpe(bpe_sample(iter_pieces(source.documents(), source.piece_chars), bpe_sample_chars,
                               stride, taken), vocab_size)
    bpe_s = time.time() - t0
    dtype = token_dtype(tok.get_vocab_size())
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    sha, counts = hashlib.sha256(), {"docs": 0, "chars": 0}

    def documents_once():
        # iter_pieces wants an iterable of documents, each an iterable of blocks: regroup the flat stream
        for doc in source.documents():
            counts["docs"] += 1

            def blocks(doc=doc):
                for block in doc:
                    sha.update(block.encode("utf-8"))
                    counts["chars"] += len(block)
                    yield block
                sha.update(b"\x00")
            yield blocks()

    batch_chars = ENCODE_CHARS_PER_THREAD * (num_proc or os.cpu_count() or 1)
    try:
        writers = {False: _TokenWriter(tmp / "train.bin", tok, dtype, batch_chars),
                   True: _TokenWriter(tmp / "val.bin", tok, dtype, batch_chars)}
        for piece, is_val in iter_pieces(documents_once(), source.piece_chars):
            writers[is_val].add(piece)
        for w in writers.values():
            w.close()
    except BaseException:             # a bad row or an interrupt: leave no half-written folder behind
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokens_sha = hashlib.sha256(writers[False].sha.hexdigest().encode() + writers[True].sha.hexdigest().encode())
    sample = ("all training text" if not taken["capped"] and stride == 1 else
              f"{taken['chars']:,} characters: " + (f"1 in {stride} training pieces" if stride > 1
                                                     else "the first training pieces"))
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "sha256": sha.hexdigest(),
            "n_documents": counts["docs"], "n_characters": counts["chars"],
            "n_train_tokens": writers[False].n_tokens, "n_val_tokens": writers[True].n_tokens,
            "tokens_sha256": tokens_sha.hexdigest(), "bpe_training_text": sample,
            "bpe_training_chars": taken["chars"], "bpe_time_s": round(bpe_s, 2),
            "encode_time_s": round(time.time() - t0 - bpe_s, 2)}
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if entry.exists():                # another process finished first; keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, entry)
    rate = counts["chars"] / max(meta["encode_time_s"], 0.01)
    log(f"data: BPE trained on {sample} in {bpe_s:.1f}s; {format_count(counts['chars'])} characters "
        f"encoded in {meta['encode_time_s']:.1f}s ({format_count(rate)} characters/s)")
    return meta


def token_file_dtype(path: Path):
    """A .bin token file holds uint16 ids; one named *.u32.bin holds uint32 (vocabularies above 65,536)."""
    return np.uint32 if path.name.lower().endswith(".u32.bin") else np.uint16


def load_token_file(path: Path, vocab_size: int) -> Corpus:
    """A pre-tokenized file (uint16, or uint32 when named *.u32.bin): the last 5% is validation, the
    rest training (views of one memory map, no copy)."""
    dtype = np.dtype(token_file_dtype(path))
    if path.stat().st_size % dtype.itemsize:
        raise UserError(f"--data {path}: {path.stat().st_size} bytes is not a whole number of {dtype.name} "
                        f"tokens; name a uint32 file *.u32.bin, a uint16 file *.bin")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) < 1000:
        raise UserError(f"--data {path}: only {len(tokens)} tokens; a .bin file needs at least 1000 {dtype.name} "
                        f"tokens")
    max_id = int(max(tokens[i:i + 2**24].max() for i in range(0, len(tokens), 2**24)))
    if max_id >= vocab_size:
        raise UserError(f"--data {path}: holds token id {max_id} but the vocabulary is {vocab_size}; "
                        f"pass --vocab-size {max_id + 1} or more")
    cut = len(tokens) - max(len(tokens) // VAL_EVERY, 1)
    sha = _file_sha256(path)
    record = {"name": str(path.resolve()), "source": "token file", "sha256": sha, "fingerprint": sha,
              "tokenizer": "pre-tokenized (.bin)", "token_dtype": dtype.name,
              "vocab_size": vocab_size, "n_train_tokens": int(cut), "n_val_tokens": int(len(tokens) - cut),
              "validation_split": "last 5% of the file"}
    return Corpus(tokens[:cut], tokens[cut:], vocab_size, record)


def check_data_budget(plan: list, n_train_tokens: int, no_repeat: bool = False) -> dict:
    """How many epochs of the training split each run of the plan reads (tokens trained / training
    tokens). With `no_repeat`, a plan in which any run needs more tokens than the split holds is refused
    with the number missing. Runs sample windows at random offsets, so even under one epoch a window can
    recur; this check guarantees only that the corpus is large enough for one pass."""
    runs = [{"name": e.name, "sweep": e.sweep, "tokens": int(e.tokens),
             "epochs": round(e.tokens / n_train_tokens, 4),
             "tokens_missing": max(0, int(e.tokens) - int(n_train_tokens))} for e in plan]
    short = [r for r in runs if r["tokens_missing"] > 0]
    if no_repeat and short:
        worst = max(short, key=lambda r: r["tokens_missing"])
        raise UserError(f"--no-repeat: {worst['name']} trains on {worst['tokens']:,} tokens but the corpus "
                        f"has {n_train_tokens:,} training tokens, {worst['tokens_missing']:,} missing "
                        f"({len(short)} of {len(runs)} runs would repeat data); use a larger corpus or "
                        f"smaller --data-sizes/--max-steps")
    return {"n_train_tokens": int(n_train_tokens), "no_repeat": no_repeat, "repeats": bool(short),
            "max_epochs": max((r["epochs"] for r in runs), default=0.0), "runs": runs}


def data_budget_lines(budget: dict) -> list[str]:
    """The log lines that say which runs repeat data, and by how much."""
    n = budget["n_train_tokens"]
    lines = [f"warning: {r['name']} trains on {format_count(r['tokens'])} tokens, {r['epochs']:.2f} epochs of "
             f"this corpus's {format_count(n)} training tokens: data repeats ({format_count(r['tokens_missing'])} "
             f"more tokens would avoid it; --no-repeat refuses such a plan)" for r in budget["runs"]
             if r["tokens_missing"] > 0]
    return lines or [f"data: the largest run reads {budget['max_epochs']:.2f} epochs of the "
                     f"{format_count(n)} training tokens; no run repeats data"]


def batch_offsets(n_tokens: int, context_length: int, batch_size: int, *key: int) -> np.ndarray:
    """Random window starts, a pure function of the key (seed, run, step, micro-step): any step's batch
    can be recomputed, so a run needs no data-loader state to resume."""
    rng = np.random.default_rng(list(key))
    return rng.integers(0, n_tokens - context_length - 1, size=batch_size)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, context_length: int):
    """Inputs and next-token targets, each (B, T) int64, sliced from the memory map."""
    import torch
    idx = offsets[:, None] + np.arange(context_length + 1)
    chunk = torch.from_numpy(tokens[idx].astype(np.int64))      # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------------------------------
# 4. model: a GPT-2 style decoder (pre-LayerNorm, SDPA causal attention, GELU MLP, tied embeddings)
# ----------------------------------------------------------------------------------------------------

def build_model(n_layer: int, d_model: int, n_head: int, vocab_size: int, context_length: int):
    """Imported lazily so the fitting and figure code (and quick_scaling_demo.py) need no torch."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            # (B, T, C) -> (B, n_head, T, head_dim)
            q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.proj = nn.Linear(4 * d_model, d_model)

        def forward(self, x):
            return self.proj(F.gelu(self.fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(d_model)
            self.attn = CausalSelfAttention()
            self.ln2 = nn.LayerNorm(d_model)
            self.mlp = MLP()

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_emb = nn.Embedding(vocab_size, d_model)
            self.pos_emb = nn.Embedding(context_length, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d_model)
            self.apply(self._init)
            # GPT-2: residual projections scaled by 1/sqrt(2 n_layer) so the residual stream's variance
            # does not grow with depth
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

        @staticmethod
        def _init(m):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 0.02)

        def forward(self, idx, targets=None):
            B, T = idx.shape
            pos = torch.arange(T, device=idx.device)
            x = self.tok_emb(idx) + self.pos_emb(pos)                   # (B, T, C)
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.tok_emb.weight.T                # tied output layer, (B, T, V)
            if targets is None:
                return logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

        def count_params(self) -> tuple[int, int]:
            total = sum(p.numel() for p in self.parameters())
            emb = self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
            return total - emb, total

    return GPT()


def configure_optimizer(model, lr: float, weight_decay: float, fused: bool):
    """AdamW, betas (0.9, 0.95); matrices are weight-decayed, biases and LayerNorm gains are not."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **kwargs)


# ----------------------------------------------------------------------------------------------------
# 5. training: device, LR schedule, one experiment, the plan's time estimate
# ----------------------------------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, peak_lr: float, warmup_frac: float = 0.1,
          min_lr_frac: float = 0.1) -> float:
    """Linear warmup over the first warmup_frac of the steps, then cosine decay that reaches
    min_lr_frac * peak exactly at the run's last step (step = total_steps - 1)."""
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    return peak_lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class DeviceInfo:
    name: str                       # "cuda", "mps" or "cpu"
    description: str
    dtype: str                      # "bf16" (autocast) or "fp32"


def setup_device(requested: str) -> DeviceInfo:
    import torch
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), "bf16")
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps: Apple's MPS backend is not available; use --device auto or cpu")
        return DeviceInfo("mps", "Apple MPS", "fp32")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return DeviceInfo("cpu", f"{platform.processor() or platform.machine()} ({threads} threads)", "fp32")


class Trainer:
    """Trains one experiment; holds the device, the corpus and the run's settings."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, device: DeviceInfo, progress_bar: bool = False):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        self.progress_bar = progress_bar
        self.val_offsets = batch_offsets(len(corpus.val), cfg.context_length,
                                         cfg.batch_size * cfg.eval_batches, 20240, 0)

    def autocast(self):
        import contextlib
        import torch
        if self.device.dtype == "bf16":
            return torch.autocast(device_type=self.device.name, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def new_model(self, exp: Experiment, seed: int):
        import torch
        torch.manual_seed(seed)
        model = build_model(exp.n_layer, exp.d_model, exp.n_head, self.corpus.vocab_size,
                            self.cfg.context_length).to(self.device.name)
        return model

    def evaluate(self, model) -> float:
        """Mean loss over the fixed validation batches (the same windows for every experiment)."""
        import torch
        cfg = self.cfg
        model.eval()
        losses = []
        with torch.no_grad(), self.autocast():
            for i in range(cfg.eval_batches):
                offs = self.val_offsets[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                x, y = get_batch(self.corpus.val, offs, cfg.context_length)
                losses.append(model(x.to(self.device.name), y.to(self.device.name)).float())
        model.train()
        return float(torch.stack(losses).mean())

    def train_step(self, model, opt, exp: Experiment, step: int, stream: int):
        """One optimizer step over grad_accum micro-batches; returns (mean train loss as a device tensor,
        so the step loop need not wait for the device, and the lr)."""
        import torch
        cfg = self.cfg
        lr = lr_at(step, exp.steps, exp.peak_lr, cfg.warmup_frac, cfg.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=self.device.name)
        for micro in range(cfg.grad_accum):
            offs = batch_offsets(len(self.corpus.train), cfg.context_length, cfg.batch_size,
                                 cfg.seed, stream, step, micro)
            x, y = get_batch(self.corpus.train, offs, cfg.context_length)
            x, y = x.to(self.device.name, non_blocking=True), y.to(self.device.name, non_blocking=True)
            with self.autocast():
                loss = model(x, y) / cfg.grad_accum
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, lr

    def run(self, exp: Experiment, index: int) -> dict:
        """Train one experiment from scratch and return its results.json record."""
        import torch
        cfg = self.cfg
        stream = int(hashlib.sha256(exp.name.encode()).hexdigest()[:8], 16)   # this run's data stream
        model = self.new_model(exp, cfg.seed * 1_000_003 + index)
        n_nonemb, n_total = model.count_params()
        assert n_nonemb == exp.n_params_nonembedding, (n_nonemb, exp.n_params_nonembedding)
        opt = configure_optimizer(model, exp.peak_lr, cfg.weight_decay, fused=self.device.name == "cuda")
        curve = {"step": [], "tokens": [], "train_loss": [], "val_loss": [], "lr": [],
                 "eval_step": [], "eval_tokens": []}
        initial = self.evaluate(model)
        curve["eval_step"].append(0)
        curve["eval_tokens"].append(0)
        curve["val_loss"].append(initial)
        epochs = exp.tokens / len(self.corpus.train)
        log(f"[{exp.name}] start: N={format_count(n_nonemb)} non-embedding ({format_count(n_total)} total), "
            f"n_layer={exp.n_layer} d_model={exp.d_model} n_head={exp.n_head}, {exp.steps} steps, "
            f"{format_count(exp.tokens)} tokens ({epochs:.2f} epochs), peak lr {exp.peak_lr:.2e}, "
            f"initial val loss {initial:.3f}")
        bar = None
        if self.progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=exp.steps, desc=exp.name, leave=False, file=sys.stderr)
        t_start = time.time()
        t_last, step_last = t_start, 0
        window = []                   # train losses since the last log line, still on the device
        for step in range(exp.steps):
            loss, lr = self.train_step(model, opt, exp, step, stream)
            window.append(loss)
            last = step == exp.steps - 1
            if (step + 1) % cfg.log_interval == 0 or last:
                train_loss = float(torch.stack(window).mean())    # the only host sync of the interval
                window = []
                now = time.time()
                tok_s = (step + 1 - step_last) * cfg.tokens_per_step / max(now - t_last, 1e-9)
                t_last, step_last = now, step + 1
                eta = (exp.steps - step - 1) * cfg.tokens_per_step / max(tok_s, 1e-9)
                curve["step"].append(step + 1)
                curve["tokens"].append((step + 1) * cfg.tokens_per_step)
                curve["train_loss"].append(round(train_loss, 5))
                curve["lr"].append(lr)
                line = (f"[{exp.name}] step {step + 1}/{exp.steps} | loss {train_loss:.3f} | lr {lr:.2e} | "
                        f"{tok_s / 1e3:.1f}k tok/s | eta {format_duration(eta)}")
                if not math.isfinite(train_loss):
                    log(line + " | non-finite loss: stopping this run")
                    break
                (bar.write if bar else log)(line)
            if (step + 1) % cfg.eval_interval == 0 or last:
                v = self.evaluate(model)
                curve["eval_step"].append(step + 1)
                curve["eval_tokens"].append((step + 1) * cfg.tokens_per_step)
                curve["val_loss"].append(v)
                (bar.write if bar else log)(f"[{exp.name}] eval step {step + 1}: val loss {v:.4f}")
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        wall = time.time() - t_start
        final = curve["val_loss"][-1]
        finite = math.isfinite(final) and curve["eval_step"][-1] == exp.steps
        record = {
            "name": exp.name, "sweep": exp.sweep, "target": exp.target,
            "n_params_nonembedding": n_nonemb, "n_params_total": n_total,
            "n_layer": exp.n_layer, "d_model": exp.d_model, "n_head": exp.n_head,
            "tokens": exp.tokens, "steps": exp.steps, "tokens_per_step": cfg.tokens_per_step,
            "epochs": round(epochs, 4), "peak_lr": exp.peak_lr, "flops": exp.flops, "seed": cfg.seed,
            "initial_loss": initial, "final_val_loss": final if finite else None,
            "status": "completed" if finite else "diverged",
            "wall_time_s": round(wall, 2), "tokens_per_s": round(exp.steps * cfg.tokens_per_step / wall, 1),
            "curve": curve,
        }
        log(f"[{exp.name}] done: final val loss {final:.4f} (initial {initial:.3f}) in "
            f"{format_duration(wall)}, {record['tokens_per_s'] / 1e3:.1f}k tok/s")
        return record


def estimate_wall_time(trainer: Trainer, plan: list[Experiment], budget_s: float = 30.0) -> dict[str, float]:
    """Seconds per experiment, from a few timed steps of each distinct shape on this device.

    Shapes are timed from the smallest up; once a step would take long, the larger shapes are
    estimated from the FLOP rate of the largest timed one (6 N per token, non-embedding plus output
    layer), so the estimate itself stays within about `budget_s`.
    """
    import torch
    cfg = trainer.cfg
    rate = {}                         # (n_layer, d_model) -> seconds per step
    flop_rate = None
    spent = 0.0
    shapes = sorted({(e.n_layer, e.d_model, e.n_head) for e in plan}, key=lambda s: s[0] * s[1] ** 2)
    for n_layer, d_model, n_head in shapes:
        flops_step = 6 * (n_params_nonembedding(n_layer, d_model) + trainer.corpus.vocab_size * d_model) \
            * cfg.tokens_per_step
        if flop_rate and spent + 3 * flops_step / flop_rate > budget_s:
            rate[(n_layer, d_model)] = flops_step / flop_rate
            continue
        probe = Experiment("probe", "params", 0, n_layer, d_model, n_head, 10, 0, 1e-4, 0, 0)
        model = trainer.new_model(probe, 0)
        opt = configure_optimizer(model, 1e-4, 0.0, fused=trainer.device.name == "cuda")
        trainer.train_step(model, opt, probe, 0, 0)         # warm-up step: allocation, kernels
        _sync(trainer.device.name)
        t0 = time.time()
        n = 2
        for s in range(n):
            trainer.train_step(model, opt, probe, s + 1, 0)
        _sync(trainer.device.name)
        dt = (time.time() - t0) / n
        spent += dt * (n + 1)
        rate[(n_layer, d_model)] = dt
        flop_rate = flops_step / dt
        del model, opt
    eval_fraction = cfg.eval_batches / (3 * cfg.eval_interval)   # an eval batch costs ~1/3 of a step
    return {e.name: e.steps * rate[(e.n_layer, e.d_model)] * (1 + eval_fraction) for e in plan}


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------------------------------
# 6. fitting: power laws L(x) = c + a x^-b, predictions (pure functions, no torch)
# ----------------------------------------------------------------------------------------------------

# Models marked on the figure. Parameter counts and token counts are the published (or, for GPT-4,
# rumoured) totals; our predictions are for this corpus and tokenizer, not these models' own losses.
REFERENCE_MODELS = {
    "params": [("GPT-2", 1.5e9), ("GPT-3", 175e9), ("GPT-4 (~1.8T, rumoured MoE)", 1.8e12)],
    "data": [("LLaMA", 1.4e12), ("Llama 2", 2e12), ("Llama 3", 15e12)],
}
# Kaplan et al. 2020, nats on WebText2 with the GPT-2 tokenizer.
KAPLAN = {"params": (8.8e13, 0.076), "data": (5.4e13, 0.095)}


def power_law(x, a, b, c=0.0):
    """L(x) = c + a * x^-b."""
    return c + a * np.power(np.asarray(x, dtype=float), -b)


def kaplan_law(x, sweep: str):
    xc, alpha = KAPLAN[sweep]
    return np.power(xc / np.asarray(x, dtype=float), alpha)


def fit_power_law(x, y) -> dict:
    """Least-squares fit of L = c + a x^-b (a, b, c >= 0) from several starts; with 3 points or fewer
    the three-parameter law is exactly determined, so the two-parameter L = a x^-b is fitted instead.
    Returns a dict with `available` False and a `reason` when the points cannot be fitted."""
    from scipy.optimize import curve_fit
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[ok], y[ok]
    n = int(len(x))
    if n < 2 or len(np.unique(x)) < 2:
        return {"available": False, "reason": f"needs at least 2 distinct usable points, got {n}",
                "n_points": n}
    three = len(np.unique(x)) > 3
    xs = x / x.min()                  # fit in units of the smallest x: keeps a near O(1)
    best = None
    starts = [0.1, 0.3, 0.6, 1.0] if three else [0.05, 0.1, 0.3, 1.0]
    for b0 in starts:
        for cfrac in ([0.0, 0.5, 0.9] if three else [None]):
            try:
                if three:
                    c0 = cfrac * y.min()
                    p0 = [max(y.max() - c0, 1e-3), b0, c0]
                    p, _ = curve_fit(power_law, xs, y, p0=p0, bounds=([0, 0, 0], [np.inf, 10, np.inf]),
                                     maxfev=20000)
                else:
                    p, _ = curve_fit(lambda t, a, b: power_law(t, a, b), xs, y, p0=[y.max(), b0],
                                     bounds=([0, 0], [np.inf, 10]), maxfev=20000)
                    p = [p[0], p[1], 0.0]
            except (RuntimeError, ValueError):
                continue
            sse = float(np.sum((power_law(xs, *p) - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, p)
    if best is None:
        return {"available": False, "reason": "the optimiser did not converge from any start",
                "n_points": n}
    sse, (a_s, b, c) = best
    a = a_s * x.min() ** b            # back to units of x: a x^-b = a_s (x / xmin)^-b
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - sse / sst if sst > 0 else float("nan")
    return {"available": True, "law": "L = c + a * x^-b" if three else "L = a * x^-b",
            "form": "three_parameter" if three else "two_parameter",
            "note": None if three else f"{n} points exactly determine c + a x^-b; fitted a x^-b (c = 0)",
            "a": float(a), "b": float(b), "c": float(c), "r2": float(r2), "n_points": n}


def usable_runs(experiments: list[dict], sweep: str) -> list[dict]:
    return [e for e in experiments if e.get("sweep") == sweep and e.get("status") == "completed"
            and e.get("final_val_loss") is not None]


def fit_sweeps(experiments: list[dict]) -> dict:
    """Fits of both sweeps: x is non-embedding N for the parameter sweep, tokens D for the data sweep."""
    fits = {}
    for sweep, key in (("params", "n_params_nonembedding"), ("data", "tokens")):
        runs = usable_runs(experiments, sweep)
        fit = fit_power_law([r[key] for r in runs], [r["final_val_loss"] for r in runs])
        fit["x"] = "n_params_nonembedding" if sweep == "params" else "tokens"
        fits[sweep] = fit
    return fits


def predictions_from_fits(fits: dict) -> list[dict]:
    out = []
    for sweep, models in REFERENCE_MODELS.items():
        fit = fits.get(sweep, {})
        for name, x in models:
            pred = float(power_law(x, fit["a"], fit["b"], fit["c"])) if fit.get("available") else None
            out.append({"name": name, "sweep": sweep, "N" if sweep == "params" else "D": x,
                        "predicted_loss": pred, "kaplan_loss": float(kaplan_law(x, sweep))})
    return out


# ----------------------------------------------------------------------------------------------------
# 7. figure: the 2x2 summary (loss vs N, loss vs D, and both sweeps' training curves)
# ----------------------------------------------------------------------------------------------------

def plot_scaling_figure(results: dict, path: Path) -> None:
    """Draw the figure and write it atomically to `path`."""
    import matplotlib.pyplot as plt
    fig = build_scaling_figure(results)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def build_scaling_figure(results: dict):
    """The 2x2 figure of a results dict: (1) loss vs N, (2) loss vs D, (3)-(4) the sweeps' curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = results["experiments"]
    fits = results["fits"]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    panels = (("params", "n_params_nonembedding", "o", 1.8e12, "non-embedding parameters N"),
              ("data", "tokens", "s", 15e12, "training tokens D"))
    for ax, (sweep, key, marker, x_max, xlabel) in zip(axes[0], panels):
        runs = usable_runs(exps, sweep)
        xs = np.array([r[key] for r in runs], dtype=float)
        ys = np.array([r["final_val_loss"] for r in runs], dtype=float)
        ax.scatter(xs, ys, c="tab:blue", marker=marker, s=60, zorder=5, label="measured (final val loss)")
        fit = fits.get(sweep, {})
        lo = xs.min() / 2 if len(xs) else 1e4
        grid_all = np.logspace(np.log10(lo), np.log10(x_max), 300)
        ref = kaplan_law(grid_all, sweep)
        xc, alpha = KAPLAN[sweep]
        ax.plot(grid_all, ref, ":", color="green", lw=1.5,
                label=f"Kaplan et al. 2020: ({xc:.1e}/{'N' if sweep == 'params' else 'D'})^{alpha}"
                      f" (WebText2, GPT-2 tokenizer)")
        y_top = [ys.max() * 1.05] if len(ys) else [10]
        if fit.get("available"):
            a, b, c = fit["a"], fit["b"], fit["c"]
            inside = np.logspace(np.log10(xs.min()), np.log10(xs.max()), 100)
            beyond = np.logspace(np.log10(xs.max()), np.log10(x_max), 200)
            var = "N" if sweep == "params" else "D"
            ax.plot(inside, power_law(inside, a, b, c), "-", color="red", lw=2,
                    label=f"fit: L = {c:.3g} + {a:.3g}/{var}^{b:.3f}  (R² = {fit['r2']:.3f})")
            ax.plot(beyond, power_law(beyond, a, b, c), "--", color="red", lw=1.5, label="extrapolation")
            for p in results.get("predictions", []):
                if p["sweep"] != sweep or p["predicted_loss"] is None:
                    continue
                x = p["N" if sweep == "params" else "D"]
                ax.plot([x], [p["predicted_loss"]], "*", color="darkred", ms=13, zorder=6)
                ax.annotate(f"{p['name']}\n{format_count(x)}: {p['predicted_loss']:.2f}",
                            (x, p["predicted_loss"]), textcoords="offset points", xytext=(-10, 12),
                            fontsize=8, ha="right")
        else:
            ax.text(0.5, 0.5, f"fit unavailable:\n{fit.get('reason', 'no runs')}", transform=ax.transAxes,
                    ha="center", va="center", color="darkred", fontsize=11)
        ax.set_xscale("log")
        ax.set_xlim(lo, x_max * 3)
        bottom = min([*(ys if len(ys) else [2]), *ref[-1:]]) * 0.8
        if fit.get("available"):
            bottom = min(bottom, power_law(x_max, fit["a"], fit["b"], fit["c"]) * 0.9)
        ax.set_ylim(max(0, bottom), max(y_top + [float(ref[0]) * 0 + 0]) * 1.1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{'1' if sweep == 'params' else '2'}. loss vs {xlabel}", fontsize=12)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")

    cmap = plt.get_cmap("viridis")
    for ax, sweep, title in ((axes[1][0], "params", "3. training curves, parameter sweep"),
                             (axes[1][1], "data", "4. training curves, data sweep")):
        runs = sorted([e for e in exps if e.get("sweep") == sweep],
                      key=lambda e: (e["n_params_nonembedding"], e["tokens"]))
        for i, r in enumerate(runs):
            color = cmap(i / max(1, len(runs) - 1))
            cur = r["curve"]
            label = (f"N = {format_count(r['n_params_nonembedding'])}" if sweep == "params"
                     else f"D = {format_count(r['tokens'])}")
            if r.get("status") != "completed":
                label += f" ({r.get('status')})"
            ax.plot(cur["tokens"], cur["train_loss"], "-", color=color, alpha=0.3, lw=1)
            ax.plot(cur["eval_tokens"], cur["val_loss"], "o-", color=color, ms=3, lw=1.8, label=label)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token): validation (dots), training (faint)")
        ax.set_title(title, fontsize=12)
        ax.grid(True, alpha=0.3)
        if runs:
            ax.legend(fontsize=8)
    env = results.get("environment", {})
    corpus = env.get("corpus", {})
    fig.suptitle(f"Scaling laws, mode '{results.get('mode')}' on {env.get('device', '?')}: "
                 f"{corpus.get('name', '?')}", fontsize=14)
    fig.text(0.5, 0.01, f"Predicted losses are for this corpus ({corpus.get('name', '?')}) and tokenizer "
             f"({corpus.get('tokenizer', '?')}), not the named models' own losses; extrapolating many "
             f"orders of magnitude from these runs is uncertain.", ha="center", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    return fig


# ----------------------------------------------------------------------------------------------------
# 8. CLI: arguments, validation, the run, the summary
# ----------------------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def count_arg(text: str) -> int:
    try:
        return parse_count(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line with exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Train a ladder of GPT models, fit scaling laws, extrapolate, plot.")
    # what to run
    p.add_argument("--mode", default="quick",
                   help=f"preset: {', '.join(PRESETS)} (tiny is sized for a CPU; default quick)")
    p.add_argument("--param-sizes", help="replace the parameter sweep's N targets, e.g. 1M,3M,10M")
    p.add_argument("--data-sizes", help="replace the data sweep's D targets, e.g. 5M,20M")
    p.add_argument("--data-model-size", help="N target of the data sweep's model (default: the preset's)")
    # data
    p.add_argument("--data", default="builtin",
                   help="'builtin' (the Python standard library), a text file, a folder of text files, "
                        "a uint16 .bin (uint32 .u32.bin) token file, hf:NAME[:CONFIG][@REVISION] (a "
                        "Hugging Face Hub dataset, streamed), or a local dataset folder (save_to_disk "
                        "output, or .parquet or .jsonl files)")
    p.add_argument("--vocab-size", type=positive_int, help="BPE vocabulary (default: the preset's)")
    p.add_argument("--cache-dir", help="tokenizer and token cache (default ~/.cache/scaling-lab, or "
                                       "$SCALING_LAB_CACHE)")
    # optimisation
    p.add_argument("--max-steps", type=positive_int, help="steps of every parameter-sweep run")
    p.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--context-length", type=positive_int, help="tokens per sequence")
    p.add_argument("--lr", type=positive_float,
                   help="one peak learning rate for every size (default: min(1e-2, 0.4/d_model))")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    # evaluation and logging
    p.add_argument("--eval-interval", type=positive_int, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=positive_int, help="validation batches per evaluation")
    p.add_argument("--log-interval", type=positive_int, help="steps between log lines")
    # where
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks CUDA, then MPS, then CPU")
    p.add_argument("--output-dir", help="default scaling_results_<mode>_v2")
    p.add_argument("--no-estimate", action="store_true", help="skip the timed steps of the plan's estimate")
    # data preparation: Hugging Face datasets, large corpora, repetition
    g = p.add_argument_group("data preparation")
    g.add_argument("--text-column", default="text", help="column holding the text of a dataset (default text)")
    g.add_argument("--split", default="train",
                   help="split of a Hub dataset or a saved DatasetDict (default train); every 20th piece of "
                        "it is held out for validation")
    g.add_argument("--num-proc", type=positive_int, help="tokenizer threads (default: every core)")
    g.add_argument("--bpe-sample-chars", type=count_arg,
                   help="the BPE trains on at most this much training text, an even sample of a larger "
                        "corpus (default 200M characters)")
    g.add_argument("--no-repeat", action="store_true",
                   help="refuse a plan in which a run trains on more tokens than the corpus's training split")
    return p


def config_from_args(args) -> tuple[RunConfig, Preset]:
    if args.mode not in PRESETS:
        raise UserError(f"unknown mode '{args.mode}': choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.mode]
    cfg = RunConfig(
        mode=preset.name,
        param_sizes=parse_count_list(args.param_sizes) if args.param_sizes else list(preset.param_sizes),
        data_sizes=parse_count_list(args.data_sizes) if args.data_sizes else list(preset.data_sizes),
        data_model_size=parse_count(args.data_model_size) if args.data_model_size else preset.data_model_size,
        steps=args.max_steps or preset.steps,
        batch_size=args.batch_size or preset.batch_size,
        grad_accum=args.grad_accum,
        context_length=args.context_length or preset.context_length,
        vocab_size=args.vocab_size or preset.vocab_size,
        lr=args.lr, seed=args.seed,
        eval_interval=args.eval_interval or preset.eval_interval,
        eval_batches=args.eval_batches or preset.eval_batches,
        log_interval=args.log_interval or preset.log_interval,
        data=args.data, device=args.device,
        output_dir=args.output_dir or f"scaling_results_{preset.name}_v2",
        cache_dir=args.cache_dir or str(default_cache_dir()),
        text_column=args.text_column, split=args.split, num_proc=args.num_proc,
        bpe_sample_chars=args.bpe_sample_chars, no_repeat=args.no_repeat,
    )
    if cfg.data != "builtin" and not cfg.data.startswith("hf:") and not Path(cfg.data).expanduser().exists():
        raise UserError(f"--data {cfg.data}: no such file or folder; give a text file, a folder of text "
                        f"files, a .bin token file, or 'builtin'")
    return cfg, preset


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); choose another with "
                        f"--output-dir") from None


def print_plan(plan: list[Experiment], cfg: RunConfig, estimates: dict[str, float] | None) -> None:
    log(f"plan: {len(plan)} experiments, {format_count(cfg.tokens_per_step)} tokens per step "
        f"(batch {cfg.batch_size} x context {cfg.context_length} x accum {cfg.grad_accum})")
    log(f"  {'name':<16} {'N':>8} {'n_layer':>7} {'d_model':>7} {'D':>8} {'steps':>6} {'FLOPs':>9} "
        f"{'lr':>8} {'est.':>8}")
    for e in plan:
        est = format_duration(estimates[e.name]) if estimates else "-"
        log(f"  {e.name:<16} {format_count(e.n_params_nonembedding):>8} {e.n_layer:>7} {e.d_model:>7} "
            f"{format_count(e.tokens):>8} {e.steps:>6} {e.flops:>9.2e} {e.peak_lr:>8.2e} {est:>8}")
    if estimates:
        log(f"  estimated training time: {format_duration(sum(estimates.values()))} on this device")


def environment_record(device: DeviceInfo, corpus: Corpus) -> dict:
    import torch
    return {"device": device.name, "device_name": device.description, "dtype": device.dtype,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "platform": platform.platform(), "corpus": corpus.record}


def finish_results(results: dict, out_dir: Path) -> None:
    """Fit, predict, write results.json, then draw the figure: a plotting error never loses results."""
    results["fits"] = fit_sweeps(results["experiments"])
    results["predictions"] = predictions_from_fits(results["fits"])
    write_json_atomic(out_dir / "results.json", results)
    try:
        plot_scaling_figure(results, out_dir / "scaling_laws_complete.png")
    except Exception as e:       # the results are already on disk; say what failed and go on
        log(f"figure: could not draw scaling_laws_complete.png ({type(e).__name__}: {e})")


def print_summary(results: dict, out_dir: Path) -> None:
    log("")
    log("summary")
    for e in results["experiments"]:
        loss = f"{e['final_val_loss']:.4f}" if e["final_val_loss"] is not None else e["status"]
        log(f"  {e['name']:<16} N={format_count(e['n_params_nonembedding']):>7} "
            f"D={format_count(e['tokens']):>7}  val loss {loss}  ({format_duration(e['wall_time_s'])})")
    for sweep, fit in results["fits"].items():
        if fit.get("available"):
            log(f"  fit {sweep}: L = {fit['c']:.4g} + {fit['a']:.4g} * x^-{fit['b']:.4f}  "
                f"R2 {fit['r2']:.4f}, {fit['n_points']} points" + (f" ({fit['note']})" if fit["note"] else ""))
        else:
            log(f"  fit {sweep}: unavailable ({fit['reason']})")
    for p in results["predictions"]:
        if p["predicted_loss"] is not None:
            x = p.get("N", p.get("D"))
            log(f"  predicted loss at {p['name']} ({format_count(x)}): {p['predicted_loss']:.3f} "
                f"(this corpus and tokenizer; an extrapolation, not that model's loss)")
    log(f"  results: {out_dir / 'results.json'}")
    log(f"  figure:  {out_dir / 'scaling_laws_complete.png'}")


def run(cfg: RunConfig, preset: Preset, estimate: bool = True) -> dict:
    out_dir = Path(cfg.output_dir)
    prepare_output_dir(out_dir)
    device = setup_device(cfg.device)
    import torch
    log(f"device: {device.name} ({device.description}), dtype {device.dtype}, torch {torch.__version__}, "
        f"python {platform.python_version()}")
    corpus = load_corpus(cfg.data, cfg.vocab_size, Path(cfg.cache_dir), text_column=cfg.text_column,
                         split=cfg.split, num_proc=cfg.num_proc,
                         bpe_sample_chars=cfg.bpe_sample_chars or BPE_SAMPLE_CHARS)
    cfg.vocab_size = corpus.vocab_size
    plan = build_plan(cfg, preset)
    data_budget = check_data_budget(plan, len(corpus.train), cfg.no_repeat)    # refuses under --no-repeat
    trainer = Trainer(cfg, corpus, device, progress_bar=sys.stderr.isatty())
    estimates = estimate_wall_time(trainer, plan) if estimate else None
    print_plan(plan, cfg, estimates)
    for line in data_budget_lines(data_budget):
        log(line)
    if device.name == "cpu" and cfg.mode != "tiny" and estimates:
        log(f"note: mode '{cfg.mode}' would take about {sum(estimates.values()) / 3600:.1f} hours on this CPU; "
            f"--mode tiny is sized for a CPU. Continuing as asked.")

    results = {"schema_version": SCHEMA_VERSION, "mode": cfg.mode, "config": dataclasses.asdict(cfg),
               "environment": environment_record(device, corpus), "data_budget": data_budget,
               "experiments": [], "fits": {}, "predictions": []}
    t0 = time.time()
    for i, exp in enumerate(plan):
        log(f"experiment {i + 1}/{len(plan)}: {exp.name}")
        results["experiments"].append(trainer.run(exp, i))
        results["wall_time_s"] = round(time.time() - t0, 2)
        write_json_atomic(out_dir / "results.json", results)
    finish_results(results, out_dir)
    print_summary(results, out_dir)
    log(f"done in {format_duration(time.time() - t0)}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, preset = config_from_args(args)
        run(cfg, preset, estimate=not args.no_estimate)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished experiment", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

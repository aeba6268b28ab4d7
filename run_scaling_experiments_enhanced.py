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
    3. data                          built-in corpus, text/bin loaders, BPE tokenizer, token cache, batches
    4. model                         GPT-2 style decoder and its closed-form parameter counts
    5. training                      device setup, LR schedule, one experiment, the plan's time estimate
    6. fitting                       power-law fits and predictions (pure functions)
    7. figure                        the 2x2 matplotlib figure
    8. CLI                           argparse, main()

`quick_scaling_demo.py` and `compare_quick_vs_real.py` import from this file; nothing is copied.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
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
    seed: int = 0                  # with --seeds, one Experiment per (definition, seed)

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params_nonembedding * self.tokens

    @property
    def run_id(self) -> str:
        """Unique per run: names a run's record under runs/ and its checkpoint."""
        return f"{self.name}-seed{self.seed}"


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
    # long runs (issue 5): repeated seeds and checkpoints
    seeds: list[int] = field(default_factory=lambda: [0])   # every experiment runs once per seed
    checkpoint_every: str = "5m"   # a duration (90s, 5m, 1h) or a step count (500steps)
    keep_checkpoints: bool = False

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
# 3. data: the built-in corpus, text and token files, the BPE tokenizer, the token cache, batches
# ----------------------------------------------------------------------------------------------------

VAL_EVERY = 20                     # every 20th piece of text (5%) is validation, never trained on
PIECE_CHARS = 100_000              # documents are cut into pieces of about this size before the split


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


def read_documents(files: list[Path], root: Path | None) -> list[str]:
    docs = []
    for p in files:
        raw = p.read_bytes()
        if b"\x00" in raw[:4096]:
            continue                  # binary file inside a text folder: skip it
        docs.append(raw.decode("utf-8", errors="replace"))
    if not any(docs):
        raise UserError(f"--data {root}: no UTF-8 text found")
    return docs


def piece_size(n_chars: int) -> int:
    """Characters per piece: PIECE_CHARS, smaller for a small corpus so it still yields ~400 pieces."""
    return int(min(PIECE_CHARS, max(1000, n_chars // 400)))


def split_pieces(docs: list[str]) -> tuple[list[str], list[str]]:
    """Cut documents into pieces at line ends and give every VAL_EVERY-th piece to validation.
    Deterministic, and train and validation never share a character."""
    size = piece_size(sum(len(d) for d in docs))
    train, val = [], []
    i = 0
    for doc in docs:
        start = 0
        while start < len(doc):
            end = min(len(doc), start + size)
            if end < len(doc):
                nl = doc.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            (val if i % VAL_EVERY == VAL_EVERY // 2 else train).append(doc[start:end])
            start = end
            i += 1
    if not val:                       # a very small corpus: still hold out one piece
        val.append(train.pop())
    if not train:
        raise UserError("the corpus is too small to split into training and validation text")
    return train, val


@dataclass
class Corpus:
    """Token arrays (memory-mapped) and their record for results.json."""
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    record: dict


def default_cache_dir() -> Path:
    env = os.environ.get("SCALING_LAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaling-lab"


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32


def load_corpus(data: str, vocab_size: int, cache_dir: Path) -> Corpus:
    """Text corpora are tokenized once with a byte-level BPE and cached under a key made from the
    corpus's sha256 and the vocabulary size; a second run only memory-maps the cache."""
    if data.endswith(".bin") and Path(data).is_file():
        return load_token_file(Path(data), vocab_size)
    if data == "builtin":
        name, files = builtin_corpus_files()
        root = None
    else:
        root = Path(data).expanduser()
        if not root.exists():
            raise UserError(f"--data {data}: no such file or folder; give a text file, a folder of text "
                            f"files, a .bin token file, or 'builtin'")
        name, files = str(root.resolve()), text_corpus_files(root)

    t0 = time.time()
    docs = read_documents(files, root)
    sha = hashlib.sha256()
    for d in docs:
        sha.update(d.encode("utf-8"))
        sha.update(b"\x00")
    corpus_sha = sha.hexdigest()
    n_chars = sum(len(d) for d in docs)
    split_rule = f"every{VAL_EVERY}-of-{piece_size(n_chars)}chars"
    key = hashlib.sha256(f"{corpus_sha}|bpe-bytelevel-v1|{vocab_size}|{split_rule}".encode()).hexdigest()[:16]
    entry = Path(cache_dir) / key
    if not (entry / "meta.json").exists():
        log(f"data: tokenizing {name} ({len(docs)} files, {n_chars / 1e6:.1f}M characters) "
            f"with a {vocab_size}-token BPE; cached for later runs in {entry}")
        build_token_cache(docs, vocab_size, entry)
    else:
        log(f"data: using cached tokens for {name} from {entry}")
    meta = json.loads((entry / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(entry / "val.bin", dtype=dtype, mode="r")
    record = {"name": name, "sha256": corpus_sha, "n_files": len(docs), "n_characters": n_chars,
              "tokenizer": f"byte-level BPE (Hugging Face tokenizers), vocabulary {vocab_size}",
              "tokenizer_path": str(entry / "tokenizer.json"), "vocab_size": vocab_size,
              "n_train_tokens": int(len(train)), "n_val_tokens": int(len(val)),
              "validation_split": f"every {VAL_EVERY}th piece of <= {piece_size(n_chars)} characters",
              "prepare_time_s": round(time.time() - t0, 2)}
    log(f"data: {format_count(len(train))} training and {format_count(len(val))} validation tokens "
        f"({time.time() - t0:.1f}s)")
    return Corpus(train, val, vocab_size, record)


def train_bpe(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def build_token_cache(docs: list[str], vocab_size: int, entry: Path) -> None:
    """Train the tokenizer on the training pieces only, encode both splits in chunks straight to disk
    (an end-of-text token after every piece), then move the folder into place in one rename."""
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: use at least 257")
    train_docs, val_docs = split_pieces(docs)
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(train_docs, vocab_size)
    eot = tok.token_to_id(EOT_TOKEN)
    dtype = token_dtype(tok.get_vocab_size())
    for split, pieces in (("train", train_docs), ("val", val_docs)):
        with open(tmp / f"{split}.bin", "wb") as f:
            for i in range(0, len(pieces), 256):
                encs = tok.encode_batch(pieces[i:i + 256])
                ids = [t for e in encs for t in (*e.ids, eot)]
                np.asarray(ids, dtype=dtype).tofile(f)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "vocab_size": vocab_size}))
    if entry.exists():                # another process finished first; keep theirs
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, entry)


def load_token_file(path: Path, vocab_size: int) -> Corpus:
    """A pre-tokenized uint16 file: the last 5% is validation, the rest training (views, no copy)."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) < 1000:
        raise UserError(f"--data {path}: only {len(tokens)} tokens; a .bin file needs at least 1000 uint16 "
                        f"tokens")
    max_id = int(max(tokens[i:i + 2**24].max() for i in range(0, len(tokens), 2**24)))
    if max_id >= vocab_size:
        raise UserError(f"--data {path}: holds token id {max_id} but the vocabulary is {vocab_size}; "
                        f"pass --vocab-size {max_id + 1} or more")
    cut = len(tokens) - max(len(tokens) // VAL_EVERY, 1)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    record = {"name": str(path.resolve()), "sha256": sha.hexdigest(), "tokenizer": "pre-tokenized (.bin)",
              "vocab_size": vocab_size, "n_train_tokens": int(cut), "n_val_tokens": int(len(tokens) - cut),
              "validation_split": "last 5% of the file"}
    return Corpus(tokens[:cut], tokens[cut:], vocab_size, record)


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


# --- what makes runs resumable: a run's identity, checkpoints, stop requests, out-of-memory retries ---

DEFINITION_VERSION = 1
# settings of a definition that come from the corpus; known only once the corpus is loaded
CORPUS_DEFINITION_KEYS = ("corpus_sha256", "tokenizer", "validation_split")


def experiment_definition(exp: Experiment, cfg: RunConfig, corpus_record: dict | None) -> dict:
    """Everything that determines a run's results; its hash decides whether earlier work is reused.

    The device is left out on purpose: a run may continue on another machine (exactly on a CPU, within
    bf16 noise on a GPU), and every record says which device trained it. Without `corpus_record` the
    corpus keys are left out, so settings can be compared before the corpus is prepared.
    """
    d = {"definition_version": DEFINITION_VERSION, "name": exp.name, "sweep": exp.sweep,
         "target": exp.target, "n_layer": exp.n_layer, "d_model": exp.d_model, "n_head": exp.n_head,
         "steps": exp.steps, "tokens": exp.tokens, "peak_lr": exp.peak_lr, "seed": exp.seed,
         "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "context_length": cfg.context_length,
         "vocab_size": cfg.vocab_size, "warmup_frac": cfg.warmup_frac, "min_lr_frac": cfg.min_lr_frac,
         "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip, "eval_interval": cfg.eval_interval,
         "eval_batches": cfg.eval_batches, "log_interval": cfg.log_interval}
    if corpus_record is not None:
        d.update(corpus_sha256=corpus_record.get("sha256"), tokenizer=corpus_record.get("tokenizer"),
                 validation_split=corpus_record.get("validation_split"))
    return d


def definition_hash(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def definition_differences(old: dict, new: dict, keys=None) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key of `keys` (default: all) whose values differ."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def init_seed(exp: Experiment) -> int:
    """Initialisation seed of a run: depends on its name and seed only, not on its place in the plan,
    so adding a size to a ladder leaves the other runs (and their hashes) untouched."""
    return int(hashlib.sha256(f"init|{exp.name}|{exp.seed}".encode()).hexdigest()[:8], 16)


def data_stream(exp: Experiment) -> int:
    return int(hashlib.sha256(exp.name.encode()).hexdigest()[:8], 16)


@dataclass
class CheckpointPolicy:
    """Where and how often a run saves its state. folder None: never (the plan's timing probes)."""
    folder: Path | None = None
    every_s: float | None = 300.0
    every_steps: int | None = None
    keep: bool = False              # keep the final checkpoint of a finished run

    def path(self, run_id: str) -> Path:
        return Path(self.folder) / f"{run_id}.pt"

    def due(self, steps_since: int, seconds_since: float) -> bool:
        if self.folder is None:
            return False
        if self.every_steps is not None:
            return steps_since >= self.every_steps
        return self.every_s is not None and seconds_since >= self.every_s


class StopRequest:
    """Set by the CLI's SIGINT/SIGTERM handler; the step loop checkpoints and stops at the next step."""

    def __init__(self):
        self.signum: int | None = None


class TrainingInterrupted(Exception):
    """A stop was requested: the run's checkpoint is on disk and `record` holds its curve so far."""

    def __init__(self, signum: int, record: dict):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.record = signum, record


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS a RuntimeError saying 'MPS backend out of memory'."""
    import torch
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def _injected_nan_step(exp: Experiment) -> int | None:
    """Test-only hook: SCALING_LAB_TEST_NAN_AT='<name or run_id>:<step>' poisons that run's weights
    just before that (1-based) step, so its loss is NaN there, as in a real divergence."""
    spec = os.environ.get("SCALING_LAB_TEST_NAN_AT", "")
    name, _, step = spec.rpartition(":")
    if name and name in (exp.name, exp.run_id) and step.isdigit():
        return int(step)
    return None


def _rng_state(device: str) -> dict:
    """Every RNG the process has, in types torch.load(weights_only=True) accepts. Training itself draws
    no random numbers after initialisation (batches are pure functions of the step), but a future
    dropout or sampler would, and a checkpoint must not silently depend on that."""
    import random
    import torch
    legacy = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]]}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: str) -> None:
    import random
    import torch
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    if device == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint_header(path: Path) -> dict | None:
    """The definition and step of a checkpoint, without reading its tensors (memory-mapped)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:       # a checkpoint that cannot be read is reported, never overwritten
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); move it away to start that "
                        f"run over, or pass --fresh") from None
    return {k: state.get(k) for k in ("format", "run_id", "experiment_hash", "definition", "step")}


class Trainer:
    """Trains one experiment; holds the device, the corpus and the run's settings."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, device: DeviceInfo, progress_bar: bool = False,
                 checkpoints: CheckpointPolicy | None = None, stop: StopRequest | None = None):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        self.progress_bar = progress_bar
        self.checkpoints = checkpoints or CheckpointPolicy()
        self.stop = stop or StopRequest()
        # after an out-of-memory error every micro-batch is cut into this many pieces (same sequences,
        # same weights, so the same effective batch); reset per run by run_with_oom_retries
        self.micro_split = 1
        self.oom_events: list[dict] = []
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
                for piece in np.array_split(offs, self.micro_split):
                    x, y = get_batch(self.corpus.val, piece, cfg.context_length)
                    loss = model(x.to(self.device.name), y.to(self.device.name)).float()
                    losses.append(loss * (len(piece) / len(offs)))
        model.train()
        return float(torch.stack(losses).sum() / cfg.eval_batches)

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
                                 exp.seed, stream, step, micro)
            for piece in np.array_split(offs, self.micro_split):
                x, y = get_batch(self.corpus.train, piece, cfg.context_length)
                x, y = x.to(self.device.name, non_blocking=True), y.to(self.device.name, non_blocking=True)
                with self.autocast():
                    # a piece's mean loss weighted by its share of the micro-batch
                    loss = model(x, y) * (len(piece) / len(offs)) / cfg.grad_accum
                loss.backward()
                total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, lr

    def save_checkpoint(self, exp: Experiment, definition: dict, model, opt, progress: dict) -> None:
        """Model, optimizer, RNGs, schedule position and the curve so far, written to a temporary file
        and renamed, so a kill at any moment leaves the previous checkpoint whole."""
        import torch
        path = self.checkpoints.path(exp.run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": "scaling-lab-checkpoint-v1", "run_id": exp.run_id,
                 "experiment_hash": definition_hash(definition), "definition": definition,
                 "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "rng": _rng_state(self.device.name), "micro_split": self.micro_split,
                 "oom_events": self.oom_events, **progress}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, exp: Experiment, exp_hash: str) -> dict | None:
        if self.checkpoints.folder is None or not self.checkpoints.path(exp.run_id).exists():
            return None
        import torch
        path = self.checkpoints.path(exp.run_id)
        state = torch.load(path, map_location=self.device.name, weights_only=True)
        if state.get("experiment_hash") != exp_hash:          # the CLI refuses this case before training
            raise UserError(f"checkpoint {path} belongs to other settings; pass --fresh to move it aside")
        return state

    def remove_checkpoint(self, exp: Experiment) -> None:
        if self.checkpoints.folder is not None and not self.checkpoints.keep:
            self.checkpoints.path(exp.run_id).unlink(missing_ok=True)

    def run(self, exp: Experiment) -> dict:
        """Train one experiment, continuing from its checkpoint if it has one, and return its
        results.json record (status completed or diverged). On a stop request it checkpoints and raises
        TrainingInterrupted."""
        import torch
        cfg = self.cfg
        definition = experiment_definition(exp, cfg, self.corpus.record)
        exp_hash = definition_hash(definition)
        stream = data_stream(exp)                                  # this run's data stream
        model = self.new_model(exp, init_seed(exp))
        n_nonemb, n_total = model.count_params()
        assert n_nonemb == exp.n_params_nonembedding, (n_nonemb, exp.n_params_nonembedding)
        opt = configure_optimizer(model, exp.peak_lr, cfg.weight_decay, fused=self.device.name == "cuda")
        epochs = exp.tokens / len(self.corpus.train)
        state = self.load_checkpoint(exp, exp_hash)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"], self.device.name)
            start, curve, initial = state["step"], state["curve"], state["initial_loss"]
            wall_before, resumed_at = state["wall_time_s"], [*state["resumed_at_steps"], state["step"]]
            last_good = state["last_good_loss"]
            # the losses of the steps since the last log line, so the next line's mean is the same
            window = [torch.tensor(v, device=self.device.name) for v in state["window"]]
            self.micro_split = max(self.micro_split, state["micro_split"])
            self.oom_events = [*state["oom_events"],
                               *(e for e in self.oom_events if e not in state["oom_events"])]
            del state
            log(f"[{exp.run_id}] resuming from its checkpoint at step {start}/{exp.steps}")
        else:
            start, wall_before, resumed_at, last_good, window = 0, 0.0, [], None, []
            curve = {"step": [], "tokens": [], "train_loss": [], "val_loss": [], "lr": [],
                     "eval_step": [], "eval_tokens": []}
            initial = self.evaluate(model)
            curve["eval_step"].append(0)
            curve["eval_tokens"].append(0)
            curve["val_loss"].append(initial)
            log(f"[{exp.run_id}] start: N={format_count(n_nonemb)} non-embedding ({format_count(n_total)} "
                f"total), n_layer={exp.n_layer} d_model={exp.d_model} n_head={exp.n_head}, {exp.steps} steps, "
                f"{format_count(exp.tokens)} tokens ({epochs:.2f} epochs), peak lr {exp.peak_lr:.2e}, "
                f"initial val loss {initial:.3f}")
        nan_at = _injected_nan_step(exp)
        bar = None
        if self.progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=exp.steps, initial=start, desc=exp.run_id, leave=False, file=sys.stderr)
        t_start = time.time()
        t_last, step_last = t_start, start - len(window)     # step_last: steps done at the last log line
        t_ckpt, step_ckpt = t_start, start
        diverged = None               # (1-based step, last finite loss) once a loss is NaN or infinite
        lr = None

        def progress(steps_done: int) -> dict:
            return {"step": steps_done, "lr": lr, "curve": curve, "initial_loss": initial,
                    "window": [float(w) for w in window], "last_good_loss": last_good,
                    "wall_time_s": wall_before + time.time() - t_start, "resumed_at_steps": resumed_at}

        def first_nonfinite() -> int | None:
            """Index in the window of the first non-finite step loss (one host sync)."""
            if not window:
                return None
            ok = torch.isfinite(torch.stack(window)).cpu()
            return None if bool(ok.all()) else int((~ok).nonzero()[0, 0])

        step = start
        for step in range(start, exp.steps):
            if self.stop.signum is not None:
                self.save_checkpoint(exp, definition, model, opt, progress(step))
                raise TrainingInterrupted(self.stop.signum, self._record(
                    exp, definition, n_nonemb, n_total, epochs, initial, curve, "interrupted",
                    wall_before + time.time() - t_start, step, resumed_at, None))
            if nan_at is not None and step + 1 == nan_at:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            loss, lr = self.train_step(model, opt, exp, step, stream)
            window.append(loss)
            last = step == exp.steps - 1
            log_now = (step + 1) % cfg.log_interval == 0 or last
            ckpt_now = not last and self.checkpoints.due(step + 1 - step_ckpt, time.time() - t_ckpt)
            if log_now or ckpt_now:
                bad = first_nonfinite()
                if bad is not None:
                    if bad > 0:
                        last_good = float(window[bad - 1])
                    diverged = (step_last + bad + 1, last_good)
                    break
                last_good = float(window[-1])
            if log_now:
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
                (bar.write if bar else log)(
                    f"[{exp.run_id}] step {step + 1}/{exp.steps} | loss {train_loss:.3f} | lr {lr:.2e} | "
                    f"{tok_s / 1e3:.1f}k tok/s | eta {format_duration(eta)}")
            if (step + 1) % cfg.eval_interval == 0 or last:
                v = self.evaluate(model)
                if not math.isfinite(v):
                    diverged = (step + 1, last_good)
                    break
                curve["eval_step"].append(step + 1)
                curve["eval_tokens"].append((step + 1) * cfg.tokens_per_step)
                curve["val_loss"].append(v)
                (bar.write if bar else log)(f"[{exp.run_id}] eval step {step + 1}: val loss {v:.4f}")
            if ckpt_now:
                self.save_checkpoint(exp, definition, model, opt, progress(step + 1))
                t_ckpt, step_ckpt = time.time(), step + 1
                (bar.write if bar else log)(f"[{exp.run_id}] checkpoint at step {step + 1}/{exp.steps}")
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        wall = wall_before + time.time() - t_start
        if diverged:
            log(f"[{exp.run_id}] diverged: non-finite loss at step {diverged[0]}/{exp.steps} (last finite "
                f"loss {diverged[1] if diverged[1] is None else round(diverged[1], 4)}); this run is left "
                f"out of the fits, the others continue")
            record = self._record(exp, definition, n_nonemb, n_total, epochs, initial, curve, "diverged",
                                  wall, diverged[0], resumed_at, diverged)
        else:
            record = self._record(exp, definition, n_nonemb, n_total, epochs, initial, curve, "completed",
                                  wall, exp.steps, resumed_at, None)
            log(f"[{exp.run_id}] done: final val loss {record['final_val_loss']:.4f} (initial {initial:.3f}) "
                f"in {format_duration(wall)}, {record['tokens_per_s'] / 1e3:.1f}k tok/s")
        if self.checkpoints.keep and self.checkpoints.folder is not None and not diverged:
            # the final state (a diverged run keeps its last periodic checkpoint, from before the NaN)
            self.save_checkpoint(exp, definition, model, opt, progress(exp.steps))
        return record

    def _record(self, exp, definition, n_nonemb, n_total, epochs, initial, curve, status, wall_s,
                steps_done, resumed_at, diverged) -> dict:
        cfg = self.cfg
        completed = status == "completed"
        return {
            "name": exp.name, "run_id": exp.run_id, "seed": exp.seed, "sweep": exp.sweep, "target": exp.target,
            "n_params_nonembedding": n_nonemb, "n_params_total": n_total,
            "n_layer": exp.n_layer, "d_model": exp.d_model, "n_head": exp.n_head,
            "tokens": exp.tokens, "steps": exp.steps, "tokens_per_step": cfg.tokens_per_step,
            "epochs": round(epochs, 4), "peak_lr": exp.peak_lr, "flops": exp.flops,
            "initial_loss": initial, "final_val_loss": curve["val_loss"][-1] if completed else None,
            "status": status, "steps_done": steps_done,
            "diverged_at_step": diverged[0] if diverged else None,
            "last_good_loss": diverged[1] if diverged else None,
            "wall_time_s": round(wall_s, 2),
            "tokens_per_s": round(steps_done * cfg.tokens_per_step / max(wall_s, 1e-9), 1),
            "device": self.device.name,
            "micro_batch_size": math.ceil(cfg.batch_size / self.micro_split),
            "micro_steps_per_step": cfg.grad_accum * self.micro_split,
            "oom_retries": list(self.oom_events), "resumed_at_steps": list(resumed_at),
            "experiment_hash": definition_hash(definition), "definition": definition,
            "curve": curve,
        }


def run_with_oom_retries(trainer: Trainer, exp: Experiment) -> dict:
    """Train `exp`; on a CUDA or MPS out-of-memory error retry it with half the micro-batch and twice
    the micro-steps (the same sequences per optimizer step), from its latest checkpoint if it has one.
    Gives up with status "out_of_memory" once a micro-batch would be less than one sequence."""
    import gc
    import torch
    trainer.micro_split, trainer.oom_events = 1, []
    while True:
        try:
            return trainer.run(exp)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        # outside the except block, so the traceback's frames (and their tensors) can be freed
        gc.collect()
        if trainer.device.name == "cuda":
            torch.cuda.empty_cache()
        elif trainer.device.name == "mps":
            torch.mps.empty_cache()
        cfg = trainer.cfg
        before = math.ceil(cfg.batch_size / trainer.micro_split)
        if trainer.micro_split * 2 > cfg.batch_size:
            log(f"[{exp.run_id}] out of memory even with micro-batches of {before} sequence(s): giving up on "
                f"this run ({message}); the others continue")
            trainer.oom_events.append({"micro_batch_size": before, "error": message, "gave_up": True})
            record = trainer._record(exp, experiment_definition(exp, cfg, trainer.corpus.record),
                                     exp.n_params_nonembedding, exp.n_params_total,
                                     exp.tokens / len(trainer.corpus.train), None,
                                     {"step": [], "tokens": [], "train_loss": [], "val_loss": [], "lr": [],
                                      "eval_step": [], "eval_tokens": []}, "out_of_memory", 0.0, 0, [], None)
            return record
        trainer.micro_split *= 2
        after = math.ceil(cfg.batch_size / trainer.micro_split)
        trainer.oom_events.append({"micro_batch_size": before, "retry_micro_batch_size": after,
                                   "micro_steps_per_step": cfg.grad_accum * trainer.micro_split,
                                   "error": message})
        log(f"[{exp.run_id}] out of memory with micro-batches of {before} sequences ({message}); retrying with "
            f"{after} and {cfg.grad_accum * trainer.micro_split} micro-steps per step (same effective batch)")


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


def seed_groups(xs, ys) -> list[tuple[float, float, float, float, int]]:
    """(x, mean, lowest, highest, number of runs) per distinct x: the spread over repeated seeds."""
    out = []
    for x in sorted(set(np.asarray(xs, dtype=float).tolist())):
        vals = np.asarray(ys, dtype=float)[np.asarray(xs, dtype=float) == x]
        out.append((x, float(vals.mean()), float(vals.min()), float(vals.max()), int(len(vals))))
    return out


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
        groups = seed_groups(xs, ys)
        if any(n > 1 for *_, n in groups):      # repeated seeds: each run faint, mean with its range
            ax.scatter(xs, ys, c="tab:blue", marker=marker, s=18, alpha=0.35, zorder=4, label="each seed")
            gx, gmean, glo, ghi = (np.array([g[i] for g in groups]) for i in range(4))
            ax.errorbar(gx, gmean, yerr=[gmean - glo, ghi - gmean], fmt=marker, color="tab:blue", ms=8,
                        capsize=4, zorder=5, label=f"mean of {max(n for *_, n in groups)} seeds "
                                                   f"(bars: lowest to highest)")
        else:
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
        sizes = sorted({(e["n_params_nonembedding"], e["tokens"]) for e in runs})
        labelled = set()
        for r in runs:
            size = (r["n_params_nonembedding"], r["tokens"])
            color = cmap(sizes.index(size) / max(1, len(sizes) - 1))   # repeated seeds share a colour
            cur = r["curve"]
            label = (f"N = {format_count(r['n_params_nonembedding'])}" if sweep == "params"
                     else f"D = {format_count(r['tokens'])}")
            if r.get("status") != "completed":
                label += f" ({r.get('status')}, seed {r.get('seed')})"
            elif size in labelled:
                label = None
            labelled.add(size)
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
                        "or a uint16 .bin token file")
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
    # long runs: rerunning the same command resumes; these tune checkpoints and repeat seeds
    g = p.add_argument_group("long runs (rerun the same command to resume)")
    g.add_argument("--seeds", help="repeat every experiment per seed: a count (3 = seeds --seed .. --seed+2) "
                                   "or a list (0,1,2; '5,' is seed 5 alone)")
    g.add_argument("--checkpoint-every", default="5m",
                   help="checkpoint interval: a duration (90s, 5m, 1h; a bare number is seconds) or a step "
                        "count (200steps); default 5m")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's final checkpoint (default: removed once its record is saved)")
    g.add_argument("--fresh", action="store_true",
                   help="move the earlier results in the output folder aside to previous-<date>-<time>/ "
                        "(never deleted) and start over")
    return p


def parse_seeds(text: str | None, base_seed: int) -> list[int]:
    """None -> [base]; '3' -> base, base+1, base+2; '0,1,2' -> [0, 1, 2]; '5,' -> [5]."""
    if text is None:
        return [base_seed]
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise UserError(f"--seeds {text}: give a count (e.g. 3) or a comma-separated list (e.g. 0,1,2)") from None
    if "," not in text:
        if not values or values[0] < 1:
            raise UserError(f"--seeds {text}: a count of seeds must be at least 1")
        return list(range(base_seed, base_seed + values[0]))
    if not values or min(values) < 0:
        raise UserError(f"--seeds {text}: seeds must be whole numbers >= 0, e.g. 0,1,2")
    return list(dict.fromkeys(values))


def parse_checkpoint_every(text: str) -> tuple[float | None, int | None]:
    """'90s' / '5m' / '1h' / '300' -> (seconds, None); '200steps' -> (None, 200)."""
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|steps?)?\s*", text.lower())
    value = float(m.group(1)) if m else 0.0
    if not m or value <= 0:
        raise UserError(f"--checkpoint-every {text}: give a duration such as 90s, 5m or 1h, or a step count "
                        f"such as 200steps")
    unit = m.group(2) or "s"
    if unit.startswith("step"):
        if value != int(value):
            raise UserError(f"--checkpoint-every {text}: a step count must be a whole number")
        return None, int(value)
    return value * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit], None


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
    )
    cfg.seeds = parse_seeds(args.seeds, args.seed)
    cfg.checkpoint_every = args.checkpoint_every
    parse_checkpoint_every(cfg.checkpoint_every)         # a bad value is reported before any work
    cfg.keep_checkpoints = args.keep_checkpoints
    if cfg.data != "builtin" and not Path(cfg.data).expanduser().exists():
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


# --- the output folder across runs: validated results.json, one record per run, settings checks ---

# statuses that end a run for good; "out_of_memory" and "interrupted" are tried again on the next run
FINAL_STATUSES = ("completed", "diverged")
# run-level settings whose change makes earlier results incomparable (sizes and seeds may be extended)
DEFINING_CONFIG_KEYS = ("mode", "steps", "batch_size", "grad_accum", "context_length", "vocab_size", "lr",
                        "warmup_frac", "min_lr_frac", "weight_decay", "grad_clip", "eval_interval",
                        "eval_batches", "log_interval", "seed")
OPTION_OF = {"mode": "--mode", "steps": "--max-steps", "batch_size": "--batch-size",
             "grad_accum": "--grad-accum", "context_length": "--context-length", "vocab_size": "--vocab-size",
             "lr": "--lr", "peak_lr": "--lr", "seed": "--seed/--seeds", "eval_interval": "--eval-interval",
             "eval_batches": "--eval-batches", "log_interval": "--log-interval", "corpus_sha256": "--data",
             "tokenizer": "--data", "validation_split": "--data", "tokens": "--data-sizes/--max-steps",
             "n_layer": "--data-model-size", "d_model": "--data-model-size"}


class RunInterrupted(Exception):
    """SIGINT/SIGTERM during training: everything is saved; main() prints how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def read_results(out_dir: Path) -> dict | None:
    """The output folder's results.json if it is ours and resumable; None if there is none. Anything
    else is a UserError: a file this script cannot vouch for is never overwritten."""
    path = out_dir / "results.json"
    if not path.exists():
        return None
    advice = "it is left untouched: move it away, choose another --output-dir, or pass --fresh to move it aside"
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable results file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); {advice}") from None
    if not (isinstance(obj, dict) and "schema_version" in obj and isinstance(obj.get("experiments"), list)
            and isinstance(obj.get("config"), dict)):
        raise UserError(f"{path} was not written by this script (no schema_version, config and experiments); "
                        f"{advice}")
    if obj["schema_version"] != SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {obj['schema_version']}, this script writes "
                        f"{SCHEMA_VERSION}; {advice}")
    if not all(isinstance(e, dict) and "run_id" in e and "experiment_hash" in e for e in obj["experiments"]):
        raise UserError(f"{path} holds experiments without resume records (written before resume support); "
                        f"{advice}")
    return obj


class RunStore:
    """One JSON record per finished run under runs/: each written on its own (atomically), so runs can
    be trained and recorded independently; results.json is assembled from them."""

    def __init__(self, out_dir: Path):
        self.folder = Path(out_dir) / "runs"

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.json"

    def load(self, run_id: str) -> dict | None:
        path = self.path(run_id)
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable run record ({type(e).__name__}); move it away to train "
                            f"that run again, or pass --fresh") from None
        if not (isinstance(rec, dict) and "experiment_hash" in rec and "definition" in rec):
            raise UserError(f"{path} is not a run record of this script; move it away or pass --fresh")
        return rec

    def save(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(record["run_id"]), record)

    def recover(self, experiments: list[dict]) -> None:
        """Records that results.json holds but runs/ lost (deleted by hand) are written back."""
        for e in experiments:
            if e.get("status") in FINAL_STATUSES and "definition" in e and not self.path(e["run_id"]).exists():
                self.save(e)


def archive_previous(out_dir: Path) -> Path | None:
    """--fresh: move this script's earlier outputs into previous-<date>-<time>/ (never delete them)."""
    names = ["results.json", "scaling_laws_complete.png", "runs", "checkpoints"]
    present = [n for n in names if (out_dir / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive = out_dir / f"previous-{stamp}"
    k = 1
    while archive.exists():
        k += 1
        archive = out_dir / f"previous-{stamp}-{k}"
    archive.mkdir()
    for n in present:
        os.replace(out_dir / n, archive / n)
    log(f"--fresh: moved the earlier {', '.join(present)} to {archive}")
    return archive


def check_data_readable(data: str) -> None:
    if data == "builtin":
        return
    path = Path(data).expanduser()
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise UserError(f"--data {data}: cannot be read ({e.strerror or e}); check its permissions or give "
                        f"another path") from None


def checkpoint_bytes(n_params_total: int) -> int:
    """fp32 weights and AdamW's two moments, plus a margin for the curve and RNG states."""
    return 12 * n_params_total + 2**20


def required_free_bytes(runs: list[Experiment], keep_checkpoints: bool) -> int:
    """Two copies of the largest checkpoint exist for a moment during its atomic replacement; with
    --keep-checkpoints every run's final checkpoint stays. Plus room for records and the figure."""
    sizes = [checkpoint_bytes(e.n_params_total) for e in runs]
    return (sum(sizes) + max(sizes) if keep_checkpoints else 2 * max(sizes)) + 50 * 2**20


def check_free_space(out_dir: Path, runs: list[Experiment], keep_checkpoints: bool) -> None:
    import shutil
    need = required_free_bytes(runs, keep_checkpoints)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"only {free / 2**20:.0f} MiB free where {out_dir} lives; checkpoints and results need "
                        f"about {need / 2**20:.0f} MiB: free some space or choose another --output-dir")


def refuse_changed_settings(existing: dict | None, cfg: RunConfig, runs: list[Experiment], store: RunStore,
                            checkpoints: CheckpointPolicy, corpus_record: dict | None) -> None:
    """Compare this command with the earlier work in the output folder: results.json's settings and
    the definition of every run that has a record or a checkpoint. Any difference is a UserError that
    names the settings; without a corpus record the corpus keys wait for a second call."""
    diffs: dict[str, list] = {}          # key -> [old, new, number of runs]
    if existing is not None:
        old_cfg = existing["config"]
        for key in DEFINING_CONFIG_KEYS:
            if key in old_cfg and old_cfg[key] != getattr(cfg, key):
                diffs[key] = [old_cfg[key], getattr(cfg, key), 0]
    for exp in runs:
        new = experiment_definition(exp, cfg, corpus_record)
        earlier = []
        rec = store.load(exp.run_id)
        if rec is not None:
            earlier.append(rec["definition"])
        if checkpoints.folder is not None and checkpoints.path(exp.run_id).exists():
            earlier.append(read_checkpoint_header(checkpoints.path(exp.run_id))["definition"] or {})
        for old in earlier:
            for key, o, n in definition_differences(old, new, list(new)):
                entry = diffs.setdefault(key, [o, n, 0])
                entry[2] += 1
    if diffs:
        parts = []
        for key, (o, n, count) in diffs.items():
            opt = OPTION_OF.get(key)
            where = ", ".join(x for x in (opt, f"{count} runs" if count else None) if x)
            parts.append(f"{key} {o} -> {n}" + (f" ({where})" if where else ""))
        raise UserError(f"{cfg.output_dir} holds results made with other settings: {'; '.join(parts)}. "
                        f"Rerun the earlier command to resume it, pass --fresh to move the earlier results "
                        f"aside, or choose another --output-dir")


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of processes that died mid-write (their renamed targets are intact)."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        try:
            os.kill(int(pid), 0)               # still alive: another process of ours is writing it
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass


def stop_on_signals(stop: StopRequest):
    """While training, SIGINT and SIGTERM ask the step loop to checkpoint and stop; a second signal
    stops at once (KeyboardInterrupt)."""
    import contextlib
    import signal

    def handler(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum
        log(f"received {signal.Signals(signum).name}: saving a checkpoint at the next step, then stopping "
            f"(send it again to stop at once)")

    @contextlib.contextmanager
    def installed():
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return installed()


def finish_results(results: dict, out_dir: Path, figure: bool = True) -> None:
    """Fit, predict, write results.json, then draw the figure: a plotting error never loses results."""
    results["fits"] = fit_sweeps(results["experiments"])
    results["predictions"] = predictions_from_fits(results["fits"])
    results["excluded_from_fits"] = [
        {"run_id": e["run_id"], "name": e["name"], "seed": e.get("seed"), "status": e["status"],
         **({"diverged_at_step": e["diverged_at_step"], "last_good_loss": e["last_good_loss"]}
            if e["status"] == "diverged" else {})}
        for e in results["experiments"] if e.get("status") != "completed"]
    write_json_atomic(out_dir / "results.json", results)
    if not figure:
        return
    try:
        plot_scaling_figure(results, out_dir / "scaling_laws_complete.png")
    except Exception as e:       # the results are already on disk; say what failed and go on
        log(f"figure: could not draw scaling_laws_complete.png ({type(e).__name__}: {e})")


def print_summary(results: dict, out_dir: Path) -> None:
    log("")
    log("summary")
    several_seeds = len({e.get("seed") for e in results["experiments"]}) > 1
    for e in results["experiments"]:
        if e["final_val_loss"] is not None:
            loss = f"val loss {e['final_val_loss']:.4f}"
        elif e["status"] == "diverged":
            good = e.get("last_good_loss")
            loss = (f"DIVERGED at step {e['diverged_at_step']}/{e['steps']} (last finite loss "
                    f"{'-' if good is None else f'{good:.4f}'})")
        else:
            loss = e["status"].upper().replace("_", " ")
        name = e["run_id"] if several_seeds else e["name"]
        log(f"  {name:<22} N={format_count(e['n_params_nonembedding']):>7} "
            f"D={format_count(e['tokens']):>7}  {loss}  ({format_duration(e['wall_time_s'])})")
    excluded = results.get("excluded_from_fits", [])
    if excluded:
        log(f"  left out of the fits: " + ", ".join(f"{x['run_id']} ({x['status']})" for x in excluded))
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


def expand_seeds(plan: list[Experiment], seeds: list[int]) -> list[Experiment]:
    """Seed-major order: the whole ladder of the first seed comes first, so an early stop still leaves
    complete sweeps to fit."""
    return [dataclasses.replace(e, seed=s) for s in seeds for e in plan]


def run(cfg: RunConfig, preset: Preset, estimate: bool = True, fresh: bool = False,
        command: str | None = None) -> dict:
    out_dir = Path(cfg.output_dir)
    # early checks, before any corpus work or training: each is a UserError (one line, exit 2)
    prepare_output_dir(out_dir)
    if fresh:
        archive_previous(out_dir)
    existing = read_results(out_dir)
    check_data_readable(cfg.data)
    device = setup_device(cfg.device)
    import torch
    log(f"device: {device.name} ({device.description}), dtype {device.dtype}, torch {torch.__version__}, "
        f"python {platform.python_version()}")
    runs = expand_seeds(build_plan(cfg, preset), cfg.seeds)
    check_free_space(out_dir, runs, cfg.keep_checkpoints)
    every_s, every_steps = parse_checkpoint_every(cfg.checkpoint_every)
    policy = CheckpointPolicy(out_dir / "checkpoints", every_s, every_steps, cfg.keep_checkpoints)
    store = RunStore(out_dir)
    if existing is not None:
        store.recover(existing["experiments"])
    refuse_changed_settings(existing, cfg, runs, store, policy, None)

    corpus = load_corpus(cfg.data, cfg.vocab_size, Path(cfg.cache_dir))
    cfg.vocab_size = corpus.vocab_size
    plan = build_plan(cfg, preset)
    runs = expand_seeds(plan, cfg.seeds)
    refuse_changed_settings(existing, cfg, runs, store, policy, corpus.record)
    remove_stale_temporaries(policy.folder)
    remove_stale_temporaries(store.folder)
    stop = StopRequest()
    trainer = Trainer(cfg, corpus, device, progress_bar=sys.stderr.isatty(), checkpoints=policy, stop=stop)
    done = {}
    for exp in runs:
        rec = store.load(exp.run_id)
        if rec is not None and rec["status"] in FINAL_STATUSES and \
                rec["experiment_hash"] == definition_hash(experiment_definition(exp, cfg, corpus.record)):
            done[exp.run_id] = rec
    estimates = None
    if estimate and len(done) < len(runs):
        try:
            estimates = estimate_wall_time(trainer, plan)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            log("plan: the time estimate ran out of device memory; skipping it (training retries with "
                "smaller micro-batches)")
    print_plan(plan, cfg, estimates)
    if len(cfg.seeds) > 1:
        log(f"  every experiment runs once per seed: seeds {', '.join(map(str, cfg.seeds))} "
            f"({len(runs)} runs)")
    for e in plan:
        if e.tokens > len(corpus.train):
            log(f"warning: {e.name} trains on {format_count(e.tokens)} tokens, "
                f"{e.tokens / len(corpus.train):.1f} epochs of this corpus's "
                f"{format_count(len(corpus.train))}: data repeats")
            break
    if device.name == "cpu" and cfg.mode != "tiny" and estimates:
        log(f"note: mode '{cfg.mode}' would take about {sum(estimates.values()) / 3600:.1f} hours on this CPU; "
            f"--mode tiny is sized for a CPU. Continuing as asked.")
    resumable = [e.run_id for e in runs if e.run_id not in done and policy.path(e.run_id).exists()]
    if done or resumable:
        log(f"resume: {len(done)} of {len(runs)} runs finished earlier (kept, not retrained)"
            + (f"; continuing {', '.join(resumable)} from checkpoints" if resumable else ""))
    if existing is not None:
        others = {e["run_id"] for e in existing["experiments"]} - {e.run_id for e in runs}
        if others:
            log(f"note: {len(others)} earlier runs are not in this plan; their records stay in {store.folder} "
                f"and are left out of results.json")

    results = {"schema_version": SCHEMA_VERSION, "mode": cfg.mode, "config": dataclasses.asdict(cfg),
               "environment": environment_record(device, corpus), "experiments": [], "fits": {},
               "predictions": []}
    t0 = time.time()
    with stop_on_signals(stop):
        for i, exp in enumerate(runs):
            if exp.run_id in done:
                results["experiments"].append(done[exp.run_id])
                continue
            log(f"experiment {i + 1}/{len(runs)}: {exp.run_id}")
            try:
                if stop.signum is not None:      # a signal between two runs: nothing of this one to save
                    raise TrainingInterrupted(stop.signum, None)
                record = run_with_oom_retries(trainer, exp)
            except TrainingInterrupted as e:
                if e.record is not None:
                    results["experiments"].append(e.record)
                results["wall_time_s"] = round(time.time() - t0, 2)
                finish_results(results, out_dir, figure=False)
                import signal
                n_final = sum(1 for r in results["experiments"] if r["status"] in FINAL_STATUSES)
                runs_text = f"{n_final} finished run" + ("" if n_final == 1 else "s")
                where = (f" in {exp.run_id} at step {e.record['steps_done']}/{exp.steps} (checkpoint saved)"
                         if e.record is not None else "")
                raise RunInterrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name}{where}; "
                                     f"results.json holds {runs_text}. Resume with the same "
                                     f"command: {command or 'the same command'}") from None
            store.save(record)                   # the record first, then the checkpoint may go
            trainer.remove_checkpoint(exp)
            results["experiments"].append(record)
            results["wall_time_s"] = round(time.time() - t0, 2)
            write_json_atomic(out_dir / "results.json", results)
    finish_results(results, out_dir)
    print_summary(results, out_dir)
    log(f"done in {format_duration(time.time() - t0)}")
    return results


def main(argv: list[str] | None = None) -> int:
    import shlex
    args = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    # the command that resumes this run: the same one, without --fresh (which would start over)
    command = "python " + shlex.join([sys.argv[0] if argv is None else Path(__file__).name,
                                      *(str(a) for a in given if a != "--fresh")])
    try:
        cfg, preset = config_from_args(args)
        run(cfg, preset, estimate=not args.no_estimate, fresh=args.fresh, command=command)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RunInterrupted as e:
        log(str(e))
        print(str(e), file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished experiment; rerun the same command to resume "
              "from the latest checkpoint", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

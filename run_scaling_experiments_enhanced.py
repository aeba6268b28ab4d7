#!/usr/bin/env python3
"""Measure neural scaling laws on your own machine, in one command.

    python run_scaling_experiments_enhanced.py --mode tiny     # CPU, minutes
    python run_scaling_experiments_enhanced.py --mode quick    # one GPU

Trains a ladder of GPT-style models (a parameter sweep at fixed steps and a data sweep at a fixed model
size), fits L(N) = c + a/N^b and L(D) = c + a/D^b, extrapolates to well-known model scales and writes
`results.json` (first) and the 2x2 figure `scaling_laws_complete.png` (after) into
`scaling_results_<mode>_v2/`.

Map of this file, in data-flow order (each section opens with a banner saying what it owns):
     1. errors and small helpers      UserError, size parsing, atomic JSON, the log line
     2. presets and the run spec      modes, model-shape and learning-rate rules, RunSpec (one run: what
                                      defines it and which laws it feeds), build_plan
     3. data                          built-in corpus, text/bin loaders, Hugging Face datasets, streaming
                                      BPE tokenizer and token cache, the repetition check, batches
     4. model                         GPTConfig and the GPT-2 style decoder's modules, FLOPs per token
     5. training                      device, LR schedule, TrainState, the Trainer's step loop and its
                                      out-of-memory retries
     6. resume and checkpoints        a run's definition and record (from its RunSpec), checkpoint files,
                                      the output folder's records, settings checks, signals
     7. speed                         peak FLOP/s, MFU, peak memory, the plan's time estimate, --benchmark
     8. distributed and parallel      torchrun ranks (DDP), --shard/--only, --parallel, merging parts
     9. fitting                       the points table (one row per run), robust power-law and joint
                                      L(N, D) fits with bootstrap intervals, hold-out checks,
                                      compute-optimal allocation, predictions (pure functions, no torch)
    10. figure                        the 2x2 figure and compute_optimal.png
    11. exports                       runs.csv (the runs as a table), the --tracker writers (TensorBoard,
                                      Weights & Biases)
    12. CLI                           argparse, the run's configuration, the Session (one owner of a
                                      command's state), prepare -> train -> finish, main()

`quick_scaling_demo.py` and `compare_quick_vs_real.py` import from this file; nothing is copied.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import csv
import ctypes
import dataclasses
import datetime
import fcntl
import gc
import hashlib
import io
import itertools
import json
import math
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# scipy's L-BFGS-B makes thousands of tiny BLAS calls; with OpenBLAS threads on a busy CPU each costs
# milliseconds (the Chinchilla fit measured 15 s instead of 2 s). It must be set before numpy and scipy
# load OpenBLAS; a value the user exported wins, and torch's own threads are not affected.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

# The rest of requirements.txt: a missing package fails one line, where it is first needed (missing_packages),
# so the module still imports (tests collect, the demo's pure functions work) on a partial install.
try:
    import matplotlib
    matplotlib.use("Agg")                # files only: runs under nohup and over ssh have no display
    import matplotlib.pyplot as plt
except ImportError:
    matplotlib = plt = None
try:
    from scipy.optimize import minimize
except ImportError:
    minimize = None
try:
    import tokenizers
    from tqdm import tqdm
except ImportError:
    tokenizers = tqdm = None

# MKL (torch's CPU matmuls) may use fewer threads than asked when the machine is busy, and a matmul split
# over fewer threads sums in another order: the same run then differs in the 7th digit (seen: 1 of 20
# runs of a test command under a 3-process CPU hog; 0 of 12 with this set). Fixed threads keep a CPU run
# bit for bit reproducible, resumed or not. Set before torch loads MKL; a user's own setting wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
try:       # the demo, the comparison, --fit-only and --fit-csv also run where torch is not installed
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel
except ImportError:
    torch = dist = nn = F = DistributedDataParallel = None
_Module = nn.Module if nn is not None else object    # base of the model's classes, importable without torch

# 2: a flat points table (`points`) in place of every run's record (`experiments`, now under runs/ only);
# roles in place of `sweep`, `in_param_sweep` and `in_data_sweep`. --fit-only reads both.
SCHEMA_VERSION = 2
EOT_TOKEN = "<|endoftext|>"

# ----------------------------------------------------------------------------------------------------
# 1. errors and small helpers: the user-facing exception, size strings, atomic files, the log
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
    """25000 -> '25K', 1580032 -> '1.58M', 1.75e11 -> '175B', 999_997_440 -> '1B'."""
    rounded = float(f"{n:.3g}")        # round first, so 999,997,440 takes the suffix of 1B, not '1e+03M'
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(rounded) >= scale:
            value = rounded / scale
            return f"{value:.3g}{suffix}" if abs(value) < 1000 else f"{value:,.0f}{suffix}"
    return f"{rounded:g}"


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
        f.write(json_text(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


JSON_LINE = 100          # json_text: a value whose JSON fits this many characters stays on one line


def json_text(obj, level: int = 0) -> str:
    """JSON for people and editors: indented by two spaces, but a short value, a list of numbers or
    strings, and each flat row of a table (a list of dicts of scalars) on one line each."""
    flat = json.dumps(obj, default=_json_default)
    if not isinstance(obj, (dict, list)) or not obj or len(flat) <= JSON_LINE or is_flat_row(obj) or \
            (isinstance(obj, list) and not any(isinstance(v, (dict, list)) for v in obj)):
        return flat
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(str(k))}: {json_text(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{json_text(v, level + 1)}" for v in obj) + f"\n{pad}]"


def is_flat_row(obj) -> bool:
    """A dict whose values are scalars or lists of scalars: a row of a table."""
    return isinstance(obj, dict) and all(
        not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v))
        for v in obj.values())


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

def read_json_file(path: Path, advice: str) -> object:
    """A JSON file's contents; a file that cannot be read or parsed is a one-line UserError ending in
    `advice` (the file is never touched)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        f"{advice}") from None

def log(msg: str = "") -> None:
    """One flushed line on stdout, readable under `tail -f`."""
    print(msg, flush=True)


@contextlib.contextmanager
def silenced(quiet: bool):
    """Within the block, when `quiet`, stdout goes nowhere: every torchrun rank but rank 0 logs nothing,
    so each line appears once."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield

# ----------------------------------------------------------------------------------------------------
# 2. presets and the run spec: the modes, the shape and LR rules, RunSpec and the plan of RunSpecs
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
    schedule: str = "cosine"        # or "wsd" (warmup-stable-decay)
    horizons: str | None = None     # WSD cooldown branches of every parameter-sweep run (--horizons)
    warmup_frac: float = 0.1        # of the parameter sweep's steps: one warmup for every run of the plan
    # a WSD grid whose rows end at different horizons: each size's stable-run steps, every one of them a
    # horizon (None: `steps` for every size). Used only with the preset's sizes, steps and horizons.
    row_steps: tuple[int, ...] | None = None
    lr_width: float = 0.4           # peak LR = min(lr_cap, lr_width / d_model) unless --lr (default_peak_lr)
    lr_cap: float | None = 5e-3     # None: lr_width / d_model at every width

# tiny: a WSD grid, not two lines. Depth-2 models of width 32, 48, 64, 96, 128 (N = 25K, 57K, 100K, 224K,
# 397K). The three narrower train once to 8M tokens (3,904 steps of 64 x 32) with cooldowns branched at 1M,
# 2M and 4M; the two wider to 4M, branched at 1M and 2M (row_steps), which leaves out the grid's costliest
# corner. L(N) is the five sizes at 4M. The data sweep is the 25K model's row, branched also halfway (in
# log D) between its horizons, so L(D)'s hold-out refits on six points for a few seconds of cooldowns.
# 21 points. A 32-token context and a 512-token BPE make these sizes bend toward a floor within the
# budget, so the joint law can find E. Why this grid and not the designs before it: docs/schedules.md.
PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", (25_000, 56_000, 100_000, 220_000, 400_000),
                   tuple(s * 2048 for s in (488, 690, 976, 1380, 1952, 2760, 3904)),    # 1M-8M, the 25K row
                   steps=3904, data_model_size=25_000, batch_size=64, context_length=32, vocab_size=512,
                   n_layer=2, head_dim=16, eval_interval=200, eval_batches=20, log_interval=50,
                   schedule="wsd", horizons="0.125x,0.25x,0.5x,1x", warmup_frac=0.01,
                   lr_width=0.3, lr_cap=None, row_steps=(3904, 3904, 3904, 1952, 1952)),
    "quick": Preset("quick", (5 * 10**6, 20 * 10**6, 50 * 10**6), (10 * 10**6, 50 * 10**6, 100 * 10**6),
                    steps=3000, data_model_size=20 * 10**6),
    "standard": Preset("standard", tuple(x * 10**6 for x in (5, 10, 20, 50, 100)),
                       tuple(x * 10**6 for x in (10, 50, 100, 200, 500)), steps=5000,
                       data_model_size=20 * 10**6, eval_interval=500),
    "full": Preset("full", tuple(x * 10**6 for x in (5, 10, 20, 50, 100, 200, 500)),
                   tuple(x * 10**6 for x in (10, 50, 100, 200, 500, 1000)), steps=8000,
                   data_model_size=50 * 10**6, eval_interval=500),
}

ARCHS = ("gpt2", "llama")            # --arch: the decoder's recipe (section 4)


def swiglu_hidden(d_model: int) -> int:
    """llama's SwiGLU width: three d_model x h matrices hold 8 d^2 weights, as GPT-2's two d x 4d do, so
    a block keeps 12 d^2 weights; h = 8 d / 3 rounded to the nearest integer (exact when 3 divides d)."""
    return round(8 * d_model / 3)


def n_params_nonembedding(n_layer: int, d_model: int, arch: str = "gpt2") -> int:
    """Kaplan's N: every weight except token and position embeddings (the output layer is tied to them).

    gpt2, per block: attention qkv 3d^2+3d and projection d^2+d, MLP d*4d+4d and 4d*d+d, two LayerNorms
    4d, i.e. 12 d^2 + 13 d; plus the final LayerNorm's 2d. llama, per block: attention 4d^2 (no biases),
    SwiGLU 3dh, two RMSNorm gains 2d; plus the final RMSNorm's d (rotary positions have no weights).
    """
    if arch == "llama":
        return n_layer * (4 * d_model * d_model + 3 * d_model * swiglu_hidden(d_model) + 2 * d_model) + d_model
    return n_layer * (12 * d_model * d_model + 13 * d_model) + 2 * d_model


def n_params_total(n_layer: int, d_model: int, vocab_size: int, context_length: int, arch: str = "gpt2") -> int:
    positions = 0 if arch == "llama" else context_length * d_model
    return n_params_nonembedding(n_layer, d_model, arch) + vocab_size * d_model + positions


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


def default_peak_lr(d_model: int, lr_width: float = 0.4, lr_cap: float | None = 5e-3) -> float:
    """Peak learning rate for a model of this width: min(lr_cap, lr_width / d_model), or lr_width / d_model
    without a cap.

    The best rate falls with width; 0.4/d_model lands within 15% of GPT-3's published rates (6e-4 at
    d=768, 2e-4 at d=2048). Tiny's 64 x 32-token batches want less (lr_width 0.3) and no cap: its widths
    32 and 48 did best at or above 0.3/d_model in `--lr-sweep` (docs/model.md has the tables).
    """
    return lr_width / d_model if lr_cap is None else min(lr_cap, lr_width / d_model)


# What a run feeds: its roles, as the plan decides them. A run can feed several (tiny's 25K run at 4M
# tokens is a point of L(N), of L(D) and of the joint law); a WSD branch feeds them like any other run.
ROLE_N, ROLE_D, ROLE_JOINT = "L(N)", "L(D)", "joint"
ROLE_VALIDATION = "validation"     # --validate's run: a check of the fits, never fitted
ROLE_LR = "lr-sweep"               # --lr-sweep's runs: a parabola per size, no scaling law
ROLES = (ROLE_N, ROLE_D, ROLE_JOINT, ROLE_VALIDATION, ROLE_LR)
SWEEP_ROLE = {"params": ROLE_N, "data": ROLE_D}        # the one-variable fits by the name the figure uses

FROM_CONFIG = {"from_config": True}      # a run setting copied from the command's RunConfig
NOT_DEFINING = {"defines": False}        # recorded, but changing it does not change the run


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan, frozen, built by build_plan and nowhere else. Its fields are the one list of
    what defines a run: the definition (run_definition), its hash, the settings check, the merge check of
    --fit-only and the run's record all derive from them, so a setting added here reaches all five.
    `roles` and `target` say what the run is for and are not part of the definition."""
    name: str
    n_layer: int
    d_model: int
    n_head: int
    steps: int
    peak_lr: float
    seed: int = 0                  # with --seeds, one RunSpec per (run, seed)
    warmup_steps: int | None = None     # None: warmup_frac of this run's steps (timing probes)
    branch_of: str | None = None   # WSD: the stable run whose state at branch_step this cooldown starts from
    branch_step: int = 0
    branch_points: tuple[int, ...] = ()    # a stable run: the steps where its branches leave it
    # --lr-sweep: the ladder run whose initialisation and batches this run reuses, so that within a size
    # only the learning rate differs between multipliers
    draws_of: str | None = None
    arch: str = field(default="gpt2", metadata=FROM_CONFIG)
    vocab_size: int = field(default=0, metadata=FROM_CONFIG)
    context_length: int = field(default=0, metadata=FROM_CONFIG)
    batch_size: int = field(default=0, metadata=FROM_CONFIG)
    grad_accum: int = field(default=1, metadata=FROM_CONFIG)
    warmup_frac: float = field(default=0.1, metadata=FROM_CONFIG)
    min_lr_frac: float = field(default=0.1, metadata=FROM_CONFIG)
    weight_decay: float = field(default=0.01, metadata=FROM_CONFIG)
    grad_clip: float = field(default=1.0, metadata=FROM_CONFIG)
    schedule: str = field(default="cosine", metadata=FROM_CONFIG)
    cooldown_frac: float = field(default=0.2, metadata=FROM_CONFIG)
    cooldown_shape: str = field(default="1-sqrt", metadata=FROM_CONFIG)
    eval_interval: int = field(default=250, metadata=FROM_CONFIG)
    eval_batches: int = field(default=20, metadata=FROM_CONFIG)
    log_interval: int = field(default=50, metadata=FROM_CONFIG)
    roles: tuple[str, ...] = field(default=(), metadata=NOT_DEFINING)
    target: int = field(default=0, metadata=NOT_DEFINING)    # the preset's N or D this run was sized for

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length * self.grad_accum

    @property
    def tokens(self) -> int:
        """D: the tokens the run is trained on, steps x tokens per step (a branch's include its stable run's)."""
        return self.steps * self.tokens_per_step

    @property
    def n_params_nonembedding(self) -> int:
        return n_params_nonembedding(self.n_layer, self.d_model, self.arch)

    @property
    def n_params_total(self) -> int:
        return n_params_total(self.n_layer, self.d_model, self.vocab_size, self.context_length, self.arch)

    @property
    def trained_steps(self) -> int:
        """Steps this run trains itself: a branch shares the stable run's steps before its cooldown."""
        return self.steps - self.branch_step

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params_nonembedding * self.tokens

    @property
    def tokens_processed(self) -> int:
        """Tokens this run trains on itself (a branch: its cooldown's)."""
        return self.tokens * self.trained_steps // self.steps

    @property
    def flops_processed(self) -> float:
        return 6.0 * self.n_params_nonembedding * self.tokens_processed

    @property
    def run_id(self) -> str:
        """Unique per run: names a run's record under runs/ and its checkpoint."""
        return f"{self.name}-seed{self.seed}"

    def has(self, role: str) -> bool:
        return role in self.roles


def config_settings(cfg) -> dict:
    """The RunSpec fields every run of a plan copies from the command's RunConfig."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunSpec) if f.metadata.get("from_config")}


def run_definition_keys(spec: RunSpec | type = RunSpec) -> list[str]:
    """The names of the settings that define a run: the spec's fields but the NOT_DEFINING ones."""
    return [f.name for f in dataclasses.fields(spec) if f.metadata.get("defines", True)]


@dataclass(frozen=True)
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
    dtype: str = "auto"             # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool | None = None     # torch.compile; None: on for CUDA only
    peak_tflops: float | None = None
    output_dir: str = ""
    cache_dir: str = ""
    # data preparation (section 3): dataset column and split, tokenizer threads, BPE sample, repetition
    text_column: str = "text"
    split: str = "train"
    num_proc: int | None = None
    bpe_sample_chars: int | None = None       # None: BPE_SAMPLE_CHARS
    no_repeat: bool = False
    max_tokens: int | None = None             # --max-tokens: prepare at most this many training tokens
    # long runs (issue 5): repeated seeds and checkpoints
    seeds: list[int] = field(default_factory=lambda: [0])   # every experiment runs once per seed
    checkpoint_every: str = "5m"   # a duration (90s, 5m, 1h) or a step count (500steps)
    keep_checkpoints: bool = False
    # the learning-rate schedule (section 5) and WSD's cooldown branches
    schedule: str = "cosine"
    cooldown_frac: float = 0.2
    cooldown_shape: str = "1-sqrt"
    horizons: str | None = None
    row_steps: list[int] | None = None       # each size's stable-run steps (Preset.row_steps); None: steps
    warmup_steps: int | None = None          # None: warmup_frac x steps, the same for every run
    validate: float | None = None  # --validate: train the compute-optimal model at this x the largest compute
    n_count: str | None = None     # --n-count: the N of the joint law (None: DEFAULT_N_COUNT)
    arch: str = "gpt2"             # --arch: the decoder's recipe (ARCHS, section 4)
    tracker: str = "none"          # --tracker (section 11): where curves and fits also go; not part of any run
    lr_multipliers: list[float] | None = None   # --lr-sweep: these multiples of each size's rule, not the ladder

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length * self.grad_accum


def plan_warmup_steps(cfg: RunConfig) -> int:
    """One warmup for every run of a plan: --warmup-steps, else warmup_frac of the parameter sweep's
    steps. A warmup proportional to each run's length penalises short runs and steepens L(D) (measured:
    see PRESETS and docs/fits.md); Porian et al. 2024 name it a cause of the Kaplan-Chinchilla gap."""
    return cfg.warmup_steps or max(1, round(cfg.warmup_frac * cfg.steps))


def horizon_steps(cfg: RunConfig) -> list[int]:
    """--horizons as step counts, ascending: token counts (0.5M) or multiples of the sweep's own D
    (0.25x); the largest is the stable run's length. Without horizons, just cfg.steps."""
    if not cfg.horizons:
        return [cfg.steps]
    steps = set()
    for item in (t.strip() for t in cfg.horizons.split(",") if t.strip()):
        if item.lower().endswith("x"):
            try:
                multiple = float(item[:-1])
            except ValueError:
                raise UserError(f"--horizons {cfg.horizons}: cannot read '{item}'; give token counts (0.5M,1M) "
                                f"or multiples of the run's D (0.25x,0.5x,1x)") from None
            steps.add(max(1, round(multiple * cfg.steps)))
        else:
            steps.add(max(1, round(parse_count(item) / cfg.tokens_per_step)))
    return sorted(steps)


def row_horizons(cfg: RunConfig, horizons: list[int]) -> list[list[int]]:
    """Each parameter-sweep size's horizons in steps, ascending, the last its stable run's: every
    horizon up to the size's row_steps (cfg.row_steps, which needs horizons), or all of them."""
    if not cfg.row_steps or not cfg.horizons:
        return [horizons] * len(cfg.param_sizes)
    if len(cfg.row_steps) != len(cfg.param_sizes) or not set(cfg.row_steps) <= set(horizons):
        raise UserError(f"row steps {cfg.row_steps} must give one horizon of {horizons} per size "
                        f"({len(cfg.param_sizes)} sizes)")
    return [[h for h in horizons if h <= last] for last in cfg.row_steps]


def data_steps(cfg: RunConfig) -> list[int]:
    """The data sweep's lengths in steps, ascending."""
    return sorted({max(1, round(d / cfg.tokens_per_step)) for d in cfg.data_sizes})


def shared_data_model(cfg: RunConfig, preset: Preset, horizons: list[int]) -> int | None:
    """The parameter-sweep size whose WSD runs are also the data sweep, or None: the data sweep's model
    has that size's shape, its largest length is that size's stable run and every horizon of that size
    is one of its lengths. Lengths that are not horizons become extra branches of that size's row."""
    if cfg.schedule != "wsd" or not cfg.data_sizes:
        return None
    shape, lengths = choose_shape(cfg.data_model_size, preset), data_steps(cfg)
    return next((n for n, row in zip(cfg.param_sizes, row_horizons(cfg, horizons))
                 if choose_shape(n, preset) == shape and lengths[-1] == row[-1] and set(row) <= set(lengths)),
                None)


def with_roles(spec: RunSpec, *roles: str) -> RunSpec:
    """The spec with these roles added, in ROLES' order."""
    return dataclasses.replace(spec, roles=tuple(r for r in ROLES if r in spec.roles or r in roles))


def build_plan(cfg: RunConfig, preset: Preset) -> list[RunSpec]:
    """Every run of the command, each a frozen RunSpec with its roles: the parameter sweep (every size,
    cfg.steps steps) and the data sweep (one size, D tokens each), every run a point of the joint law.
    Under WSD a model trains once: with --horizons each size's stable run branches a cooldown at every
    shorter horizon, and the data sweep is one run to the largest D whose branches give the others.
    When the data sweep's model is one of the parameter sweep's sizes and its lengths are that size's
    horizons, that row is the data sweep (L(D)) and nothing trains twice. L(N)'s points are the runs at
    the D every row reaches. Branches come before their stable run, in the order they are trained."""
    if cfg.horizons and cfg.schedule != "wsd":
        raise UserError("--horizons branches cooldowns off a constant learning rate: add --schedule wsd")
    if cfg.lr_multipliers:
        return build_lr_sweep_plan(cfg, preset)
    tps, warmup = cfg.tokens_per_step, plan_warmup_steps(cfg)
    schedule = schedule_of(cfg, warmup)

    def make(name, target, n_target, steps, branch_of=None):
        n_layer, d_model, n_head = choose_shape(n_target, preset)
        branch_step = schedule.cooldown_start(steps) if branch_of else 0
        if branch_of and branch_step < warmup:
            fix = (f" or --warmup-steps below {branch_step}" if branch_step > 1
                   else " (or fewer tokens per step)")
            raise UserError(f"{name}: a WSD branch of {steps} steps would start its cooldown at step "
                            f"{branch_step}, inside the {warmup}-step warmup; choose longer horizons{fix}")
        return RunSpec(name=name, n_layer=n_layer, d_model=d_model, n_head=n_head, steps=steps,
                       peak_lr=cfg.lr if cfg.lr is not None else default_peak_lr(d_model, preset.lr_width,
                                                                                 preset.lr_cap),
                       warmup_steps=warmup, branch_of=branch_of, branch_step=branch_step,
                       roles=(ROLE_JOINT,), target=target, **config_settings(cfg))

    def with_branches(main, branches):
        return [*branches, dataclasses.replace(main, branch_points=tuple(b.branch_step for b in branches))]

    plan, horizons = [], horizon_steps(cfg)
    shared = shared_data_model(cfg, preset, horizons)
    rows = [data_steps(cfg) if n == shared else row             # the data sweep's row: its lengths
            for n, row in zip(cfg.param_sizes, row_horizons(cfg, horizons))]
    common = min(row[-1] for row in rows)       # the steps every row reaches: the 1-D L(N)'s D
    for n, steps in zip(cfg.param_sizes, rows):
        main = make(f"params-N{format_count(n)}", n, n, steps[-1])
        row = with_branches(main, [make(f"{main.name}@{format_count(h * tps)}", n, n, h, main.name)
                                   for h in steps[:-1]])
        row = [with_roles(e, ROLE_N) if e.steps == common else e for e in row]
        plan += [with_roles(e, ROLE_D) for e in row] if n == shared else row
    if cfg.data_sizes and shared is None:
        sizes = sorted(cfg.data_sizes)
        data_main = make(f"data-D{format_count(sizes[-1])}", sizes[-1], cfg.data_model_size,
                         max(1, round(sizes[-1] / tps)))
        others = [make(f"data-D{format_count(d)}", d, cfg.data_model_size, max(1, round(d / tps)),
                       data_main.name if cfg.schedule == "wsd" else None) for d in sizes[:-1]]
        data = with_branches(data_main, [b for b in others if b.branch_of]) if cfg.schedule == "wsd" \
            else [*others, data_main]
        plan += [with_roles(e, ROLE_D) for e in data]
    return plan

# --lr-sweep: each size of the ladder at a few multiples of its learning-rate rule, at one short horizon
DEFAULT_LR_MULTIPLIERS = (0.5, 0.7, 1.0, 1.4, 2.0)


def parse_lr_multipliers(text: str) -> list[float]:
    """'0.5,0.7,1,1.4,2' -> [0.5, 0.7, 1.0, 1.4, 2.0]: at least three distinct positive values (a parabola)."""
    try:
        values = sorted({float(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise UserError(f"--lr-multipliers {text}: give comma-separated numbers, e.g. 0.5,0.7,1,1.4,2") from None
    if len(values) < 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--lr-multipliers {text}: give at least three distinct positive multipliers "
                        f"(a parabola in log LR needs three)")
    return values


def lr_sweep_steps(cfg: RunConfig) -> int:
    """The sweep's one horizon: the ladder's shortest (tiny: 488 steps, 1M tokens, the first point of
    every row), or the parameter sweep's steps when the plan has no horizons. Short, so every size and
    multiplier fits the budget; the first horizon every row reaches, so it is a point of the ladder."""
    return horizon_steps(cfg)[0]


def lr_multiplier_of(name: str) -> float:
    """'lr-N25K-x1.4' -> 1.4: an --lr-sweep run's multiple of its rule, as build_lr_sweep_plan names it."""
    return float(name.rsplit("-x", 1)[1])


def build_lr_sweep_plan(cfg: RunConfig, preset: Preset) -> list[RunSpec]:
    """One run per (size, multiplier) of `lr_sweep_steps` steps under the plan's schedule and warmup.
    Each reuses its size's ladder run's initialisation and batches (`draws_of`), so within a size only
    the peak LR differs; under WSD the 1x run is the computation of the ladder's branch at that horizon."""
    steps, warmup = lr_sweep_steps(cfg), plan_warmup_steps(cfg)
    if warmup >= steps:
        raise UserError(f"--lr-sweep: its {steps}-step runs would end inside the {warmup}-step warmup; "
                        f"give --warmup-steps below {steps} or longer --max-steps/--horizons")
    plan = []
    for n in cfg.param_sizes:
        n_layer, d_model, n_head = choose_shape(n, preset)
        rule = cfg.lr if cfg.lr is not None else default_peak_lr(d_model, preset.lr_width, preset.lr_cap)
        for m in cfg.lr_multipliers:
            plan.append(RunSpec(
                name=f"lr-N{format_count(n)}-x{m:g}", n_layer=n_layer, d_model=d_model, n_head=n_head,
                steps=steps, peak_lr=rule * m, warmup_steps=warmup, draws_of=f"params-N{format_count(n)}",
                roles=(ROLE_LR,), target=n, **config_settings(cfg)))
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
# Natural text by default: quick, standard and full stream FineWeb-Edu's 10B-token sample from the Hub;
# tiny keeps the built-in corpus, which needs no network.
NATURAL_TEXT = "hf:HuggingFaceFW/fineweb-edu:sample-10BT"
DEFAULT_DATA = {"tiny": "builtin"}          # every other mode: NATURAL_TEXT
# A Hub stream is prepared only as far as the plan needs: the largest run's tokens times this margin.
CAP_MARGIN = 1.05
# A capped preparation's validation set: every 20th piece until it holds this many characters (~2M
# tokens), then none. Every cap past ~40M training tokens thus has the very same validation text.
CAPPED_VAL_CHARS = 8_000_000
# Before a capped preparation the tokenizer does not exist yet, so its BPE sample is bounded in
# characters: the cap times this (English runs ~4 characters per token at these vocabularies).
CAPPED_BPE_CHARS_PER_TOKEN = 4
# Characters per token of the built-in corpus (Python source, 31.5M characters) under a BPE of each
# measured vocabulary: 15.1M tokens at 512 (tiny), 10.5M at 2,048. Used only to say how many epochs a
# plan would read before the corpus is tokenized; another vocabulary takes the largest measured one
# below it (fewer characters per token than it will have: epochs read high, never low).
BUILTIN_CHARS_PER_TOKEN = {512: 2.09, 2048: 3.0}
HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0
# Muennighoff et al. 2023: up to ~4 epochs repeated tokens are worth almost as much as fresh ones.
REPEAT_HARMLESS_EPOCHS = 4


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


def check_data_source(data: str) -> None:
    """--data names something that exists and can be read (the Hub and the built-in corpus aside)."""
    if data == "builtin" or data.startswith("hf:"):
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"--data {data}: no such file or folder; give a text file, a folder of text files, a "
                        f".bin token file, a dataset folder, hf:NAME[:CONFIG], or 'builtin'")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        raise UserError(f"--data {data}: cannot be read ({e.strerror or e}); check its permissions or give "
                        f"another path") from None


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


def piece_size(n_chars: int) -> int:
    """Characters per piece: PIECE_CHARS, smaller for a small corpus so it still yields ~400 pieces."""
    return int(min(PIECE_CHARS, max(1000, n_chars // 400)))


def iter_pieces(documents: Iterable[Iterable[str]], size: int,
                val_max_chars: int | None = None) -> Iterator[tuple[str, bool]]:
    """(piece, is_validation) for every piece, streaming: each document (an iterable of text blocks) is
    cut into pieces of at most `size` characters, at the last line end inside the limit when there is
    one, and every VAL_EVERY-th piece counting across documents goes to validation (until validation
    holds `val_max_chars`, when given). Holds one document's current block and one piece, never a whole
    document."""
    i = n_train = val_chars = 0
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
            if i % VAL_EVERY == VAL_EVERY // 2 and (val_max_chars is None or val_chars < val_max_chars):
                any_val = True
                val_chars += len(piece)
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
                bpe_sample_chars: int = BPE_SAMPLE_CHARS, max_train_tokens: int | None = None) -> Corpus:
    """Text corpora are tokenized once with a byte-level BPE and cached under a key made from the
    corpus's identity (content sha256, or Hub name + config + revision), the vocabulary and the split
    rule; a second run only memory-maps the cache. `data` is 'builtin', a text file or folder, a .bin
    token file, 'hf:NAME[:CONFIG][@REVISION]', or a local dataset folder (save_to_disk, parquet, jsonl).

    With `max_train_tokens` the stream stops once the training split holds that many tokens (see
    cache_covers for when such a cache serves a later plan)."""
    if data.endswith(".bin") and Path(data).expanduser().is_file():
        return load_token_file(Path(data).expanduser(), vocab_size)
    check_vocab_size(vocab_size, data)
    t0 = time.time()
    check_data_source(data)
    local = Path(data).expanduser()
    if data.startswith("hf:") or (data != "builtin" and dataset_files_kind(local)):
        source = dataset_source(data, text_column, split)
    else:
        source = text_file_source(data)
    entry = cache_entry(source, vocab_size, Path(cache_dir), bpe_sample_chars, max_train_tokens is not None)
    meta = read_cache_meta(entry)
    if meta is None or not cache_covers(meta, max_train_tokens):
        size = f", {source.n_chars / 1e6:.1f}M characters" if source.n_chars is not None else ""
        upto = f" up to {format_count(max_train_tokens)} training tokens" if max_train_tokens else ""
        log(f"data: tokenizing {source.name} ({source.record.get('n_files', 'streamed')} files{size}){upto} "
            f"with a {vocab_size}-token BPE; cached for later runs in {entry}")
        if meta is not None:
            log(f"data: the cache there holds {format_count(meta['n_train_tokens'])} training tokens, fewer "
                f"than the {format_count(max_train_tokens)} this plan needs: preparing it again, longer")
        build_token_cache(source, vocab_size, entry, bpe_sample_chars=bpe_sample_chars, num_proc=num_proc,
                          max_train_tokens=max_train_tokens)
        meta = read_cache_meta(entry)
    else:
        log(f"data: using cached tokens for {source.name} from {entry}")
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(entry / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(entry / "val.bin", dtype=dtype, mode="r")
    record = {**source.record,
              **{k: meta[k] for k in ("sha256", "n_documents", "n_characters") if k in meta},
              "tokenizer": f"byte-level BPE (Hugging Face tokenizers), vocabulary {vocab_size}",
              "tokenizer_path": str(entry / "tokenizer.json"), "vocab_size": vocab_size,
              "token_dtype": dtype.name, "n_train_tokens": int(len(train)), "n_val_tokens": int(len(val)),
              "validation_split": validation_rule(source.piece_chars, max_train_tokens is not None),
              "bpe_training_text": meta.get("bpe_training_text", "all training text"),
              "fingerprint": meta["tokens_sha256"], "cache_key": entry.name,
              "prepare_time_s": round(time.time() - t0, 2)}
    if max_train_tokens is not None:
        record.update(max_train_tokens=max_train_tokens, cache_max_train_tokens=meta.get("max_train_tokens"),
                      stream_exhausted=meta.get("exhausted", True))
    log(f"data: {format_count(len(train))} training and {format_count(len(val))} validation tokens "
        f"({time.time() - t0:.1f}s)")
    return Corpus(train, val, vocab_size, record)


def validation_rule(piece_chars: int, capped: bool) -> str:
    rule = f"every {VAL_EVERY}th piece of <= {piece_chars} characters"
    return rule + (f" until validation holds {CAPPED_VAL_CHARS:,} characters (a capped stream)" if capped else "")


def cache_entry(source: CorpusSource, vocab_size: int, cache_dir: Path, bpe_sample_chars: int,
                capped: bool) -> Path:
    """The cache folder of this corpus, vocabulary and split rule. The cap itself is not in the key:
    every capped preparation of a source shares one folder, whose meta.json says how far it went."""
    split_rule = f"every{VAL_EVERY}-of-{source.piece_chars}chars"
    if capped:                  # a bounded validation set, so a capped cache is not a full one
        split_rule += f"-val-max-{CAPPED_VAL_CHARS}chars"
    key_text = f"{source.identity}|bpe-bytelevel-v1|{vocab_size}|{split_rule}"
    if capped or source.n_chars is None or source.n_chars > bpe_sample_chars:
        key_text += f"|bpe-sample-{bpe_sample_chars}"       # only corpora the sample cap can touch
    return cache_dir / hashlib.sha256(key_text.encode()).hexdigest()[:16]


def read_cache_meta(entry: Path) -> dict | None:
    """meta.json of a finished cache folder (its token fingerprint added once if an old one lacks it)."""
    if not (entry / "meta.json").exists():
        return None
    meta = json.loads((entry / "meta.json").read_text())
    if "tokens_sha256" not in meta:   # a cache written before fingerprints were recorded: add it once
        sha = hashlib.sha256()
        for split_name in ("train", "val"):
            sha.update(_file_sha256(entry / f"{split_name}.bin").encode())
        meta["tokens_sha256"] = sha.hexdigest()
        write_json_atomic(entry / "meta.json", meta)
    return meta


def cache_covers(meta: dict, max_train_tokens: int | None) -> bool:
    """Whether a cache serves a plan that needs `max_train_tokens` training tokens (None: all).

    A cache whose stream was read to the end serves any plan. A capped one serves a plan that needs no
    more training tokens than it holds: a smaller plan then samples from the longer prefix, with the
    same validation text once both caps are past CAPPED_VAL_CHARS (~40M tokens) and the same BPE once
    both are past the BPE sample (bpe_sample_chars / CAPPED_BPE_CHARS_PER_TOKEN, 50M tokens by
    default). A shorter one is never reused: it is rebuilt, tokenizer included, because its BPE was
    trained on the shorter text and extending it would mix two tokenizers' ideas of the corpus."""
    if meta.get("exhausted", True):             # caches from before caps read everything
        return True
    return max_train_tokens is not None and meta["n_train_tokens"] >= max_train_tokens


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
        import datasets          # seconds to import, and only Hub or dataset-folder corpora need it
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
        from huggingface_hub import HfApi      # comes with datasets; only a Hub corpus needs it
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
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
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
                      bpe_sample_chars: int = BPE_SAMPLE_CHARS, num_proc: int | None = None,
                      max_train_tokens: int | None = None) -> dict:
    """Train the tokenizer on (a bounded sample of) the training pieces, encode both splits in bounded
    batches straight to disk (an end-of-text token after every piece), then move the folder into place
    in one rename. Nothing here holds more than a batch of text or tokens.

    With `max_train_tokens` the stream is read only that far: the BPE trains on the first
    min(bpe_sample_chars, cap x CAPPED_BPE_CHARS_PER_TOKEN) training characters, the encoding stops
    within one batch of the cap, and validation is bounded (CAPPED_VAL_CHARS)."""
    set_tokenizer_threads(num_proc)
    t0 = time.time()
    capped = max_train_tokens is not None
    val_max = CAPPED_VAL_CHARS if capped else None
    stride = 1 if source.n_chars is None or capped else max(1, math.ceil(source.n_chars / bpe_sample_chars))
    if capped:
        bpe_sample_chars = min(bpe_sample_chars, max_train_tokens * CAPPED_BPE_CHARS_PER_TOKEN)
    taken = {"chars": 0, "capped": False}
    tok = train_bpe(bpe_sample(iter_pieces(source.documents(), source.piece_chars, val_max), bpe_sample_chars,
                               stride, taken), vocab_size)
    bpe_s = time.time() - t0
    dtype = token_dtype(tok.get_vocab_size())
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    batch_chars = ENCODE_CHARS_PER_THREAD * (num_proc or os.cpu_count() or 1)
    if capped:                 # small batches under a small cap, so the stream stops close to it
        batch_chars = min(batch_chars, max(4096, max_train_tokens * CAPPED_BPE_CHARS_PER_TOKEN // 16))
    try:
        writers = {False: _TokenWriter(tmp / "train.bin", tok, dtype, batch_chars),
                   True: _TokenWriter(tmp / "val.bin", tok, dtype, batch_chars)}
        read = _CountingReader(source)
        exhausted = encode_pieces(iter_pieces(read.documents(), source.piece_chars, val_max), writers,
                                  max_train_tokens)
        for w in writers.values():
            w.close()
    except BaseException:             # a bad row or an interrupt: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tokens_sha = hashlib.sha256(writers[False].sha.hexdigest().encode() + writers[True].sha.hexdigest().encode())
    sample = ("all training text" if not taken["capped"] and stride == 1 else
              f"{taken['chars']:,} characters: " + (f"1 in {stride} training pieces" if stride > 1
                                                     else "the first training pieces"))
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": vocab_size, "sha256": read.sha.hexdigest(),
            "n_documents": read.n_documents, "n_characters": read.n_chars,
            "n_train_tokens": writers[False].n_tokens, "n_val_tokens": writers[True].n_tokens,
            "tokens_sha256": tokens_sha.hexdigest(), "bpe_training_text": sample,
            "bpe_training_chars": taken["chars"], "bpe_time_s": round(bpe_s, 2),
            "encode_time_s": round(time.time() - t0 - bpe_s, 2),
            "max_train_tokens": max_train_tokens, "exhausted": exhausted}
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    install_cache_entry(tmp, entry, max_train_tokens)
    rate = read.n_chars / max(meta["encode_time_s"], 0.01)
    log(f"data: BPE trained on {sample} in {bpe_s:.1f}s; {format_count(read.n_chars)} characters "
        f"encoded in {meta['encode_time_s']:.1f}s ({format_count(rate)} characters/s)"
        + ("" if exhausted else f"; stopped at {format_count(writers[False].n_tokens)} training tokens"))
    return meta


class _CountingReader:
    """The source's documents, counted and hashed as they are read (so a capped read says how far)."""

    def __init__(self, source: CorpusSource):
        self.source, self.sha, self.n_documents, self.n_chars = source, hashlib.sha256(), 0, 0

    def documents(self) -> Iterator[Iterator[str]]:
        for doc in self.source.documents():
            self.n_documents += 1
            yield self._blocks(doc)

    def _blocks(self, doc: Iterable[str]) -> Iterator[str]:
        for block in doc:
            self.sha.update(block.encode("utf-8"))
            self.n_chars += len(block)
            yield block
        self.sha.update(b"\x00")


def encode_pieces(pieces: Iterable[tuple[str, bool]], writers: dict, max_train_tokens: int | None) -> bool:
    """Write every piece to its split's writer; stop once the training writer holds `max_train_tokens`
    (counted at each flush). True when the pieces ran out, False when the cap stopped the stream."""
    for piece, is_val in pieces:
        writers[is_val].add(piece)
        if max_train_tokens is not None and writers[False].n_tokens >= max_train_tokens:
            return False
    return True


def install_cache_entry(tmp: Path, entry: Path, max_train_tokens: int | None) -> None:
    """Move a finished cache folder into place. An entry another process finished meanwhile is kept if
    it serves this cap; a shorter capped one is replaced (moved aside first, then removed)."""
    old = read_cache_meta(entry)
    if old is not None and cache_covers(old, max_train_tokens):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if entry.exists():
        aside = entry.with_name(entry.name + f".old{os.getpid()}")
        os.replace(entry, aside)
        os.replace(tmp, entry)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, entry)


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


# --- what a plan needs of its data: the default corpus, the preparation cap, the Hub's reachability ---

def default_data(mode: str) -> str:
    """--data when none is given: natural text (NATURAL_TEXT) except for tiny, which stays offline."""
    return DEFAULT_DATA.get(mode, NATURAL_TEXT)


def is_hub_stream(data: str) -> bool:
    """'hf:NAME...' naming a Hub dataset, not a local folder or file."""
    return data.startswith("hf:") and not Path(parse_hf_spec(data)[0]).expanduser().exists()


def check_vocab_size(vocab_size: int, data: str) -> None:
    """A byte-level BPE needs its 256 bytes plus the end-of-text token; refused before any text is read."""
    if vocab_size < 257 and not data.endswith(".bin"):
        raise UserError(f"--vocab-size {vocab_size} is too small for a byte-level BPE: use at least 257")


def preparation_cap(cfg: RunConfig, preset: Preset) -> int | None:
    """Training tokens to prepare: --max-tokens, else for a Hub stream the largest run's tokens x
    CAP_MARGIN (the whole plan, whatever --shard/--only select, so every part shares one cache),
    else None (a local corpus is prepared whole)."""
    if cfg.max_tokens is not None:
        return cfg.max_tokens
    if not is_hub_stream(cfg.data):
        return None
    return round(max(e.tokens for e in build_plan(cfg, preset)) * CAP_MARGIN)


def prepare_corpus(cfg: RunConfig, preset: Preset) -> Corpus:
    """load_corpus with the run's settings, prepared as far as preparation_cap says."""
    cap = preparation_cap(cfg, preset)
    if cap is not None and cfg.max_tokens is None:
        log(f"data: {cfg.data} is streamed only as far as this plan needs: {format_count(cap)} training "
            f"tokens (the largest run's x {CAP_MARGIN}; --max-tokens sets another cap)")
    return load_corpus(cfg.data, cfg.vocab_size, Path(cfg.cache_dir), text_column=cfg.text_column,
                       split=cfg.split, num_proc=cfg.num_proc,
                       bpe_sample_chars=cfg.bpe_sample_chars or BPE_SAMPLE_CHARS, max_train_tokens=cap)


def hub_unreachable_reason(host: str = HUB_HOST, timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached (offline variables set, no name resolution, no connection), or
    None. Bounded by `timeout_s` even when name resolution hangs (it runs in a daemon thread)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var} is set"
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            outcome["ok"] = True
        except OSError as e:
            outcome["error"] = f"{type(e).__name__}: {e}"

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s + 0.5)
    if outcome.get("ok"):
        return None
    return f"no connection to {host} ({outcome.get('error', f'no answer in {timeout_s:.0f}s')})"


def builtin_chars_per_token(vocab_size: int) -> float:
    measured = [v for v in BUILTIN_CHARS_PER_TOKEN if v <= vocab_size] or [min(BUILTIN_CHARS_PER_TOKEN)]
    return BUILTIN_CHARS_PER_TOKEN[max(measured)]


def builtin_epochs(plan_tokens: int, vocab_size: int) -> float:
    """Epochs of the built-in corpus's training split that `plan_tokens` would read, estimated from its
    size in characters (builtin_chars_per_token; 95% of it is training text)."""
    n_chars = sum(p.stat().st_size for p in builtin_corpus_files()[1])
    return plan_tokens / (n_chars * (1 - 1 / VAL_EVERY) / builtin_chars_per_token(vocab_size))


def check_hub_reachable(cfg: RunConfig, preset: Preset) -> None:
    """Refuse a Hub stream the Hub cannot serve, in one line naming the two ways on (before any work)."""
    if not is_hub_stream(cfg.data):
        return
    _import_datasets()                             # without the library the Hub does not matter
    reason = hub_unreachable_reason()
    if reason is None:
        return
    largest = max(e.tokens for e in build_plan(cfg, preset))
    epochs = builtin_epochs(largest, cfg.vocab_size)
    epochs_text = f"{epochs:.0f}" if epochs >= 10 else f"{epochs:.1f}"
    default = f" (the default of --mode {cfg.mode})" if cfg.data == default_data(cfg.mode) else ""
    raise UserError(f"--data {cfg.data}{default} streams from the Hugging Face Hub, which cannot be reached: "
                    f"{reason}. Offline, use --data builtin (the Python standard library: this plan's "
                    f"largest run, {format_count(largest)} tokens, would read about {epochs_text} "
                    f"epochs of it) or a local corpus (--data path/to/text, or a "
                    f"local dataset folder)")


def check_data_budget(plan: list, n_train_tokens: int, no_repeat: bool = False) -> dict:
    """How many epochs of the training split each run of the plan reads (tokens trained / training
    tokens). With `no_repeat`, a plan in which any run needs more tokens than the split holds is refused
    with the number missing. Runs sample windows at random offsets, so even under one epoch a window can
    recur; this check guarantees only that the corpus is large enough for one pass."""
    runs = [{"name": e.name, "tokens": int(e.tokens),
             "epochs": round(e.tokens / n_train_tokens, 4),
             "tokens_missing": max(0, int(e.tokens) - int(n_train_tokens))} for e in plan]
    short = [r for r in runs if r["tokens_missing"] > 0]
    if no_repeat and short:
        worst = max(short, key=lambda r: r["tokens_missing"])
        raise UserError(f"--no-repeat: {worst['name']} trains on {worst['tokens']:,} tokens but the corpus "
                        f"has {n_train_tokens:,} training tokens, {worst['tokens_missing']:,} missing "
                        f"({len(short)} of {len(runs)} runs would repeat data); use a larger corpus or "
                        f"smaller --data-sizes/--max-steps")
    budget = {"n_train_tokens": int(n_train_tokens), "no_repeat": no_repeat, "repeats": bool(short),
              "max_epochs": max((r["epochs"] for r in runs), default=0.0), "runs": runs,
              "epochs_over_4": [r["name"] for r in runs if r["epochs"] > REPEAT_HARMLESS_EPOCHS]}
    budget["repetition_warning"] = repetition_note(budget)
    return budget


def repetition_note(budget: dict) -> str | None:
    """What a data law means past REPEAT_HARMLESS_EPOCHS epochs, for the log, results.json and the
    figure's data panel; None when no run reads that much."""
    over = budget.get("epochs_over_4") or []
    if not over:
        return None
    return (f"{', '.join(over)} read{'s' if len(over) == 1 else ''} more than {REPEAT_HARMLESS_EPOCHS} epochs "
            f"of the training text: beyond that point the data law is a repetition curve, not the law of "
            f"fresh data (repeating is nearly harmless only up to ~{REPEAT_HARMLESS_EPOCHS} epochs, "
            f"Muennighoff et al. 2023)")


def data_budget_lines(budget: dict) -> list[str]:
    """The one log line that says which runs repeat data, and by how much."""
    n = budget["n_train_tokens"]
    repeating = [r for r in budget["runs"] if r["tokens_missing"] > 0]
    if len(repeating) == 1:
        r = repeating[0]
        return [f"warning: {r['name']} trains on {format_count(r['tokens'])} tokens, {r['epochs']:.2f} epochs of "
                f"this corpus's {format_count(n)} training tokens: data repeats "
                f"({format_count(r['tokens_missing'])} more tokens would avoid it; --no-repeat refuses such a plan)"
                ] + repetition_lines(budget)
    if repeating:
        most = max(r["tokens_missing"] for r in repeating)
        return [f"warning: {len(repeating)} runs repeat this corpus's {format_count(n)} training tokens ("
                + ", ".join(f"{r['name']} {r['epochs']:.2f} epochs" for r in repeating)
                + f"); {format_count(most)} more tokens would avoid it; --no-repeat refuses such a plan"
                ] + repetition_lines(budget)
    return [f"data: the largest run reads {budget['max_epochs']:.2f} epochs of the "
            f"{format_count(n)} training tokens; no run repeats data"]


def repetition_lines(budget: dict) -> list[str]:
    note = budget.get("repetition_warning")
    return [f"warning: {note}"] if note else []


def batch_offsets(n_tokens: int, context_length: int, batch_size: int, *key: int) -> np.ndarray:
    """Random window starts, a pure function of the key (seed, run, step, micro-step): any step's batch
    can be recomputed, so a run needs no data-loader state to resume."""
    rng = np.random.default_rng(list(key))
    return rng.integers(0, n_tokens - context_length - 1, size=batch_size)


def get_batch(tokens: np.ndarray, offsets: np.ndarray, context_length: int, device: str = "cpu"):
    """Inputs and next-token targets, each (B, T) int64 on `device`, sliced from the memory map: views of
    one (B, T+1) block of windows, copied to the device once."""
    idx = offsets[:, None] + np.arange(context_length + 1)
    chunk = to_device(torch.from_numpy(tokens[idx].astype(np.int64)), device)      # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]


def to_device(t, device: str):
    """A host tensor on `device`. Asynchronous only on CUDA, from the contiguous tensor pinned once (pinning
    a strided view copies it through pageable memory again); a synchronous copy elsewhere: on MPS a
    non_blocking copy of pageable memory has returned wrong data."""
    if device == "cuda":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)

# ----------------------------------------------------------------------------------------------------
# 4. model: the decoder (gpt2: pre-LayerNorm, learned positions, GELU MLP; llama: RMSNorm, rotary
#    positions, SwiGLU MLP, no biases), SDPA causal attention and tied embeddings in both, FLOPs per token
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTConfig:
    """The shape of one model of the ladder, and its recipe (ARCHS)."""
    vocab_size: int
    context_length: int
    n_layer: int
    d_model: int
    n_head: int
    arch: str = "gpt2"


class RMSNorm(_Module):
    """x / rms(x) times a learned gain, no mean subtraction and no bias (Zhang & Sennrich 2019)."""
    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(context_length: int, head_dim: int, base: float = 10000.0):
    """cos and sin of every (position, frequency) pair, each (T, head_dim / 2) (Su et al. 2021)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate each (first half, second half) pair of x's head dimensions by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)                                                  # each (B, H, T, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(_Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        bias = config.arch == "gpt2"
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=bias)

    def forward(self, x, rotary=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)                                   # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotary is not None:                                                   # llama: positions live here
            cos, sin = rotary[0][:T], rotary[1][:T]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # (B, n_head, T, head_dim)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(_Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class SwiGLU(_Module):
    """llama's MLP: proj(silu(gate) * up), with gate and up from one d_model x 2h matrix (swiglu_hidden)."""
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden(config.d_model)
        self.fc = nn.Linear(config.d_model, 2 * hidden, bias=False)
        self.proj = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)                                   # each (B, T, h)
        return self.proj(F.silu(gate) * up)


class Block(_Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        norm = RMSNorm if config.arch == "llama" else nn.LayerNorm
        self.ln1 = norm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = norm(config.d_model)
        self.mlp = SwiGLU(config) if config.arch == "llama" else MLP(config)

    def forward(self, x, rotary=None):
        x = x + self.attn(self.ln1(x), rotary)
        return x + self.mlp(self.ln2(x))


def init_std(d_model: int) -> float:
    """Initial standard deviation of the attention's qkv and the MLP's first layer: sqrt(2 / (5 d_model)),
    the "small init" of Nguyen & Salazar 2019 that GPT-NeoX and Pythia use. It is GPT-2's 0.02 at d_model
    1,000 and grows as 1/sqrt(d_model) below it: GPT-2's fixed 0.02 left tiny's narrow models on a plateau
    near the unigram loss for a random number of steps (the measurements are in docs/schedules.md)."""
    return math.sqrt(2.0 / (5.0 * d_model))


class GPT(_Module):
    """Token embeddings (gpt2: and learned positions; llama: rotary positions in attention), n_layer
    blocks, a final norm and an output layer tied to the token embedding. forward(idx) gives logits;
    forward(idx, targets) the mean cross-entropy."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.arch not in ARCHS:
            raise UserError(f"unknown --arch '{config.arch}': choose one of {', '.join(ARCHS)}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        llama = config.arch == "llama"
        self.pos_emb = None if llama else nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.d_model) if llama else nn.LayerNorm(config.d_model)
        if llama:            # buffers, not weights: they move with .to() and stay out of checkpoints
            cos, sin = rotary_tables(config.context_length, config.d_model // config.n_head)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        std = init_std(config.d_model)
        # the layers that write into the residual stream start at zero, so each block starts as the
        # identity; the embeddings at GPT-2's 0.02, so the tied output layer starts near uniform
        residual_out = {id(b.attn.proj.weight) for b in self.blocks} | {id(b.mlp.proj.weight) for b in self.blocks}
        embeddings = {id(m.weight) for m in (self.tok_emb, self.pos_emb) if m is not None}
        for name, p in self.named_parameters():      # in registration order: the random draws depend on it
            if id(p) in residual_out:
                nn.init.zeros_(p)
            elif id(p) in embeddings:
                nn.init.normal_(p, 0.0, 0.02)
            elif p.dim() == 2:                  # the attention's qkv and the MLP's first layer
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if self.pos_emb is None:
            x, rotary = self.tok_emb(idx), (self.rotary_cos, self.rotary_sin)    # (B, T, C)
        else:
            x, rotary = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)), None
        for block in self.blocks:
            x = block(x, rotary)
        logits = self.ln_f(x) @ self.tok_emb.weight.T                    # tied output layer, (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def count_params(self) -> tuple[int, int]:
        """(non-embedding, total): Kaplan's N leaves out the token and position embeddings."""
        total = sum(p.numel() for p in self.parameters())
        emb = self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return total - emb, total

    def configure_optimizer(self, lr: float, weight_decay: float, fused: bool):
        """AdamW, betas (0.9, 0.95): every matrix is weight-decayed, biases and LayerNorm gains are not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), **({"fused": True} if fused else {}))


def flops_per_token(n_layer: int, d_model: int, vocab_size: int, context_length: int, arch: str = "gpt2") -> float:
    """Training FLOPs per token: 6 x every matmul weight (blocks 12 d^2 per layer, llama's 4 d^2 + 3 d h,
    plus the tied output layer V d) plus attention's 12 n_layer d_model context (PaLM's accounting)."""
    block = 4 * d_model * d_model + 3 * d_model * swiglu_hidden(d_model) if arch == "llama" else 12 * d_model * d_model
    n_matmul = n_layer * block + vocab_size * d_model
    return 6.0 * n_matmul + 12.0 * n_layer * d_model * context_length

# ----------------------------------------------------------------------------------------------------
# 5. training: the device, the LR schedule, a run's state, and the Trainer's straight step loop
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup, then either a cosine decay over the rest of the run or WSD (warmup-stable-decay:
    the peak held constant, then a cooldown over the last cooldown_frac of the run). Both end at
    min_lr_frac * peak exactly on the run's last step (step = total_steps - 1)."""
    kind: str = "cosine"                     # "cosine" or "wsd"
    warmup_frac: float = 0.1                 # of each run's steps, unless warmup_steps is given
    warmup_steps: int | None = None          # fixed across a sweep (build_plan's rule)
    min_lr_frac: float = 0.1
    cooldown_frac: float = 0.2
    cooldown_shape: str = "1-sqrt"           # Hagele et al. 2024's best; or "linear"

    def warmup(self, total_steps: int) -> int:
        w = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_frac * total_steps)
        return max(1, min(w, total_steps))

    def cooldown_start(self, total_steps: int) -> int:
        """First step of WSD's cooldown for a run (or a branch) of total_steps."""
        return total_steps - max(1, round(self.cooldown_frac * total_steps))

    def lr(self, step: int, total_steps: int, peak_lr: float) -> float:
        warmup = self.warmup(total_steps)
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        if self.kind == "wsd":
            low = self.min_lr_frac * peak_lr
            start = max(warmup, self.cooldown_start(total_steps))
            if step < start:
                return peak_lr
            progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
            fall = math.sqrt(progress) if self.cooldown_shape == "1-sqrt" else progress
            return low + (peak_lr - low) * (1.0 - fall)
        progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
        return peak_lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: LRSchedule = LRSchedule()) -> float:
    return schedule.lr(step, total_steps, peak_lr)


def schedule_of(cfg: RunConfig, warmup_steps: int | None) -> LRSchedule:
    """The run's schedule: the plan's kind, cooldown and floor, with this run's warmup."""
    return LRSchedule(cfg.schedule, cfg.warmup_frac, warmup_steps, cfg.min_lr_frac, cfg.cooldown_frac,
                      cfg.cooldown_shape)


@dataclass
class DeviceInfo:
    name: str                       # "cuda", "mps" or "cpu"
    description: str
    dtype: str                      # "bf16" (autocast) or "fp32"


# set by --parallel K in its child processes: K runs share this machine's cores and its GPU's memory
PARALLEL_ENV = "SCALING_LAB_PARALLEL_SHARE"


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads_per_process() -> int:
    """This process's even share of the cores it may run on, among the processes of the same run on this
    machine: torchrun's ranks on this node (LOCAL_WORLD_SIZE) or --parallel's children."""
    cores = cpu_cores()
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * int(os.environ.get(PARALLEL_ENV, "1"))
    return max(1, cores // max(1, sharing))


def setup_device(requested: str, dtype: str = "auto") -> DeviceInfo:
    """Resolve --device and --dtype. auto: CUDA, then MPS, then CPU; bf16 autocast on a GPU with native
    bf16 (compute capability 8.0 or newer), fp32 elsewhere (bf16 on a CPU only when asked for, and only
    where the CPU has native bf16 instructions)."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device auto or cpu")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if dtype in ("bf16", "auto"):
            if not cuda_native_bf16(torch.cuda.get_device_capability()):
                if dtype == "bf16":
                    raise UserError("--dtype bf16: this GPU has no native bf16 (compute capability below 8.0); "
                                    "use --dtype fp32")
                dtype = "fp32"
            else:
                dtype = "bf16"
        return DeviceInfo("cuda", torch.cuda.get_device_name(0), dtype)
    if requested == "mps":
        if not has_mps:
            raise UserError("--device mps: Apple's MPS backend is not available; use --device auto or cpu")
        if dtype == "bf16" and not _mps_supports_bf16():
            raise UserError("--dtype bf16: this MPS device/macOS has no bf16 support; use --dtype fp32")
        return DeviceInfo("mps", "Apple MPS", "bf16" if dtype == "bf16" else "fp32")
    threads = cpu_threads_per_process()
    torch.set_num_threads(threads)
    if dtype == "bf16" and not _cpu_supports_bf16():
        raise UserError("--dtype bf16: this CPU has no native bf16 instructions (avx512_bf16/amx); use fp32")
    return DeviceInfo("cpu", f"{platform.processor() or platform.machine()} ({threads} threads)",
                      "bf16" if dtype == "bf16" else "fp32")


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with compute capability 8.0 (A100). torch.cuda.is_bf16_supported() also
    counts emulation, which on a V100 or T4 is slower than fp32."""
    return tuple(capability) >= (8, 0)


def _cpu_supports_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _mps_supports_bf16() -> bool:
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16)
        return True
    except (RuntimeError, TypeError):
        return False


def sync_device(device: str) -> None:
    """Wait for the device's queued work, so a timer around it measures the work."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS a RuntimeError saying 'MPS backend out of memory'."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def new_curve() -> dict:
    return {"step": [], "tokens": [], "train_loss": [], "val_loss": [], "lr": [], "eval_step": [],
            "eval_tokens": []}


class StopRequest:
    """Set by the CLI's SIGINT/SIGTERM handler; the step loop checkpoints and stops at the next step."""

    def __init__(self):
        self.signum: int | None = None


class TrainingInterrupted(Exception):
    """A stop was requested: the run's checkpoint is on disk and `record` holds its curve so far."""

    def __init__(self, signum: int, record: dict | None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.record = signum, record


@dataclass
class TrainState:
    """Everything of one run that changes while it trains. `checkpoint_fields` is what a checkpoint
    saves of it, `record` what results.json reports; the model and optimizer travel beside it."""
    step: int = 0                          # optimizer steps done
    curve: dict = field(default_factory=new_curve)
    initial_loss: float | None = None
    window: list = field(default_factory=list)     # step losses since the last log line, device tensors
    last_good_loss: float | None = None
    wall_before_s: float = 0.0             # wall time of earlier processes that trained this run
    resumed_at_steps: list = field(default_factory=list)
    micro_split: int = 1                   # every micro-batch cut into this many pieces after an OOM
    oom_events: list = field(default_factory=list)
    lr: float | None = None
    diverged: tuple | None = None          # (1-based step, last finite loss) once a loss is not finite
    t_start: float = 0.0                   # this process's clocks: speed and checkpoints
    t_log: float = 0.0
    step_log: int = 0                      # steps done at the last log line (the window starts after it)
    step_timed: int = 0                    # steps done at t_log: speed counts only steps trained since
    t_ckpt: float = 0.0
    step_ckpt: int = 0
    compile_s: float = 0.0                 # this process's compile check, outside every clock above

    def __post_init__(self):
        self.restart_clocks()

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (a branch's cooldown) out of this run's wall time, speed and checkpoint clock."""
        self.t_start += seconds
        self.t_log += seconds
        self.t_ckpt += seconds

    def branch(self) -> "TrainState":
        """A cooldown branch's state at the branch point: the stable run's curve and losses so far."""
        return TrainState(step=self.step, curve=copy.deepcopy(self.curve), initial_loss=self.initial_loss,
                          window=list(self.window), last_good_loss=self.last_good_loss,
                          micro_split=self.micro_split, oom_events=list(self.oom_events), lr=self.lr)

    def restart_clocks(self) -> None:
        """Speed and the checkpoint interval count from here (after the untrained model's evaluation)."""
        self.t_start = self.t_log = self.t_ckpt = time.time()
        self.step_log, self.step_ckpt = self.step - len(self.window), self.step
        self.step_timed = self.step       # a branch's or a resumed run's window was trained before now

    @property
    def wall_time_s(self) -> float:
        return self.wall_before_s + time.time() - self.t_start

    def checkpoint_fields(self) -> dict:
        return {"step": self.step, "lr": self.lr, "curve": self.curve, "initial_loss": self.initial_loss,
                "window": [float(w) for w in self.window], "last_good_loss": self.last_good_loss,
                "wall_time_s": self.wall_time_s, "resumed_at_steps": self.resumed_at_steps,
                "micro_split": self.micro_split, "oom_events": self.oom_events}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: str, micro_split: int, oom_events: list) -> "TrainState":
        """The state a checkpoint saved; an out-of-memory retry in this process keeps its smaller
        micro-batches and its events."""
        return cls(step=ckpt["step"], curve=ckpt["curve"], initial_loss=ckpt["initial_loss"],
                   window=[torch.tensor(v, device=device) for v in ckpt["window"]],
                   last_good_loss=ckpt["last_good_loss"], wall_before_s=ckpt["wall_time_s"],
                   resumed_at_steps=[*ckpt["resumed_at_steps"], ckpt["step"]], lr=ckpt.get("lr"),
                   micro_split=max(micro_split, ckpt["micro_split"]),
                   oom_events=[*ckpt["oom_events"], *(e for e in oom_events if e not in ckpt["oom_events"])])

    def first_nonfinite(self) -> int | None:
        """Index in the window of the first non-finite step loss (one host sync)."""
        if not self.window:
            return None
        ok = torch.isfinite(torch.stack(self.window)).cpu()
        return None if bool(ok.all()) else int((~ok).nonzero()[0, 0])

    def record(self, exp: RunSpec, trainer: "Trainer", status: str, steps_done: int) -> dict:
        """This run's record (its file under runs/; results.json's points table holds its row)."""
        cfg, vocab = trainer.cfg, trainer.corpus.vocab_size
        wall_s = self.wall_time_s if status != "out_of_memory" else 0.0
        trained = max(0, steps_done - exp.branch_step) * cfg.tokens_per_step     # a branch: its cooldown
        tok_s = trained / max(wall_s, 1e-9)                 # the whole run: evaluations, checkpoints too
        return run_record(exp, trainer.corpus.record, **{
            "tokens_processed": trained, "epochs": round(exp.tokens / len(trainer.corpus.train), 4),
            "initial_loss": self.initial_loss,
            "final_val_loss": self.curve["val_loss"][-1] if status == "completed" else None,
            "status": status, "steps_done": steps_done,
            "diverged_at_step": self.diverged[0] if self.diverged else None,
            "last_good_loss": self.diverged[1] if self.diverged else None,
            "wall_time_s": round(wall_s, 2), "tokens_per_s": round(tok_s, 1),
            "flops_per_token": flops_per_token(exp.n_layer, exp.d_model, vocab, cfg.context_length, cfg.arch),
            "mfu": round(trainer.mfu(exp, tok_s), 5),
            "peak_flops": trainer.peak_flops[0], "peak_flops_source": trainer.peak_flops[1],
            "peak_memory_mb": round(peak_memory_bytes(trainer.device.name) / 2**20, 1),
            "dtype": trainer.device.dtype, "compiled": trainer.compile, "device": trainer.device.name,
            "compile_s": round(self.compile_s, 2),
            "micro_batch_size": math.ceil(cfg.batch_size / self.micro_split),
            "micro_steps_per_step": cfg.grad_accum * self.micro_split,
            "oom_retries": list(self.oom_events), "resumed_at_steps": list(self.resumed_at_steps),
            "curve": self.curve})


@dataclass
class RunModel:
    """One run's model, the module the step loop calls (compiled and/or DDP-wrapped), its optimizer."""
    model: object
    step_model: object
    opt: object
    compile_s: float = 0.0          # the compile check's seconds, apart from training's (0: eager)


class Trainer:
    """Trains the runs of a plan on one device: holds the settings, the corpus, the device, the
    checkpoint policy and the stop request; each run's changing state lives in a TrainState."""

    def __init__(self, cfg: RunConfig, corpus: Corpus, device: DeviceInfo, progress_bar: bool = False,
                 checkpoints: CheckpointPolicy | None = None, stop: StopRequest | None = None,
                 dist: Distributed | None = None):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        self.dist = dist or Distributed()
        self.progress_bar = progress_bar
        self.checkpoints = checkpoints or CheckpointPolicy()
        self.stop = stop or StopRequest()
        self.val_offsets = batch_offsets(len(corpus.val), cfg.context_length,
                                         cfg.batch_size * cfg.eval_batches, 20240, 0)
        self.compile = cfg.compile if cfg.compile is not None else device.name == "cuda"
        self._peak: tuple[float, str] | None = None
        self._compiled_shape: tuple[int, int] | None = None    # (n_layer, d_model) whose code Dynamo holds
        # called with (branch, record) as each WSD cooldown branch finishes; the CLI saves the record
        self.tracker: Tracker = NullTracker()      # the CLI's --tracker; each point as it is logged

    @property
    def peak_flops(self) -> tuple[float, str]:
        """(FLOP/s, source) of the MFU denominator, looked up or measured once per Trainer."""
        if self._peak is None:
            self._peak = device_peak_flops(self.device, self.cfg.peak_tflops)
        return self._peak

    def mfu(self, exp: RunSpec, tokens_per_s: float) -> float:
        """tokens_per_s counts the global batch, which every torchrun rank's device shares."""
        fpt = flops_per_token(exp.n_layer, exp.d_model, self.corpus.vocab_size, self.cfg.context_length,
                              self.cfg.arch)
        return tokens_per_s * fpt / (self.peak_flops[0] * self.dist.world_size)

    def autocast(self):
        if self.device.dtype == "bf16":
            return torch.autocast(device_type=self.device.name, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def new_model(self, exp: RunSpec, seed: int, micro_split: int = 1) -> RunModel:
        """The run's model initialised from `seed`; compiled on CUDA by default (evaluation uses the eager
        one); under torchrun wrapped in DistributedDataParallel (compile inside DDP, as PyTorch advises,
        so DDP's gradient hooks stay eager)."""
        torch.manual_seed(seed)
        model = GPT(GPTConfig(self.corpus.vocab_size, self.cfg.context_length, exp.n_layer, exp.d_model,
                              exp.n_head, self.cfg.arch)).to(self.device.name)
        opt = model.configure_optimizer(exp.peak_lr, self.cfg.weight_decay, fused=self.device.name == "cuda")
        step_model, compile_s = model, 0.0
        if self.compile:
            rows = math.ceil(self.cfg.batch_size // self.dist.world_size / micro_split)
            step_model, compile_s = self.compiled(model, (exp.n_layer, exp.d_model), rows)
        if self.dist.enabled:
            step_model = DistributedDataParallel(
                step_model, device_ids=[self.dist.local_rank] if self.device.name == "cuda" else None)
        return RunModel(model, step_model, opt, compile_s)

    def compiled(self, model, shape: tuple[int, int], rows: int) -> tuple[object, float]:
        """(torch.compile(model), seconds) after one forward and backward pass on a batch of zeros, where
        the compile happens, timed apart from training; the gradients are dropped. If it fails: (model,
        0.0), one line says so, and this Trainer's later models run eager too. `shape`: (n_layer, d_model)."""
        if shape != self._compiled_shape:    # one shape's code at a time: a full ladder's would pass
            torch.compiler.reset()           # Dynamo's recompile limit and then run eager, unannounced
        t0 = time.perf_counter()
        try:
            step_model = torch.compile(model)
            # get_batch's layout (views of one (B, T+1) block), so the first step does not recompile
            chunk = torch.zeros((rows, self.cfg.context_length + 1), dtype=torch.long, device=self.device.name)
            with self.autocast():
                loss = step_model(chunk[:, :-1], chunk[:, 1:])
            loss.backward()
            sync_device(self.device.name)
        except Exception as e:
            if is_out_of_memory(e):
                raise
            self.compile = False
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            log(f"compile: torch.compile failed ({type(e).__name__}: {first}); training eager instead")
            return model, 0.0
        finally:
            model.zero_grad(set_to_none=True)
        self._compiled_shape = shape
        return step_model, time.perf_counter() - t0

    def evaluate(self, model, micro_split: int = 1) -> float:
        """Mean loss over the fixed validation batches (the same windows for every experiment)."""
        cfg = self.cfg
        model.eval()
        losses = []
        rows = rank_slice(cfg.batch_size, self.dist.rank, self.dist.world_size)   # all rows for one process
        with torch.no_grad(), self.autocast():
            for i in range(cfg.eval_batches):
                offs = self.val_offsets[i * cfg.batch_size:(i + 1) * cfg.batch_size][rows]
                for piece in np.array_split(offs, micro_split):
                    x, y = get_batch(self.corpus.val, piece, cfg.context_length, self.device.name)
                    loss = model(x, y).float()
                    losses.append(loss * (len(piece) / len(offs)))
        model.train()
        # equal shares per rank, so the mean over ranks is the mean over the whole validation set
        return float(self.dist.mean_(torch.stack(losses).sum() / cfg.eval_batches))

    def train_step(self, rm: RunModel, exp: RunSpec, step: int, micro_split: int = 1):
        """One optimizer step over grad_accum micro-batches; returns the mean train loss as a device tensor
        (so the step loop need not wait for the device) and the learning rate."""
        cfg = self.cfg
        lr = schedule_of(cfg, exp.warmup_steps).lr(step, exp.steps, exp.peak_lr)
        for g in rm.opt.param_groups:
            g["lr"] = lr
        ddp = isinstance(rm.step_model, DistributedDataParallel)
        # under torchrun every rank draws the same windows and keeps its own share of them
        rows = rank_slice(cfg.batch_size, self.dist.rank, self.dist.world_size)
        total = torch.zeros((), device=self.device.name)
        for micro in range(cfg.grad_accum):
            offs = batch_offsets(len(self.corpus.train), cfg.context_length, cfg.batch_size,
                                 exp.seed, data_stream_seed(exp), step, micro)[rows]
            pieces = np.array_split(offs, micro_split)
            for k, piece in enumerate(pieces):
                x, y = get_batch(self.corpus.train, piece, cfg.context_length, self.device.name)
                # DDP averages gradients over the ranks once per step, in the last backward pass
                last = micro == cfg.grad_accum - 1 and k == len(pieces) - 1
                with rm.step_model.no_sync() if ddp and not last else contextlib.nullcontext():
                    with self.autocast():
                        # a piece's mean loss weighted by its share of the micro-batch
                        loss = rm.step_model(x, y) * (len(piece) / len(offs)) / cfg.grad_accum
                    loss.backward()
                total += loss.detach()
        if ddp:             # the step's loss over the whole batch, the same number on every rank
            self.dist.mean_(total)
        torch.nn.utils.clip_grad_norm_(rm.model.parameters(), cfg.grad_clip)
        rm.opt.step()
        rm.opt.zero_grad(set_to_none=True)
        return total, lr

    # --- one run: start or resume, the step loop, and what each step may also do --------------------

    def train(self, exp: RunSpec, branches: list[RunSpec] = (),
              on_branch_done: Callable[[RunSpec, dict], None] = lambda branch, record: None) -> dict:
        """Train `exp` and return its record; each branch's record goes to `on_branch_done` as it
        finishes. On a CUDA or MPS out-of-memory error retry with half the micro-batch and twice the
        micro-steps (the same sequences per optimizer step), from its latest checkpoint if it has one.
        Gives up with status "out_of_memory" once a micro-batch would be less than one sequence."""
        micro_split, oom_events, finished = 1, [], set()

        def branch_done(branch, record):      # a retry after an out-of-memory error skips finished branches
            finished.add(branch.run_id)
            on_branch_done(branch, record)
        while True:
            try:
                return self.train_once(exp, micro_split, oom_events,
                                       [b for b in branches if b.run_id not in finished], branch_done)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                if self.dist.enabled:     # a retry on one rank only would desynchronise the others
                    raise UserError(
                        f"{exp.run_id}: out of memory on rank {self.dist.rank} ({message}); under torchrun "
                        f"there are no automatic retries: pass --batch-size {max(1, self.cfg.batch_size // 2)} "
                        f"--grad-accum {self.cfg.grad_accum * 2} (the same tokens per step) or start more "
                        f"processes") from None
            # outside the except block, so the traceback's frames (and their tensors) can be freed
            self.free_device_memory()
            before = math.ceil(self.cfg.batch_size / micro_split)
            if micro_split * 2 > self.cfg.batch_size:
                log(f"[{exp.run_id}] out of memory even with micro-batches of {before} sequence(s): giving up "
                    f"on this run ({message}); the others continue")
                oom_events.append({"micro_batch_size": before, "error": message, "gave_up": True})
                state = TrainState(micro_split=micro_split, oom_events=oom_events)
                return state.record(exp, self, "out_of_memory", 0)
            micro_split *= 2
            after = math.ceil(self.cfg.batch_size / micro_split)
            oom_events.append({"micro_batch_size": before, "retry_micro_batch_size": after,
                               "micro_steps_per_step": self.cfg.grad_accum * micro_split, "error": message})
            log(f"[{exp.run_id}] out of memory with micro-batches of {before} sequences ({message}); retrying "
                f"with {after} and {self.cfg.grad_accum * micro_split} micro-steps per step (same effective batch)")

    def free_device_memory(self) -> None:
        gc.collect()
        if self.device.name == "cuda":
            torch.cuda.empty_cache()
        elif self.device.name == "mps":
            torch.mps.empty_cache()

    def train_once(self, exp: RunSpec, micro_split: int = 1, oom_events: list | None = None,
                   branches: list[RunSpec] = (), on_branch_done=lambda branch, record: None) -> dict:
        """Train one experiment, continuing from its checkpoint if it has one, and return its
        results.json record (status completed or diverged). On a stop request it checkpoints and raises
        TrainingInterrupted."""
        reset_peak_memory(self.device.name)
        _ = self.peak_flops              # look up or measure it now, not inside a timed interval
        rm = self.new_model(exp, init_seed(exp), micro_split)
        assert rm.model.count_params()[0] == exp.n_params_nonembedding
        if rm.compile_s:
            log(f"[{exp.run_id}] compiled in {rm.compile_s:.1f}s (compile_s; not counted in tok/s or MFU)")
        state = self.start_or_resume(exp, rm, micro_split, oom_events or [])
        state.compile_s = rm.compile_s
        return self.run_steps(exp, rm, state, branches, on_branch_done)

    def run_steps(self, exp: RunSpec, rm: RunModel, state: TrainState, branches: list[RunSpec] = (),
                  on_branch_done=lambda branch, record: None) -> dict:
        """The step loop, from state.step to the end of `exp`; at each branch point a cooldown branch
        trains first (train_branch), then the stable run goes on from where it was."""
        branch_at = {b.branch_step: b for b in branches}
        for b in branches:
            if b.branch_step < state.step:      # its record was lost after the stable run moved on
                log(f"[{b.run_id}] not trained: its branch point, step {b.branch_step}, is behind the checkpoint "
                    f"of {exp.run_id}; pass --fresh to train the whole ladder again")
        self.tracker.start_run(exp, state)
        bar = (tqdm(total=exp.steps, initial=state.step, desc=exp.run_id, leave=False, file=sys.stderr)
               if self.progress_bar else None)
        say = bar.write if bar else log
        for step in range(state.step, exp.steps):
            if step in branch_at:
                on_branch_done(*self.train_branch(exp, rm, state, branch_at.pop(step)))
            if self.stop.signum is not None:
                self.save_checkpoint(exp, rm, state)
                raise TrainingInterrupted(self.stop.signum, state.record(exp, self, "interrupted", state.step))
            loss, state.lr = self.train_step(rm, exp, step, state.micro_split)
            state.window.append(loss)
            state.step = step + 1
            last = state.step == exp.steps
            log_now = state.step % self.cfg.log_interval == 0 or last
            ckpt_now = not last and self.checkpoint_due(state)
            if (log_now or ckpt_now) and not self.losses_finite(state, log_now):
                if state.diverged:
                    break
                ckpt_now = False
            if log_now:
                self.log_step(exp, state, say)
            if state.step % self.cfg.eval_interval == 0 or last:
                if not self.evaluate_into(exp, rm, state, say):
                    break
            if ckpt_now:
                self.save_checkpoint(exp, rm, state)
                say(f"[{exp.run_id}] checkpoint at step {state.step}/{exp.steps}")
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        record = self.finish_run(exp, rm, state)
        self.tracker.end_run(exp, record)
        return record

    def train_branch(self, exp: RunSpec, rm: RunModel, state: TrainState, branch: RunSpec) -> tuple[RunSpec, dict]:
        """Train `branch`'s cooldown from the stable run's state, then put that state back: a branch costs
        only its cooldown. The stable run is checkpointed first, so after a kill inside the branch the same
        command resumes the branch from its own checkpoint and then carries on from here."""
        t0 = time.time()
        self.save_checkpoint(exp, rm, state)
        stable = copy.deepcopy((rm.model.state_dict(), rm.opt.state_dict()))
        branch_state = self.restore(branch, rm, state.micro_split, state.oom_events)
        if branch_state is None:
            branch_state = state.branch()
            log(f"[{branch.run_id}] cooldown branch of {exp.run_id} at step {state.step}: {branch.trained_steps} "
                f"steps to {format_count(branch.tokens)} tokens")
        record = self.run_steps(branch, rm, branch_state)
        rm.model.load_state_dict(stable[0])
        rm.opt.load_state_dict(stable[1])
        state.pause(time.time() - t0)
        return branch, record

    def restore(self, exp: RunSpec, rm: RunModel, micro_split: int, oom_events: list) -> TrainState | None:
        """The run's state from its checkpoint, with model, optimizer and RNGs restored; None without one."""
        ckpt = self.load_checkpoint(exp)      # every rank reads rank 0's checkpoint
        self.dist.agree(ckpt["step"] if ckpt is not None else 0, f"the step {exp.run_id} resumes from")
        if ckpt is None:
            return None
        rm.model.load_state_dict(ckpt["model"])
        rm.opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], self.device.name)
        state = TrainState.from_checkpoint(ckpt, self.device.name, micro_split, oom_events)
        what = "its cooldown " if exp.branch_of else ""
        log(f"[{exp.run_id}] resuming {what}from its checkpoint at step {state.step}/{exp.steps}")
        return state

    def start_or_resume(self, exp: RunSpec, rm: RunModel, micro_split: int, oom_events: list) -> TrainState:
        """The run's state from its checkpoint (model, optimizer and RNGs restored), or a new one whose
        curve starts with the untrained model's validation loss."""
        state = self.restore(exp, rm, micro_split, oom_events)
        if state is not None:
            return state
        state = TrainState(micro_split=micro_split, oom_events=oom_events)
        state.initial_loss = self.evaluate(rm.model, micro_split)
        for key, value in (("eval_step", 0), ("eval_tokens", 0), ("val_loss", state.initial_loss)):
            state.curve[key].append(value)
        state.restart_clocks()
        log(f"[{exp.run_id}] start: N={format_count(exp.n_params_nonembedding)} non-embedding "
            f"({format_count(exp.n_params_total)} total), n_layer={exp.n_layer} d_model={exp.d_model} "
            f"n_head={exp.n_head}, {exp.steps} steps, {format_count(exp.tokens)} tokens "
            f"({exp.tokens / len(self.corpus.train):.2f} epochs), peak lr {exp.peak_lr:.2e}, "
            f"initial val loss {state.initial_loss:.3f}")
        return state

    def checkpoint_due(self, state: TrainState) -> bool:
        # only rank 0 writes checkpoints, so only rank 0 keeps their clock
        return self.dist.is_main and self.checkpoints.due(state.step - state.step_ckpt,
                                                          time.time() - state.t_ckpt)

    def losses_finite(self, state: TrainState, log_now: bool) -> bool:
        """Whether every step loss since the last log line is finite. A non-finite one at a log step ends
        the run as diverged (state.diverged set); between log steps under torchrun only rank 0 looks, so
        it just skips its checkpoint and every rank stops together at the next log step."""
        bad = state.first_nonfinite()
        if bad is None:
            state.last_good_loss = float(state.window[-1])
            return True
        if log_now or not self.dist.enabled:
            if bad > 0:
                state.last_good_loss = float(state.window[bad - 1])
            state.diverged = (state.step_log + bad + 1, state.last_good_loss)
        return False

    def log_step(self, exp: RunSpec, state: TrainState, say) -> None:
        """One line per log interval: mean train loss, lr, speed, MFU, this run's ETA."""
        train_loss = float(torch.stack(state.window).mean())    # the only host sync of the interval
        state.window = []
        now = time.time()
        tok_s = (state.step - state.step_timed) * self.cfg.tokens_per_step / max(now - state.t_log, 1e-9)
        state.t_log, state.step_log, state.step_timed = now, state.step, state.step
        eta = (exp.steps - state.step) * self.cfg.tokens_per_step / max(tok_s, 1e-9)
        curve = state.curve
        curve["step"].append(state.step)
        curve["tokens"].append(state.step * self.cfg.tokens_per_step)
        curve["train_loss"].append(round(train_loss, 5))
        curve["lr"].append(state.lr)
        self.tracker.point(exp, curve["tokens"][-1], {"train/loss": train_loss, "train/lr": state.lr,
                                                      "speed/tokens_per_s": tok_s, "speed/mfu": self.mfu(exp, tok_s)})
        say(f"[{exp.run_id}] step {state.step}/{exp.steps} | loss {train_loss:.3f} | lr {state.lr:.2e} | "
            f"{tok_s / 1e3:.1f}k tok/s | MFU {100 * self.mfu(exp, tok_s):.1f}% | eta {format_duration(eta)}")

    def evaluate_into(self, exp: RunSpec, rm: RunModel, state: TrainState, say) -> bool:
        """Evaluate and add the loss to the curve; False (the run diverged) if it is not finite."""
        v = self.evaluate(rm.model, state.micro_split)
        if not math.isfinite(v):
            state.diverged = (state.step, state.last_good_loss)
            return False
        state.curve["eval_step"].append(state.step)
        state.curve["eval_tokens"].append(state.step * self.cfg.tokens_per_step)
        state.curve["val_loss"].append(v)
        self.tracker.point(exp, state.curve["eval_tokens"][-1], {"val/loss": v})
        say(f"[{exp.run_id}] eval step {state.step}: val loss {v:.4f}")
        return True

    def finish_run(self, exp: RunSpec, rm: RunModel, state: TrainState) -> dict:
        if state.diverged:
            step, good = state.diverged
            log(f"[{exp.run_id}] diverged: non-finite loss at step {step}/{exp.steps} (last finite loss "
                f"{good if good is None else round(good, 4)}); this run is left out of the fits, the others "
                f"continue")
            return state.record(exp, self, "diverged", step)
        record = state.record(exp, self, "completed", exp.steps)
        log(f"[{exp.run_id}] done: final val loss {record['final_val_loss']:.4f} (initial "
            f"{state.initial_loss:.3f}) in {format_duration(record['wall_time_s'])}, "
            f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
        if self.checkpoints.keep and self.checkpoints.folder is not None:
            self.save_checkpoint(exp, rm, state)     # the final state, for fine-tuning or inspection
        return record

    # --- checkpoints of this Trainer's runs (the format and the folder's rules: section 6) -------------

    def save_checkpoint(self, exp: RunSpec, rm: RunModel, state: TrainState) -> None:
        """Model, optimizer, RNGs and the run's state, written to a temporary file and renamed, so a kill
        at any moment leaves the previous checkpoint whole. DDP keeps the replicas identical: rank 0's
        state is everyone's."""
        if not self.dist.is_main or self.checkpoints.folder is None:
            return
        definition = run_definition(exp, self.corpus.record)
        write_checkpoint(self.checkpoints.path(exp.run_id), {
            "format": CHECKPOINT_FORMAT, "run_id": exp.run_id, "experiment_hash": definition_hash(definition),
            "definition": definition, "model": rm.model.state_dict(), "optimizer": rm.opt.state_dict(),
            "rng": rng_state(self.device.name), **state.checkpoint_fields()})
        state.t_ckpt, state.step_ckpt = time.time(), state.step

    def load_checkpoint(self, exp: RunSpec) -> dict | None:
        if self.checkpoints.folder is None or not self.checkpoints.path(exp.run_id).exists():
            return None
        path = self.checkpoints.path(exp.run_id)
        # to the CPU: the RNG states must stay CPU ByteTensors; load_state_dict moves weights and moments
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        exp_hash = definition_hash(run_definition(exp, self.corpus.record))
        if ckpt.get("experiment_hash") != exp_hash:          # the CLI refuses this case before training
            raise UserError(f"checkpoint {path} belongs to other settings; pass --fresh to move it aside")
        return ckpt

    def remove_checkpoint(self, exp: RunSpec) -> None:
        if self.checkpoints.folder is not None and not self.checkpoints.keep and self.dist.is_main:
            self.checkpoints.path(exp.run_id).unlink(missing_ok=True)

# ----------------------------------------------------------------------------------------------------
# 6. resume and checkpoints: a run's identity, checkpoint files, the output folder, signals
# ----------------------------------------------------------------------------------------------------

# 3: the definition is RunSpec's defining fields, every one of them for every run (2: one warmup for every
# run of a plan, the schedule and WSD branches; 1: before WSD)
DEFINITION_VERSION = 3
CORPUS_KEYS = ("corpus_sha256", "tokenizer", "validation_split")


def run_definition(spec: RunSpec, corpus_record: dict | None) -> dict:
    """Everything that determines a run's results: RunSpec's defining fields and the corpus. Its hash
    decides whether earlier work is reused.

    The device is left out on purpose: a run may continue on another machine (exactly on a CPU, within
    bf16 noise on a GPU), and every record says which device trained it. Without `corpus_record` the
    corpus keys are left out, so settings can be compared before the corpus is prepared.
    """
    d = {"definition_version": DEFINITION_VERSION}
    for key in run_definition_keys(spec):
        value = getattr(spec, key)
        d[key] = list(value) if isinstance(value, tuple) else value
    if corpus_record is not None:
        d.update(zip(CORPUS_KEYS, (corpus_record.get("sha256"), corpus_record.get("tokenizer"),
                                   corpus_record.get("validation_split"))))
    return d


def run_record(spec: RunSpec, corpus_record: dict | None, **measured) -> dict:
    """A run's record, its file under runs/: what its spec says of it, then what was measured (or, in
    the demo, simulated), then its definition and hash. The runner's, the demo's and --parallel's runs
    all get theirs here."""
    definition = run_definition(spec, corpus_record)
    return {"name": spec.name, "run_id": spec.run_id, "seed": spec.seed, "roles": list(spec.roles),
            "target": spec.target, "n_params_nonembedding": spec.n_params_nonembedding,
            "n_params_total": spec.n_params_total, "n_layer": spec.n_layer, "d_model": spec.d_model,
            "n_head": spec.n_head, "tokens": spec.tokens, "steps": spec.steps,
            "tokens_per_step": spec.tokens_per_step, "arch": spec.arch, "schedule": spec.schedule,
            "warmup_steps": spec.warmup_steps, "branch_of": spec.branch_of,
            "branch_step": spec.branch_step if spec.branch_of else None, "peak_lr": spec.peak_lr,
            "flops": spec.flops, **measured,
            "experiment_hash": definition_hash(definition), "definition": definition}


def definition_hash(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def definition_differences(old: dict, new: dict, keys=None) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every key of `keys` (default: all) whose values differ."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def init_seed(exp: RunSpec) -> int:
    """Initialisation seed of a run: depends on its name and seed only, not on its place in the plan,
    so adding a size to a ladder leaves the other runs (and their hashes) untouched."""
    return int(hashlib.sha256(f"init|{exp.draws_of or exp.name}|{exp.seed}".encode()).hexdigest()[:8], 16)


def data_stream_seed(exp: RunSpec) -> int:
    """The seed of this run's stream of training batches (with the step, it fixes every batch). A WSD
    branch reads its stable run's stream, so it sees the batches a separate run of its length would."""
    return int(hashlib.sha256((exp.branch_of or exp.draws_of or exp.name).encode()).hexdigest()[:8], 16)

CHECKPOINT_FORMAT = "scaling-lab-checkpoint-v1"


@dataclass(frozen=True)
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


def write_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, fsync, rename: a kill at any moment leaves the previous one whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state(device: str) -> dict:
    """Every RNG the process has, in types torch.load(weights_only=True) accepts. Training itself draws
    no random numbers after initialisation (batches are pure functions of the step), but a future
    dropout or sampler would, and a checkpoint must not silently depend on that."""
    legacy = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]]}
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), *rest))
    if device == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def read_checkpoint_header(path: Path) -> dict | None:
    """The definition and step of a checkpoint, without reading its tensors (memory-mapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:       # a checkpoint that cannot be read is reported, never overwritten
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); move it away to start that "
                        f"run over, or pass --fresh") from None
    return {k: state.get(k) for k in ("format", "run_id", "experiment_hash", "definition", "step")}


def checkpoint_bytes(n_params_total: int) -> int:
    """fp32 weights and AdamW's two moments, plus a margin for the curve and RNG states."""
    return 12 * n_params_total + 2**20


def required_free_bytes(runs: list[RunSpec], keep_checkpoints: bool) -> int:
    """Two copies of the largest checkpoint exist for a moment during its atomic replacement; with
    --keep-checkpoints every run's final checkpoint stays. Plus room for records and the figure."""
    sizes = [checkpoint_bytes(e.n_params_total) for e in runs]
    return (sum(sizes) + max(sizes) if keep_checkpoints else 2 * max(sizes)) + 50 * 2**20


def check_free_space(out_dir: Path, runs: list[RunSpec], keep_checkpoints: bool) -> None:
    need = required_free_bytes(runs, keep_checkpoints)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"only {free / 2**20:.0f} MiB free where {out_dir} lives; checkpoints and results need "
                        f"about {need / 2**20:.0f} MiB: free some space or choose another --output-dir")


# --- the output folder across runs: validated results files, one record per run, settings checks ---

# statuses that end a run for good; "out_of_memory" and "interrupted" are tried again on the next run
FINAL_STATUSES = ("completed", "diverged")
# settings of the folder as a whole, checked besides every run's definition: another mode is another
# study even where two plans share a run's name
FOLDER_KEYS = ("mode",)
OPTION_OF = {"mode": "--mode", "steps": "--max-steps", "batch_size": "--batch-size",
             "grad_accum": "--grad-accum", "context_length": "--context-length", "vocab_size": "--vocab-size",
             "lr": "--lr", "peak_lr": "--lr", "schedule": "--schedule", "cooldown_frac": "--cooldown-frac",
             "cooldown_shape": "--cooldown-shape", "horizons": "--horizons", "warmup_steps": "--warmup-steps",
             "branch_points": "--horizons", "branch_step": "--horizons/--cooldown-frac", "seed": "--seed/--seeds", "eval_interval": "--eval-interval",
             "eval_batches": "--eval-batches", "log_interval": "--log-interval", "corpus_sha256": "--data",
             "tokenizer": "--data", "validation_split": "--data", "tokens": "--data-sizes/--max-steps",
             "n_layer": "--data-model-size", "d_model": "--data-model-size",
             "arch": "--arch"}

class RunInterrupted(Exception):
    """SIGINT/SIGTERM during training: everything is saved; main() prints how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class OtherSchema(UserError):
    """A results file of this script in another schema (an earlier version's)."""


def read_results(out_dir: Path, name: str = "results.json") -> dict | None:
    """The output folder's results.json (or a part's results.<part>.json) if it is ours and resumable;
    None if there is none. Anything else is a UserError: a file this script cannot vouch for is never
    overwritten."""
    path = out_dir / name
    if not path.exists():
        return None
    advice = "it is left untouched: move it away, choose another --output-dir, or pass --fresh to move it aside"
    obj = read_json_file(path, advice)
    if not (isinstance(obj, dict) and "schema_version" in obj and isinstance(obj.get("config"), dict)):
        raise UserError(f"{path} was not written by this script (no schema_version and config); {advice}")
    if obj["schema_version"] != SCHEMA_VERSION:
        raise OtherSchema(f"{path} has schema version {obj['schema_version']}, this script writes "
                          f"{SCHEMA_VERSION} (--fit-only still reads it); {advice}")
    if not (isinstance(obj.get("points"), list) and all(isinstance(p, dict) and "run_id" in p for p in obj["points"])):
        raise UserError(f"{path} has no points table of runs; {advice}")
    return obj


def finished_earlier(store: "RunStore", spec: RunSpec, corpus_record: dict | None) -> dict | None:
    """The run's record under runs/ when it ended for good with this very definition; None otherwise."""
    rec = store.load(spec.run_id)
    if rec is not None and rec["status"] in FINAL_STATUSES and \
            rec["experiment_hash"] == definition_hash(run_definition(spec, corpus_record)):
        return rec
    return None


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
        rec = read_json_file(path, "move it away to train that run again, or pass --fresh")
        if not (isinstance(rec, dict) and "experiment_hash" in rec and "definition" in rec):
            raise UserError(f"{path} is not a run record of this script; move it away or pass --fresh")
        return rec

    def save(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path(record["run_id"]), record)


def archive_previous(out_dir: Path, why: str = "--fresh") -> Path | None:
    """--fresh (or changed settings in the mode's default folder): move this script's earlier outputs
    into previous-<date>-<time>/, never deleting them, and say so in one line that begins with `why`."""
    names = ["results.json", "scaling_laws_complete.png", "compute_optimal.png", "runs", "checkpoints",
             "runs.csv", "tb", "wandb",
             *sorted(p.name for p in out_dir.glob("results.*.json"))]
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
    log(f"{why}: moved the earlier {', '.join(present)} to {archive}")
    return archive


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path} ({e.strerror}); choose another with "
                        f"--output-dir") from None


def hold_output_lock(out_dir: Path, results_name: str = "results.json"):
    """One writer per results file: an exclusive flock on .<results_name>.lock in the folder, held until
    the returned file is closed (or the process dies, so a killed run's leftover file never blocks).
    The file says who holds it; a second process is refused at once, naming that pid. Parts of a sweep
    (--shard, --only) each lock their own results file, so they still share a folder."""
    prepare_output_dir(out_dir)
    f = open(out_dir / f".{results_name}.lock", "a+")      # "a+": opening never erases the holder's text
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its pid yet"
        f.close()
        raise UserError(f"{out_dir} is in use by another run ({holder}): one run writes "
                        f"{results_name} at a time; wait for it to finish, or choose another --output-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{datetime.datetime.now().isoformat(sep=' ', timespec='seconds')}\n")
    f.flush()
    return f


def refuse_changed_settings(existing: dict | None, cfg: RunConfig, runs: list[RunSpec], store: RunStore,
                            checkpoints: CheckpointPolicy, corpus_record: dict | None) -> None:
    """Compare this command with the earlier work in the output folder: results.json's settings and
    the definition of every run that has a record or a checkpoint. Any difference is a UserError that
    names the settings; without a corpus record the corpus keys wait for a second call."""
    changed = changed_settings(existing, cfg, runs, store, checkpoints, corpus_record)
    if changed:
        raise UserError(f"{cfg.output_dir} holds results made with other settings: {changed}. "
                        f"Rerun the earlier command to resume it, pass --fresh to move the earlier results "
                        f"aside, or choose another --output-dir")


def changed_settings(existing: dict | None, cfg: RunConfig, runs: list[RunSpec], store: RunStore,
                     checkpoints: CheckpointPolicy, corpus_record: dict | None) -> str | None:
    """The settings in which this command differs from the folder's earlier work, as 'steps 30 -> 20
    (--max-steps, 2 runs); ...', or None when nothing differs."""
    diffs: dict[str, list] = {}          # key -> [old, new, number of runs]
    if existing is not None:
        old_cfg = existing["config"]
        for key in FOLDER_KEYS:
            if key in old_cfg and old_cfg[key] != getattr(cfg, key):
                diffs[key] = [old_cfg[key], getattr(cfg, key), 0]
    for exp in runs:
        new = run_definition(exp, corpus_record)
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
    parts = []
    for key, (o, n, count) in diffs.items():
        opt = OPTION_OF.get(key)
        where = ", ".join(x for x in (opt, f"{count} runs" if count else None) if x)
        parts.append(f"{key} {o} -> {n}" + (f" ({where})" if where else ""))
    return "; ".join(parts) or None


def settle_changed_settings(existing: dict | None, cfg: RunConfig, runs: list[RunSpec], store: RunStore,
                            checkpoints: CheckpointPolicy, corpus_record: dict | None, *,
                            archive_on_change: bool, dist_info: Distributed) -> dict | None:
    """Earlier work made with other settings: in the mode's default folder (no --output-dir given,
    `archive_on_change`) it is moved aside as --fresh does and this run starts over; in a folder the
    user named, a one-line refusal. Then the other parts' results files of a sharded sweep are compared
    too. Returns the earlier results.json still in force (None once moved). Every rank compares before
    rank 0 moves anything."""
    changed = changed_settings(existing, cfg, runs, store, checkpoints, corpus_record)
    if changed and not archive_on_change:
        refuse_changed_settings(existing, cfg, runs, store, checkpoints, corpus_record)
    dist_info.barrier()
    if not changed:
        refuse_other_results_files(Path(cfg.output_dir), cfg, store, checkpoints, corpus_record)
        return existing
    if dist_info.is_main:
        archive_previous(Path(cfg.output_dir), why=f"settings changed ({changed}) in the default output folder")
    dist_info.barrier()
    return None


def remove_stale_temporaries(folder: Path, min_age_s: float = 600.0) -> None:
    """Temporary files of processes that died mid-write (their renamed targets are intact). In a folder
    that shards on other machines share, a process id says nothing, so only files untouched for
    `min_age_s` go (a write in progress keeps its file's modification time fresh)."""
    if not folder.is_dir():
        return
    for tmp in folder.glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        try:
            if time.time() - tmp.stat().st_mtime < min_age_s:
                continue
            os.kill(int(pid), 0)               # still alive: another process of ours is writing it
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except (PermissionError, FileNotFoundError):
            pass


def stop_on_signals(stop: StopRequest):
    """While training, SIGINT and SIGTERM ask the step loop to checkpoint and stop; a second signal
    stops at once (KeyboardInterrupt)."""

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

# ----------------------------------------------------------------------------------------------------
# 7. speed: the device's peak FLOP/s, MFU, peak memory, the plan's time estimate, and --benchmark
# ----------------------------------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets: bf16 and TF32/fp32.
# Matched against torch.cuda.get_device_name() in order, as whole words ("L4" is not "L40"); the first
# key found wins. A MIG slice has a share of its GPU's peak, so it is measured instead.
GPU_PEAK_TFLOPS = [
    ("H200 NVL", 835.5, 417.5), ("H200", 989.0, 494.5), ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.5, 417.5), ("H100", 989.0, 494.5), ("GH200", 989.0, 494.5),
    ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0), ("L4", 121.0, 60.0), ("A10G", 70.0, 35.0),
    ("A10", 125.0, 62.5), ("RTX 4090", 165.2, 82.6), ("RTX 3090", 71.0, 35.6), ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
]


def gpu_peak_flops(device_name: str, dtype: str) -> float | None:
    words = re.findall(r"[a-z0-9]+", device_name.lower())      # "NVIDIA A100-SXM4-40GB" -> nvidia a100 sxm4 40gb
    if "mig" in words:
        return None
    for key, bf16, fp32 in GPU_PEAK_TFLOPS:
        k = key.lower().split()
        if any(words[i:i + len(k)] == k for i in range(len(words))):
            return (bf16 if dtype == "bf16" else fp32) * 1e12
    return None


def measure_matmul_peak(device: str, dtype: str, size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on this device, the best of many short blocks (other load only
    ever slows a block down): the ceiling for devices without a data sheet."""
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=tdtype)
    b = torch.randn(size, size, device=device, dtype=tdtype)
    a @ b                                                # warm-up
    best, t_end = 0.0, time.time() + seconds
    while time.time() < t_end or best == 0.0:
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(2):
            a @ b
        sync_device(device)
        best = max(best, 2 * 2.0 * size**3 / (time.perf_counter() - t0))
    return best


def device_peak_flops(device: DeviceInfo, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for the MFU denominator."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.name == "cuda":
        peak = gpu_peak_flops(device.description, device.dtype)
        if peak:
            return peak, f"data sheet ({device.description}, dense {device.dtype})"
    return measure_matmul_peak(device.name, device.dtype), f"measured {device.dtype} matmul peak"


def peak_memory_bytes(device: str) -> int:
    """Peak memory of this process on the device: allocator peak on CUDA, driver allocation on MPS,
    peak resident set size on a CPU (process-wide, so it only grows)."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)     # bytes on macOS, KiB on Linux


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def available_memory_bytes(device: str) -> tuple[int | None, str]:
    """The memory one run may fill, and what it is: a GPU's free memory on CUDA; on MPS what Metal
    recommends one process allocate (less than the RAM it shares); otherwise the machine's physical RAM."""
    if device == "cuda":
        return gpu_memory_bytes(device), "the GPU's free memory"
    if device == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return int(torch.mps.recommended_max_memory()), "Metal's recommended maximum for this GPU"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    except (ValueError, OSError, AttributeError):     # a platform without these names
        return None, "memory"


def check_run_memory(runs: list[RunSpec], cfg: RunConfig, device: str,
                     available: tuple[int | None, str]) -> str | None:
    """Refuse, in one line, a plan whose largest run cannot fit (estimated_run_memory_bytes); else the
    log line comparing the two. On CUDA an out-of-memory step is retried with smaller micro-batches, so
    only a run that cannot fit even one sequence per micro-batch is refused; elsewhere nothing retries
    (the kernel kills the process), so the whole micro-batch must fit."""
    memory, what = available
    if not runs or not memory:
        return None
    largest = max(runs, key=lambda e: estimated_run_memory_bytes(e, cfg))
    need = estimated_run_memory_bytes(largest, cfg)
    floor = (estimated_run_memory_bytes(largest, dataclasses.replace(cfg, batch_size=1))
             if device == "cuda" else need)
    gb = 1e9
    if floor > memory:
        retry = f" ({floor / gb:.1f} GB at one sequence per micro-batch)" if floor != need else ""
        raise UserError(f"{largest.name} would need about {need / gb:.1f} GB at batch {cfg.batch_size} x context "
                        f"{cfg.context_length}{retry}, more than {what} ({memory / gb:.1f} GB): lower --context-length or "
                        f"--batch-size (--grad-accum keeps the tokens per step), or use --param-sizes without it")
    return (f"memory: the largest run ({largest.name}) needs about {need / gb:.2g} GB of {what} "
            f"({memory / gb:.3g} GB)")


def probe_experiment(n_layer: int, d_model: int, n_head: int) -> RunSpec:
    """A stand-in run of this shape for timing: small constant lr, never saved or recorded."""
    return RunSpec("probe", n_layer, d_model, n_head, steps=10**9, peak_lr=1e-4)


def plan_shapes(plan: list[RunSpec]) -> list[tuple[int, int, int]]:
    """The plan's distinct (n_layer, d_model, n_head), smallest first."""
    return sorted({(e.n_layer, e.d_model, e.n_head) for e in plan}, key=lambda s: s[0] * s[1] ** 2)


def median_step_times(step_fns: dict, steps: int, device: str, block: int = 5) -> dict[str, float]:
    """Seconds per step of each function, timed in alternating blocks of `block` steps (so all of them
    see the same background load) and summarised by the median block, which a busy machine's spikes
    do not move."""
    times: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(max(1, steps // block)):
        for name, fn in step_fns.items():
            sync_device(device)
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            sync_device(device)
            times[name].append((time.perf_counter() - t0) / block)
    return {name: float(np.median(v)) for name, v in times.items()}


def timed_step_fn(trainer: Trainer, shape: tuple[int, int, int], warmup: int):
    """A function doing one training step of a fresh model of this shape, after `warmup` steps (which
    absorb allocation, kernel selection and compilation)."""
    probe = probe_experiment(*shape)
    rm = trainer.new_model(probe, 0)
    counter = itertools.count()

    def step():
        trainer.train_step(rm, probe, next(counter))
    for _ in range(warmup):
        step()
    return step


def eval_overhead(cfg: RunConfig) -> float:
    """Evaluation's share on top of training: an eval batch costs about a third of a training step."""
    return cfg.eval_batches / (3 * cfg.eval_interval)


def estimate_wall_time(trainer: Trainer, plan: list[RunSpec], budget_s: float = 30.0) -> dict[str, float]:
    """Seconds per experiment, from a few timed steps of each distinct shape on this device.

    Shapes are timed from the smallest up; once a step would take long, the larger shapes are
    estimated from the FLOP rate of the largest timed one (6 N per token, non-embedding plus output
    layer), so the estimate itself stays within about `budget_s`.

    The probes run eager (a compile would be timed as training) in this process alone: under torchrun
    only rank 0 estimates, so a DistributedDataParallel probe would wait for collectives the other ranks
    never join. Each probe step takes this rank's share of the batch, about a global step's time.
    """
    cfg = trainer.cfg
    eager = Trainer(dataclasses.replace(cfg, compile=False, batch_size=cfg.batch_size // trainer.dist.world_size),
                    trainer.corpus, trainer.device)
    step_s, flop_rate, spent = {}, None, 0.0      # step_s: (n_layer, d_model) -> seconds per step
    for shape in plan_shapes(plan):
        n_layer, d_model, _ = shape
        flops_step = 6 * (n_params_nonembedding(n_layer, d_model, cfg.arch) + trainer.corpus.vocab_size * d_model) \
            * cfg.tokens_per_step
        if flop_rate and spent + 3 * flops_step / flop_rate > budget_s:
            step_s[(n_layer, d_model)] = flops_step / flop_rate
            continue
        dt = median_step_times({"ours": timed_step_fn(eager, shape, warmup=1)}, 2, eager.device.name,
                               block=1)["ours"]
        spent += 3 * dt
        step_s[(n_layer, d_model)] = dt
        flop_rate = flops_step / dt
    return {e.name: e.trained_steps * step_s[(e.n_layer, e.d_model)] * (1 + eval_overhead(cfg)) for e in plan}


def plan_progress(runs: list[RunSpec], done_ids: set[str], trained_ids: set[str], elapsed_s: float,
                  estimates: dict[str, float] | None) -> dict:
    """How far a plan is: runs and tokens done of the total, and the time left. The time left sums the
    remaining runs' estimates (estimate_wall_time) when there are any; else it scales the seconds per
    FLOP measured so far (`elapsed_s` over the runs trained in this process, `trained_ids`) by the
    remaining runs' FLOPs. None when neither is known."""
    done = [e for e in runs if e.run_id in done_ids]
    left = [e for e in runs if e.run_id not in done_ids]
    trained_flops = sum(e.flops_processed for e in runs if e.run_id in trained_ids)
    if estimates:
        left_s, how = sum(estimates[e.name] for e in left), "from the plan's estimate"
    elif trained_flops > 0:
        left_s, how = elapsed_s / trained_flops * sum(e.flops_processed for e in left), "from the speed so far"
    else:
        left_s, how = None, ""
    return {"runs_done": len(done), "runs_total": len(runs),   # tokens: a WSD branch's are its cooldown's
            "tokens_done": sum(e.tokens_processed for e in done),
            "tokens_total": sum(e.tokens_processed for e in runs),
            "elapsed_s": elapsed_s, "left_s": left_s, "left_from": how}


def progress_line(p: dict) -> str:
    """'progress: 2/4 runs, 31K/63K tokens (49%), elapsed 12s, about 9s left (from the speed so far)'."""
    share = p["tokens_done"] / p["tokens_total"] if p["tokens_total"] else 1.0
    left = (f", about {format_duration(p['left_s'])} left ({p['left_from']})" if p["left_s"] is not None
            and p["runs_done"] < p["runs_total"] else "")
    return (f"progress: {p['runs_done']}/{p['runs_total']} runs, {format_count(p['tokens_done'])}/"
            f"{format_count(p['tokens_total'])} tokens ({100 * share:.0f}%), elapsed "
            f"{format_duration(p['elapsed_s'])}{left}")


def plain_eager_step(n_layer: int, d_model: int, n_head: int, vocab_size: int, context_length: int,
                     batch_size: int, device: str, arch: str = "gpt2"):
    """The reference: the same GPT in plain eager fp32 with a stock AdamW on one fixed random batch, no
    data loading, clipping, schedule or logging. Returns a function doing one step; ours must keep up."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size, context_length, n_layer, d_model, n_head, arch)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (batch_size, context_length), device=device)
    y = torch.randint(0, vocab_size, (batch_size, context_length), device=device)

    def step():
        model(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def benchmark_shape(trainer: Trainer, shape: tuple[int, int, int], steps: int, warmup: int,
                    reference: bool) -> dict:
    """tokens/s, MFU and peak memory of one model shape (and of the plain eager reference)."""
    cfg, dev = trainer.cfg, trainer.device
    n_layer, d_model, n_head = shape
    reset_peak_memory(dev.name)
    fns = {"ours": timed_step_fn(trainer, shape, warmup)}
    sync_device(dev.name)
    peak_mem = peak_memory_bytes(dev.name)     # ours alone: the reference's model is not counted
    if reference:
        fns["reference"] = plain_eager_step(n_layer, d_model, n_head, trainer.corpus.vocab_size,
                                            cfg.context_length, cfg.batch_size * cfg.grad_accum, dev.name, cfg.arch)
        for _ in range(3):
            fns["reference"]()
    step_s = median_step_times(fns, steps, dev.name)
    tok_s = cfg.tokens_per_step / step_s["ours"]
    fpt = flops_per_token(n_layer, d_model, trainer.corpus.vocab_size, cfg.context_length, cfg.arch)
    row = {"n_layer": n_layer, "d_model": d_model, "n_head": n_head,
           "n_params_nonembedding": n_params_nonembedding(n_layer, d_model, cfg.arch),
           "tokens_per_s": round(tok_s, 1), "step_time_s": round(step_s["ours"], 5),
           "flops_per_token": fpt, "mfu": tok_s * fpt / trainer.peak_flops[0],
           "peak_memory_mb": round(peak_mem / 2**20, 1)}
    if reference:
        ref = cfg.tokens_per_step / step_s["reference"]
        row["plain_eager_fp32_tokens_per_s"] = round(ref, 1)
        row["speedup_vs_plain_eager"] = round(tok_s / ref, 3)
    ref_txt = (f" | plain eager fp32 {row['plain_eager_fp32_tokens_per_s'] / 1e3:.2f}k tok/s "
               f"(x{row['speedup_vs_plain_eager']:.2f})" if reference else "")
    log(f"benchmark N={format_count(row['n_params_nonembedding']):>6} (n_layer {n_layer}, d_model "
        f"{d_model}): {tok_s / 1e3:.2f}k tok/s | MFU {100 * row['mfu']:.1f}% | peak mem "
        f"{row['peak_memory_mb']:.0f} MB{ref_txt}")
    return row


def benchmark(trainer: Trainer, plan: list[RunSpec], steps: int = 30, warmup: int = 5,
              reference: bool = True) -> dict:
    """Time `steps` training steps (after `warmup`) of every distinct model shape in the plan; report
    tokens/s, MFU, peak memory and the projected wall time of the whole plan. With `reference`, a plain
    eager fp32 step of the same model is timed in alternating blocks."""
    cfg, dev = trainer.cfg, trainer.device
    peak, peak_source = trainer.peak_flops
    rows = [benchmark_shape(trainer, shape, steps, warmup, reference) for shape in plan_shapes(plan)]
    tok_s = {(r["n_layer"], r["d_model"]): r["tokens_per_s"] for r in rows}
    projected = sum(e.trained_steps * cfg.tokens_per_step / tok_s[(e.n_layer, e.d_model)] for e in plan) \
        * (1 + eval_overhead(cfg))
    log(f"benchmark: projected wall time of mode '{cfg.mode}' ({len(plan)} experiments): "
        f"{format_duration(projected)} on {dev.name} ({dev.description}), dtype {dev.dtype}, "
        f"compile {'on' if trainer.compile else 'off'}; MFU against {format_count(peak)}FLOP/s ({peak_source})")
    return {"mode": cfg.mode, "device": dev.name, "device_name": dev.description, "dtype": dev.dtype,
            "compile": trainer.compile, "torch_version": torch.__version__, "peak_flops": peak,
            "peak_source": peak_source, "tokens_per_step": cfg.tokens_per_step,
            "timed_steps": max(1, steps // 5) * 5,
            "timing": "median of 5-step blocks, alternating with the reference", "warmup_steps": warmup,
            "sizes": rows, "projected_wall_time_s": round(projected, 1)}

# ----------------------------------------------------------------------------------------------------
# 8. distributed and parallel: torchrun's ranks (DDP), --shard/--only, --parallel, merging the parts
# ----------------------------------------------------------------------------------------------------

# Training's collectives (gradients, losses) give up after this long, so a rank that hangs ends the job
# instead of holding every GPU forever. The longest the other ranks ever wait is rank 0 writing a
# checkpoint or a run's record between two steps.
DIST_TIMEOUT_S = 30 * 60
# Ranks wait this long for rank 0 to tokenize a corpus that is not cached yet (hours for a large one).
PREPARE_TIMEOUT_S = 12 * 3600


@dataclass(frozen=True)
class Distributed:
    """This process's place among torchrun's ranks; a process on its own is rank 0 of 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    control: object = None          # a gloo group with PREPARE_TIMEOUT_S, for waits and agreement checks

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control)

    def mean_(self, t):
        """Average a tensor over the ranks in place (SUM then divide: gloo has no AVG)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def agree(self, value, what: str):
        """`value` if every rank holds the same one, else a UserError: the ranks would train different
        things and deadlock at the next collective. They differ when the output folder or the data are
        not the same files on every node."""
        if not self.enabled:
            return value
        values = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.control)
        if any(v != values[0] for v in values):
            raise UserError(f"the torchrun ranks disagree about {what} (rank 0: {values[0]}, others: "
                            f"{[v for v in values if v != values[0]][0]}): --output-dir, --data and "
                            f"--cache-dir must be folders every node sees, with the same contents")
        return value

def distributed_from_env() -> Distributed:
    """torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in every worker it starts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    return Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def claim_local_gpu(dist_info: Distributed, requested_device: str) -> None:
    """Under torchrun on CUDA, bind this rank to GPU LOCAL_RANK before anything touches CUDA (otherwise
    every rank would open a context on GPU 0)."""
    if not dist_info.enabled or requested_device not in ("auto", "cuda"):
        return
    if torch.cuda.is_available():
        if dist_info.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {dist_info.local_world_size} processes on this node but it has "
                            f"{torch.cuda.device_count()} GPUs: pass --nproc_per_node={torch.cuda.device_count()}")
        torch.cuda.set_device(dist_info.local_rank)


def init_distributed(dist_info: Distributed, device: str) -> Distributed:
    """Join torchrun's process group (rendezvous from its environment): NCCL on CUDA, gloo on CPU."""
    if not dist_info.enabled:
        return dist_info
    if device not in ("cuda", "cpu"):
        raise UserError(f"torchrun with --device {device}: DistributedDataParallel runs here on CUDA (NCCL) "
                        f"or CPU (gloo); use one process on {device}, or --device cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PREPARE_TIMEOUT_S))
    return dataclasses.replace(dist_info, control=control)


def rank_slice(n_rows: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of a batch of n_rows windows (n_rows divisible by world_size)."""
    per_rank = n_rows // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def check_batch_split(batch_size: int, world_size: int) -> None:
    """Every rank takes batch_size / world_size windows of each micro-batch, so the global batch (tokens
    per optimizer step) is the preset's whatever the number of processes."""
    if batch_size % world_size:
        lower = batch_size // world_size * world_size
        options = [str(b) for b in (lower, lower + world_size) if b > 0]
        divisors = [str(k) for k in range(2, batch_size + 1) if batch_size % k == 0][:4]
        raise UserError(f"--batch-size {batch_size} cannot be split evenly over {world_size} processes: pass "
                        f"--batch-size {' or '.join(options)} (then --grad-accum to keep the tokens per step), "
                        f"or start {' or '.join(divisors) or 'one'} processes per run")

# --- several runs at once on one machine (--parallel): how many, and which runs go together ---

PARALLEL_MAX = 4                    # processes sharing one GPU by default
# a model this large (total parameters) keeps a GPU busy on its own: its runs go one at a time
PARALLEL_MAX_PARAMS = 100 * 10**6
# On a CPU, models this small use a second core poorly: on 2 cores two 1-thread processes take 1.2-1.4x
# the steps per second of one 2-thread process at tiny's widths (measured: docs/speed.md), so a plan of
# at least CPU_PARALLEL_MIN_FLOPS (over a minute here; a process costs ~5 s to start) trains two at once.
CPU_PARALLEL_MAX_PARAMS = 10**6
CPU_PARALLEL_MIN_FLOPS = 1e12

def estimated_run_memory_bytes(exp: RunSpec, cfg: RunConfig) -> int:
    """Rough device memory of one run: fp32 weights, gradients and AdamW's two moments (16 bytes per
    parameter); activations of a micro-batch at about 34 bytes per (token, layer, channel) (Korthikanti
    et al. 2022, 16-bit, attention by a fused kernel); fp32 logits and their gradient; 1 GiB for the CUDA
    context and workspaces."""
    tokens = cfg.batch_size * cfg.context_length
    activations = tokens * (34 * exp.n_layer * exp.d_model + 8 * cfg.vocab_size)
    return int(16 * exp.n_params_total + activations + 2**30)


def default_parallel(runs: list[RunSpec], cfg: RunConfig, device: str, memory_bytes: int | None) -> int:
    """How many runs share the device when --parallel is not given. On CUDA, where small models leave
    most of a GPU idle: if every model is under PARALLEL_MAX_PARAMS total parameters, as many runs as fit
    in 90% of the GPU's free memory at once (by estimated_run_memory_bytes of the largest), at most
    PARALLEL_MAX, at most the number of training units. On a CPU with at least 2 cores: 2 for a plan of
    models under CPU_PARALLEL_MAX_PARAMS and at least CPU_PARALLEL_MIN_FLOPS (tiny's). Else 1."""
    units = len({training_unit(e) for e in runs})
    if device == "cpu":
        small = all(e.n_params_total < CPU_PARALLEL_MAX_PARAMS for e in runs)
        big_enough = sum(e.flops_processed for e in runs) >= CPU_PARALLEL_MIN_FLOPS
        return 2 if units >= 2 and cpu_cores() >= 2 and small and big_enough else 1
    if device != "cuda" or units < 2 or not memory_bytes:
        return 1
    largest = max(runs, key=lambda e: e.n_params_total)
    if largest.n_params_total >= PARALLEL_MAX_PARAMS:
        return 1
    fit = int(0.9 * memory_bytes // estimated_run_memory_bytes(largest, cfg))
    return max(1, min(PARALLEL_MAX, units, fit))


def runs_at_once(scope: RunScope, under_torchrun: bool, todo: list[RunSpec], cfg: RunConfig,
                 device: str) -> int:
    """--parallel K, else 1 for a --parallel child and under torchrun (every rank is already one of a
    run's processes), else default_parallel."""
    if scope.parallel:
        return scope.parallel
    if scope.child or under_torchrun:
        return 1
    return default_parallel(todo, cfg, device, gpu_memory_bytes(device))


def gpu_memory_bytes(device: str) -> int | None:
    """Free memory of the current GPU: another process's share of it is not ours to plan with."""
    if device != "cuda":
        return None
    return int(torch.cuda.mem_get_info()[0])


def balance_runs(runs: list[RunSpec], k: int) -> list[list[RunSpec]]:
    """Split runs into k groups of similar total FLOPs (largest first, each to the lightest group), each
    group in plan order. Which process trains a run does not change its result."""
    def cost(e):        # total parameters: a small model's tied output layer is most of its work
        return 6.0 * e.n_params_total * e.tokens
    loads = [[0.0, []] for _ in range(k)]
    order = {e.run_id: i for i, e in enumerate(runs)}
    for e in sorted(runs, key=lambda e: -cost(e)):
        lightest = min(loads, key=lambda g: g[0])
        lightest[0] += cost(e)
        lightest[1].append(e)
    return [sorted(g, key=lambda e: order[e.run_id]) for _, g in loads if g]


@dataclass
class RunScope:
    """Which runs of the plan this process trains, and which results file it writes. A process that
    trains part of the plan (--shard, --only) writes results.<part>.json, never results.json, so any
    number of them can share a folder; --fit-only on the folder merges them."""
    shard: tuple[int, int] | None = None
    only: list[str] | None = None
    parallel: int | None = None     # --parallel K; None: default_parallel
    child: int | None = None        # in a child of --parallel K: K
    argv: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        return self.shard is not None or self.only is not None

    def describe(self) -> str:
        return f"--shard {self.shard[0]}/{self.shard[1]}" if self.shard else f"--only {','.join(self.only or [])}"

    def results_name(self) -> str:
        if self.shard:
            return f"results.shard-{self.shard[0]}-of-{self.shard[1]}.json"
        if self.only:
            key = hashlib.sha256(",".join(sorted(self.only)).encode()).hexdigest()[:10]
            return f"results.only-{key}.json"
        return "results.json"

    def record(self, runs: list[RunSpec]) -> dict:
        return {"shard": f"{self.shard[0]}/{self.shard[1]}" if self.shard else None, "only": self.only,
                "run_ids": [e.run_id for e in runs],
                "note": "part of a sweep: merge every part with --fit-only on this folder"}


def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4): this job trains runs 1, 5, 9, ... of the plan."""
    i, slash, n = text.partition("/")
    if not (slash and i.strip().isdigit() and n.strip().isdigit()) or not 0 <= int(i) < int(n):
        raise UserError(f"--shard {text}: give I/N with 0 <= I < N, e.g. --shard 0/2 and --shard 1/2 for two jobs "
                        f"(a SLURM array passes $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(i), int(n)


def scope_from_args(args, argv: list[str]) -> RunScope:
    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
    if args.only is not None and not only:
        raise UserError("--only needs experiment names or run ids, e.g. --only params-N25K,data-D16K")
    if args.parallel_child:         # the parent chose this child's runs; its own --shard was applied there
        return RunScope(only=only, child=args.parallel_child, argv=argv)
    if args.parallel and args.benchmark:
        raise UserError("--benchmark times one process at a time: drop --parallel")
    if args.fresh and (args.shard or only):
        raise UserError("--fresh with --shard/--only would move the other parts' runs aside too: move the "
                        "output folder away yourself (or use --fresh once, without --shard/--only)")
    return RunScope(shard=parse_shard(args.shard) if args.shard else None, only=only,
                    parallel=args.parallel, argv=argv)


def training_unit(exp: RunSpec) -> tuple[str, int]:
    """A WSD stable run and its cooldown branches train together in one process; any other run alone."""
    return exp.branch_of or exp.name, exp.seed


def select_runs(runs: list[RunSpec], scope: RunScope) -> list[RunSpec]:
    """--only (by name, or by run_id for one seed), then --shard (every N-th unit from I), in plan order.
    A stable run and its branches are one unit: naming either selects both."""
    units = list(dict.fromkeys(training_unit(e) for e in runs))
    if scope.only:
        known = {e.name for e in runs} | {e.run_id for e in runs}
        unknown = [n for n in scope.only if n not in known]
        if unknown:
            raise UserError(f"--only {','.join(unknown)}: not in this plan; its experiments are "
                            f"{', '.join(dict.fromkeys(e.name for e in runs))} (or a run id such as {runs[0].run_id})")
        named = {training_unit(e) for e in runs if e.name in scope.only or e.run_id in scope.only}
        units = [u for u in units if u in named]
    if scope.shard:
        i, n = scope.shard
        units = units[i::n]
    chosen = set(units)
    return [e for e in runs if training_unit(e) in chosen]


def expand_seeds(plan: list[RunSpec], seeds: list[int]) -> list[RunSpec]:
    """Seed-major order: the whole ladder of the first seed comes first, so an early stop still leaves
    complete sweeps to fit."""
    return [dataclasses.replace(e, seed=s) for s in seeds for e in plan]


def child_arguments(argv: list[str]) -> list[str]:
    """This command's arguments for a child of --parallel: without --parallel, --shard, --only and
    --fresh (the parent applied them; a child ignores them if an abbreviation slips through)."""
    drop_with_value = ("--parallel", "--shard", "--only")
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop_with_value:
            skip = True
            continue
        if a == "--fresh" or any(a.startswith(o + "=") for o in drop_with_value):
            continue
        out.append(a)
    return out


def refuse_other_results_files(out_dir: Path, cfg: RunConfig, store: RunStore, policy: CheckpointPolicy,
                               corpus_record: dict | None) -> None:
    """The parts of a sweep (--shard, --only) share a folder but train different runs, so their run records
    cannot show a mismatch: compare this command's settings and corpus with every results.<part>.json."""
    for path in sorted(out_dir.glob("results.*.json")):
        other = read_results(out_dir, path.name)
        refuse_changed_settings(other, cfg, [], store, policy, None)
        theirs = ((other.get("environment") or {}).get("corpus") or {}).get("sha256")
        ours = (corpus_record or {}).get("sha256")
        if corpus_record is not None and theirs and ours and theirs != ours:
            raise UserError(f"{path} was trained on another corpus (sha256 {theirs[:12]}, this --data "
                            f"{ours[:12]}): give the same --data to every part of a sweep, or another --output-dir")

# what the runs of one fit share besides every setting copied from the command: --fit-only refuses to
# merge runs that differ in any of them (the points of L(N) share a length, those of L(D) a model)
MERGE_KEYS_PER_ROLE = {ROLE_N: ("steps",), ROLE_D: ("n_layer", "d_model")}


def merge_keys() -> tuple[str, ...]:
    """The definition keys every run of one study shares: its version, the corpus, RunSpec's settings
    copied from the command."""
    return ("definition_version", *[f.name for f in dataclasses.fields(RunSpec) if f.metadata.get("from_config")],
            *CORPUS_KEYS)


def check_mergeable(records: list[dict]) -> None:
    """Runs trained with different settings (a shard started with another --batch-size, another corpus)
    would make the fits meaningless: name the first difference and the runs on each side."""
    defined = [r for r in records if isinstance(r.get("definition"), dict)]
    checks = [(key, None) for key in merge_keys()]
    checks += [(key, role) for role, keys in MERGE_KEYS_PER_ROLE.items() for key in keys]
    for key, role in checks:
        groups: dict[str, list[str]] = {}
        for r in defined:
            if role is None or role in roles_of(r):
                groups.setdefault(json.dumps(r["definition"].get(key)), []).append(r["run_id"])
        if len(groups) > 1:
            sides = "; ".join(f"{key} {v} in {', '.join(ids[:3])}" + (" ..." if len(ids) > 3 else "")
                              for v, ids in groups.items())
            raise UserError(f"--fit-only: the saved runs were trained with different settings ({sides}); "
                            f"move the runs that do not belong out of runs/ and merge again")


def merge_saved_runs(folder: Path) -> tuple[dict, list[dict]]:
    """(results with its points table, the run records) for a folder that one run, several shards or
    --parallel wrote to: every record under runs/ (one file per run, the source of truth), plus runs that
    only a results file mentions (interrupted ones), in plan order; settings and environment from
    results.json or a part's file. Results files of this schema or schema 1 (0cf71dd)."""
    files = [folder / "results.json"] if (folder / "results.json").is_file() else []
    files += sorted(folder.glob("results.*.json"))
    bases = []
    for f in files:
        with contextlib.suppress(UserError):
            bases.append((f, *study_file_runs(read_json_file(f, "move it away and merge again"), str(f))))
    store = RunStore(folder)
    records = {}
    for path in sorted(store.folder.glob("*.json")):
        rec = store.load(path.stem)
        records[rec.get("run_id", path.stem)] = rec
    check_mergeable(list(records.values()))
    points = {run_id: point_row(rec) for run_id, rec in records.items()}
    for _, obj, _ in bases:
        for p in obj["points"]:
            points.setdefault(p["run_id"], p)
    if not points:
        raise UserError(f"--fit-only {folder}: no runs under runs/ and no results file; give the folder that "
                        f"the training command (or its shards) wrote")
    results = {k: v for k, v in bases[0][1].items() if k != "scope"} if bases else \
        {"schema_version": SCHEMA_VERSION, "config": {}}
    seeds = (results.get("config") or {}).get("seeds") or []

    def plan_order(p):      # build_plan's: the ladder's rows by size, the data sweep's after, each by D
        seed = p["seed"]
        return (seeds.index(seed) if seed in seeds else len(seeds) + seed, fit_order(p)[0] == 0,
                p["N_nonembedding"] or 0, p["D"] or 0, str(p["run_id"]))

    results["schema_version"] = SCHEMA_VERSION
    results["points"] = sorted(points.values(), key=plan_order)
    results["merged_from"] = {"runs_folder": str(store.folder), "run_records": len(records),
                              "results_files": [f.name for f, _, _ in bases],
                              "processes": sorted({str((o.get("environment") or {}).get("device_name"))
                                                   for _, o, _ in bases})}
    return results, [*records.values(), *(r for _, _, recs in bases for r in recs if r["run_id"] not in records)]

class ParallelFailure(Exception):
    """A child of --parallel failed; main() prints this and exits with status 1."""


def train_parallel(s: Session, k: int) -> dict:
    """--parallel K: train the runs not finished yet in K child processes of this same command (each
    given its runs with --only), forward SIGINT/SIGTERM to them, stop the others if one fails, then
    assemble the records in plan order and fit them exactly as a sequential run would."""
    s.start_training()
    todo = [e for e in s.todo if not e.branch_of]      # a branch trains with its stable run (one unit)
    groups = balance_runs(todo, k)
    announce_plan(s, None)
    log(f"parallel: {len(todo)} runs in {len(groups)} processes at once, each with 1/{k} of the "
        + ("GPU's memory" if s.device.name == "cuda" else "cores"))
    children = []
    gpus = child_gpus(len(groups)) if s.device.name == "cuda" else [None] * len(groups)
    for i, (group, gpu) in enumerate(zip(groups, gpus)):
        ids = [e.run_id for e in group]
        log(f"  process {i + 1}/{len(groups)}: {', '.join(ids)}" + (f" (GPU {gpu})" if gpu is not None else ""))
        sharing = k if gpu is None else gpus.count(gpu)      # the children on this child's GPU: its memory share
        argv = [sys.executable, str(Path(__file__).resolve()), *child_arguments(s.scope.argv), "--no-estimate",
                "--only", ",".join(ids), "--parallel-child", str(sharing)]
        env = dict(os.environ, **{PARALLEL_ENV: str(k)}, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}))
        # a session of its own: a Ctrl-C in the terminal reaches the parent alone, which forwards it once
        children.append((ids, subprocess.Popen(argv, env=env, start_new_session=True,
                                               preexec_fn=stop_with_parent)))
    failed, received = wait_for_children(children, ChildProgress(s))
    for exp in s.runs:
        if exp.run_id not in s.done and (rec := s.store.load(exp.run_id)) is not None:
            s.keep(rec)
    for ids, _ in children:                      # a stopped child's interrupted run is a point of its file
        part = s.out_dir / RunScope(only=ids).results_name()
        if part.exists():
            with contextlib.suppress(UserError, KeyError, TypeError):   # a half-written part: its
                obj = read_json_file(part, "")                          # finished runs are under runs/
                for p in obj["points"]:
                    if p["run_id"] not in s.records:
                        s.keep(p)
            part.unlink()
    if received or failed:
        save_partial_results(s)
        n_final = s.n_final()
        if failed:
            raise ParallelFailure(f"the process training {', '.join(failed[0])} failed with exit status "
                                  f"{failed[1]} (its error is above); the others stopped with checkpoints "
                                  f"saved; {s.results_file.name} holds {n_final} finished runs. Fix the cause "
                                  f"and rerun the same command to resume: {s.command}")
        raise RunInterrupted(received[0], f"interrupted by {signal.Signals(received[0]).name}; "
                             f"{s.results_file.name} holds {n_final} finished runs. Resume with the same "
                             f"command: {s.command}")
    return finish(s, f" with {len(groups)} processes at once")


def child_gpus(n_children: int) -> list[str | None]:
    """Each --parallel child's CUDA_VISIBLE_DEVICES: on a host with several GPUs, one each in turn (of those
    this process may see); with one GPU, None: every child shares it."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return [None] * n_children
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible
           else [str(i) for i in range(torch.cuda.device_count())])[:torch.cuda.device_count()]
    return [ids[i % len(ids)] for i in range(n_children)]


def stop_with_parent() -> None:
    """In a --parallel child, before it starts (Linux): SIGTERM when the parent dies, even by SIGKILL, so
    the child saves a checkpoint and stops instead of training on unwatched."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # 1 = PR_SET_PDEATHSIG


class ChildProgress:
    """What a sequential run says between runs, said by the --parallel parent as its children's records
    appear under runs/: the plan's progress, and the interim figures after each stable run."""

    def __init__(self, s: Session):
        self.s, self.seen = s, set(s.done)

    def __call__(self) -> None:
        s = self.s
        new = [e for e in s.runs if e.run_id not in self.seen and s.store.path(e.run_id).exists()]
        if not new:
            return
        self.seen.update(e.run_id for e in new)
        records = []
        for e in s.runs:
            with contextlib.suppress(UserError):
                rec = s.done.get(e.run_id) or (s.store.load(e.run_id) if e.run_id in self.seen else None)
                if rec is not None:
                    records.append(rec)
        done_ids = {r["run_id"] for r in records if r.get("status") in FINAL_STATUSES}
        if any(not e.branch_of for e in new) and any(e.run_id not in done_ids for e in s.runs):
            results = {**s.results(), "points": [point_row(r) for r in records]}
            draw_interim_figures(results, s.out_dir, len(s.runs), s.figures)
            s.tracker.study(results, s.out_dir)
        log(progress_line(plan_progress(s.runs, done_ids, set(), time.time() - s.t0, None)))


def wait_for_children(children: list,
                      between: Callable[[], None] = lambda: None) -> tuple[tuple | None, list[int]]:
    """Wait for every child, forwarding SIGINT/SIGTERM to them and calling `between` every 0.2 s; if one
    fails, stop the others (they save checkpoints). Returns (the failed child's (run ids, exit status) or
    None, the signals received)."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        log(f"received {signal.Signals(signum).name}: passing it on to the {len(children)} training processes "
            f"(each saves a checkpoint at its next step and stops)")
        for _, p in children:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed = None
    try:
        while any(p.poll() is None for _, p in children):
            for ids, p in children:
                if p.poll() not in (None, 0) and failed is None and not received:
                    failed = (ids, p.returncode)
                    log(f"parallel: the process training {', '.join(ids)} failed (exit status {p.returncode}); "
                        f"stopping the others (they save checkpoints)")
                    for _, q in children:
                        if q.poll() is None:
                            q.send_signal(signal.SIGTERM)
            between()
            time.sleep(0.2)
        between()                                # the records of the children's last runs
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if failed is None and not received:
        failed = next(((ids, p.returncode) for ids, p in children if p.returncode != 0), None)
    return failed, received


def leave_process_group(status: int) -> int:
    """Under torchrun: a failed rank leaves at once (os._exit) so torchrun sees the failure and stops the
    other ranks, instead of hanging in the process group's teardown. A finished rank destroys its process
    groups, then leaves with os._exit too, skipping interpreter shutdown: once in a CI run a finished rank
    aborted there ("terminate called without an active exception", SIGABRT) after every run was saved,
    most likely gloo threads of the control group, which the Distributed record still references."""
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return status
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 0:
        dist.destroy_process_group()
    os._exit(status)


def stdout_is_stderr() -> bool:
    try:
        a, b = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

# ----------------------------------------------------------------------------------------------------
# 9. fitting: power laws in N or D, the joint L(N, D), bootstrap intervals, hold-out checks,
#    compute-optimal allocation, predictions (pure functions, numpy and scipy only, no torch)
# ----------------------------------------------------------------------------------------------------

# Models marked on the figure. Parameter counts and token counts are the published (or, for GPT-4,
# rumoured) totals; our predictions are for this corpus and tokenizer, not these models' own losses.
REFERENCE_MODELS = {
    "params": [("GPT-2", 1.5e9), ("GPT-3", 175e9), ("GPT-4 (~1.8T, rumoured MoE)", 1.8e12)],
    "data": [("LLaMA", 1.4e12), ("Llama 2", 2e12), ("Llama 3", 15e12)],
}
# The stars of the figure: published models at their published (total N, training tokens D); the joint
# law's loss there is what "a model like that" means to the field. Our predictions are for this corpus
# and tokenizer, not these models' own losses.
REFERENCE_POINTS = [("GPT-3 175B", 175e9, 300e9), ("Chinchilla 70B", 70e9, 1.4e12), ("Llama 3 8B", 8e9, 15e12),
                    ("Llama 3 70B", 70e9, 15e12), ("Llama 3 405B", 405e9, 15.6e12)]
# Kaplan et al. 2020, nats on WebText2 with the GPT-2 tokenizer.
KAPLAN = {"params": (8.8e13, 0.076), "data": (5.4e13, 0.095)}
# Right edge of panels 1 and 2 (and of their 95% bands): GPT-4's rumoured N, Llama 3's D.
X_MAX = {"params": 1.8e12, "data": 15e12}

# Besiroglu et al. 2024 (the Chinchilla replication): Huber loss with this delta on log-loss residuals,
# summed over points; a mean would leave an objective so small that L-BFGS-B stops at its first step.
HUBER_DELTA = 1e-3
N_BOOTSTRAP = 1000                 # resamples over runs behind every 95% interval
BOOTSTRAP_SEED = 0
# The replication's grid of starts for the joint law, in (a, alpha, b, beta, e) with A = e^a, B = e^b,
# E = e^e: 6 x 5 x 6 x 5 x 5 = 4,500 starts. Every start's objective is evaluated (one vectorised pass);
# L-BFGS-B runs from the best JOINT_REFINED of them (each run costs 0.05-2 s, all 4,500 several minutes).
# On the Chinchilla data 3 of the best 8 reach the optimum that the best of 300 full runs reaches.
JOINT_GRID = {"a": np.arange(0, 30, 5.0), "alpha": np.arange(0, 2.5, 0.5), "b": np.arange(0, 30, 5.0),
              "beta": np.arange(0, 2.5, 0.5), "e": np.arange(-1, 1.5, 0.5)}
JOINT_REFINED = 8
# Rollout checks refit the laws once per cutoff: fewer resamples each, and at most this many cutoffs
# (evenly spaced, the largest always kept), so --fit-csv on Chinchilla's 240 runs stays fast.
ROLLOUT_BOOTSTRAP = 200
ROLLOUT_MAX_CUTOFFS = 6
# IsoFLOP profiles (Approach 2): a budget needs this many distinct sizes, the fit this many budgets.
ISOFLOP_MIN_SIZES = 3
ISOFLOP_INTERVAL_MIN_SIZES = 4     # a budget's own N_opt interval: a parabola through 3 sizes fits exactly
ISOFLOP_MIN_BUDGETS = 3
ISOFLOP_SPAN = 1.1                 # a binned budget's runs lie within this factor of its cheapest run's C
ISOFLOP_INTERPOLATED_BUDGETS = 5   # budgets placed when the runs' compute does not bin
ONE_VAR_REFINED = 12
# The joint law's bootstrap (_row_bootstrap): a row's shared noise is at least this times the
# within-row scatter when one seed per size cannot measure it, and a D column's own scatter is shrunk
# toward the pooled one with this many pseudo-points. Measured coverage: docs/fits.md.
ROW_NOISE_FLOOR = 1.0
ROW_COLUMN_PRIOR = 2.0
OPEN_SHARE = 0.025                 # more draws than this beyond a side of an interval: that side is open
UNIDENTIFIED = [None, None]        # the interval of a quantity the runs do not identify: both sides open
# The N of the joint law: every parameter (Chinchilla's count) or all but the embeddings (Kaplan's). The
# default, and the measurement behind it: docs/fits.md.
N_COUNTS = {"non-embedding": "N_nonembedding", "total": "N_total"}     # points-table columns
DEFAULT_N_COUNT = "total"


def power_law(x, a, b, c=0.0):
    """L(x) = c + a * x^-b."""
    return c + a * np.power(np.asarray(x, dtype=float), -b)


def joint_law(n_params, tokens, E, A, B, alpha, beta):
    """Chinchilla's L(N, D) = E + A / N^alpha + B / D^beta."""
    return E + A * np.power(np.asarray(n_params, dtype=float), -alpha) \
        + B * np.power(np.asarray(tokens, dtype=float), -beta)


def kaplan_law(x, sweep: str):
    xc, alpha = KAPLAN[sweep]
    return np.power(xc / np.asarray(x, dtype=float), alpha)


def huber(r, delta: float = HUBER_DELTA):
    """r^2/2 inside |r| <= delta, linear outside (scipy.special.huber's convention)."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


# The laws fitted here are all log L = logsumexp(a_1 - b_1 log x_1, ..., a_k - b_k log x_k [, e]):
# k = 1 with e is c + a x^-b, k = 1 without e is a x^-b, k = 2 with e is the joint L(N, D).
# theta = (a_1, b_1, ..., a_k, b_k[, e]); logx has shape (k, n).

def _log_law(theta, logx, with_e: bool):
    """log L for parameter rows theta (S, p) at points logx (k, n): returns log L (S, n) and the
    softmax shares of the terms (S, k [+1], n), which are the gradient of log L w.r.t. each term."""
    theta = np.atleast_2d(theta)
    k = logx.shape[0]
    terms = theta[:, 0:2 * k:2, None] - theta[:, 1:2 * k:2, None] * logx[None]     # (S, k, n)
    if with_e:
        e = np.broadcast_to(theta[:, -1, None, None], (theta.shape[0], 1, logx.shape[1]))
        terms = np.concatenate([terms, e], axis=1)
    top = terms.max(axis=1, keepdims=True)
    ex = np.exp(terms - top)
    total = ex.sum(axis=1, keepdims=True)
    return (top + np.log(total))[:, 0, :], ex / total


def _objective(theta, logx, logy, weights, with_e):
    """Summed (weighted) Huber loss of the log-loss residuals, and its gradient."""
    pred, share = _log_law(theta, logx, with_e)
    r = pred[0] - logy
    g = np.clip(r, -HUBER_DELTA, HUBER_DELTA) * weights                             # dHuber/dr
    k = logx.shape[0]
    grad = np.empty(len(theta))
    grad[0:2 * k:2] = share[0, :k] @ g
    grad[1:2 * k:2] = -(share[0, :k] * logx) @ g
    if with_e:
        grad[-1] = share[0, -1] @ g
    return float(huber(r) @ weights), grad


def _minimise(theta0, logx, logy, weights, with_e):
    res = minimize(_objective, np.asarray(theta0, dtype=float), args=(logx, logy, weights, with_e),
                   jac=True, method="L-BFGS-B")
    return res.x, float(res.fun)


def _fit_from_starts(starts, logx, logy, with_e, n_refined):
    """Evaluate every start, run L-BFGS-B from the best n_refined, keep the lowest objective, then
    polish it with _refine_batch (which only ever lowers the objective)."""
    starts = np.asarray(starts, dtype=float)
    pred, _ = _log_law(starts, logx, with_e)
    values = huber(pred - logy[None]).sum(axis=1)
    weights = np.ones_like(logy)
    best = None
    for i in np.argsort(values)[:n_refined]:
        theta, value = _minimise(starts[i], logx, logy, weights, with_e)
        if np.all(np.isfinite(theta)) and np.isfinite(value) and (best is None or value < best[1]):
            best = (theta, value)
    if best is None:
        return None
    theta, value = _refine_batch(best[0][None], logx, logy, weights[None], with_e)
    return theta[0], float(value[0])


def _jacobian(share, logx, with_e):
    """d log L / d theta (S, n, p) from the term shares of _log_law."""
    k = logx.shape[0]
    cols = []
    for j in range(k):
        cols += [share[:, j], -share[:, j] * logx[j]]
    if with_e:
        cols.append(share[:, -1])
    return np.stack(cols, axis=2)


def _damped_irls(theta, evaluate, irls_weights, max_iter: int = 200, from_finite_only: bool = False):
    """Iteratively reweighted least squares with Levenberg-Marquardt damping, for many rows of theta
    (S, p) at once: the loop of both joint fits. evaluate(theta_rows, idx) gives those rows' residuals
    (s, n), Jacobians (s, n, p) and objectives (s,); irls_weights(r, idx) the Huber weights of their
    residuals. A step is kept only where it lowers that row's objective; a row is done when a kept step
    gains (almost) nothing, or no damping makes progress. Returns (theta, objective)."""
    theta = np.array(theta, dtype=float)
    S, p = theta.shape
    r, J, f = evaluate(theta, np.arange(S))
    lam = np.full(S, 1e-3)
    active = np.isfinite(f) if from_finite_only else np.ones(S, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        Jt_u = J[idx].transpose(0, 2, 1) * irls_weights(r[idx], idx)[:, None, :]   # (s, p, n)
        H = Jt_u @ J[idx]                                                    # (s, p, p)
        g = (Jt_u @ r[idx][:, :, None])[:, :, 0]                             # gradient of the objective
        diag = np.diagonal(H, axis1=1, axis2=2) + 1e-12
        A = H + (lam[idx, None] * diag)[:, :, None] * np.eye(p)
        try:
            step = np.linalg.solve(A, -g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        new = theta[idx] + step
        new_r, new_J, new_f = evaluate(new, idx)
        better = np.isfinite(new_f) & (new_f <= f[idx])
        gain = np.where(better, f[idx] - new_f, 0.0)
        b = idx[better]
        theta[b], r[b], J[b], f[b] = new[better], new_r[better], new_J[better], new_f[better]
        lam[b] = np.maximum(lam[b] / 3, 1e-9)
        lam[idx[~better]] *= 4
        done = (better & (gain <= 1e-10 * np.maximum(f[idx], 1e-30))) | (lam[idx] > 1e8)
        active[idx[done]] = False
    return theta, f


def _refine_batch(theta, logx, logy, weights, with_e, max_iter: int = 200):
    """Minimise the weighted summed Huber objective for many rows at once: S weight vectors (n,) or
    (S, n), and one log-loss vector (n,) or one per row (S, n).

    L-BFGS-B with its default tolerances stops early on this objective when started at an optimum:
    with delta = 1e-3 almost every residual is in the linear part, the objective is nearly piecewise
    linear and a resample's first steps reduce it too little. Iteratively reweighted least squares
    (Huber weights min(1, delta/|r|)) with Levenberg-Marquardt damping converges there (_damped_irls),
    and runs all resamples in one vectorised loop."""
    theta = np.array(theta, dtype=float)
    S = theta.shape[0]
    logy = np.broadcast_to(logy, (S, logx.shape[1]))
    weights = np.broadcast_to(weights, (S, logx.shape[1]))

    def evaluate(rows, idx):
        pred, share = _log_law(rows, logx, with_e)
        r = pred - logy[idx]
        return r, _jacobian(share, logx, with_e), (huber(r) * weights[idx]).sum(axis=1)

    def irls_weights(r, idx):
        return weights[idx] * np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(r), 1e-300))
    return _damped_irls(theta, evaluate, irls_weights, max_iter)


def _bootstrap(theta_hat, logx, logy, with_e, n_boot, seed, min_distinct):
    """Refit on n_boot resamples of the points (runs), each started from the full-data optimum.

    A resample whose points take fewer than `min_distinct` distinct values along some axis cannot
    identify the law; such resamples are drawn again. Returns the parameter rows (S, p), or None with
    a reason when too few resamples can identify the law."""
    if n_boot < 1:
        return None, "no bootstrap resamples asked for"
    rng = np.random.default_rng(seed)
    n = len(logy)
    kept, tries = [], 0
    while sum(len(c) for c in kept) < n_boot and tries < 20 * n_boot:
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        tries += n_boot
        ok = np.ones(n_boot, dtype=bool)
        for lx in logx:
            values, inverse = np.unique(lx, return_inverse=True)
            per_value = counts @ (inverse[:, None] == np.arange(len(values)))  # (n_boot, distinct values)
            ok &= (per_value > 0).sum(axis=1) >= min_distinct
        kept.append(counts[ok])
    counts = np.concatenate(kept)[:n_boot].astype(float)
    if len(counts) < max(20, n_boot // 2):
        return None, f"only {len(counts)} of {tries} resamples could identify the law"
    theta, f = _refine_batch(np.repeat(np.asarray(theta_hat, dtype=float)[None], len(counts), 0),
                             logx, logy, counts, with_e)
    good = np.all(np.isfinite(theta), axis=1) & np.isfinite(f)
    return theta[good], None


def row_index(rows, n: int) -> np.ndarray:
    """Each point's row as an integer 0..R-1 (first-seen order); None: every point its own row."""
    if rows is None:
        return np.arange(n)
    labels: dict = {}
    return np.array([labels.setdefault(r, len(labels)) for r in rows], dtype=int)


def cell_index(logx) -> np.ndarray:
    """Each point's (N, D) cell as an integer (log N, log D rounded to 6 decimals): the points of one
    cell are replicates, seeds of the same run."""
    return np.unique(np.round(np.asarray(logx), 6), axis=1, return_inverse=True)[1].ravel()


def noise_components(theta_hat, logx, logy, row, with_e: bool = True) -> dict:
    """The log-loss noise of a fit, split into a part shared by a row's points, a part shared by an (N, D)
    cell's points (measured only where a cell has replicates: seeds) and a part of each point.

    A WSD row (a stable run and its cooldown branches) shares one initialisation and data order, so
    one seed's luck moves the whole row. Method of moments on the residuals r = M y, M = I - H the
    annihilator of the fit's linearisation (H = J J^+), r the least-squares residuals: with noise
    covariance sb^2 ZZ' + sw^2 I (Z the row indicators), E[r'r] = sb^2 tr(M ZZ') + sw^2 tr(M) and
    E[r'ZZ'r] = sb^2 tr(ZZ'M ZZ'M) + sw^2 tr(ZZ'M). M accounts for what the fit absorbs: a row at its
    own N is mostly absorbed by the N term, which is why one seed can hardly see sb (`row_noise_measured`
    False) and a floor is used. Each point's own sd is its D column's (r^2 / M_jj over the column,
    shrunk toward the pooled within-row value with ROW_COLUMN_PRIOR pseudo-points) where that is larger,
    so early (short, noisy) horizons keep their larger scatter.

    With replicated cells the law's lack of fit at a cell is shared by its seeds, and the covariance
    gains sc^2 CC' (C the cell indicators): _shared_components solves for sb, sc and sw together
    (for sc and sw alone when no row has several points).
    The column sds then come from what is left after removing every row and cell offset (_column_sds),
    the seeds' own scatter: the residuals about the law hold the misfit, which the cell offset
    already draws, and counting it again per point would double it. Without replicates `cell_sd_log`
    is 0 and everything is as it was before the cell component existed."""
    fitted, share = _log_law(theta_hat, logx, with_e)
    n = len(logy)
    J = _jacobian(share, logx, with_e)[0]                                    # (n, p)
    M = np.eye(n) - J @ np.linalg.pinv(J)
    # the least-squares residuals of the linearised law: a Huber fit leaves some residuals at 0 and
    # others large, which the moment equations (written for r = M y) would misread
    r = M @ (logy - fitted[0])
    Z = (row[:, None] == np.arange(row.max() + 1)[None]).astype(float)       # (n, R)
    cell = cell_index(logx)
    C = (cell[:, None] == np.arange(cell.max() + 1)[None]).astype(float)     # (n, cells)
    grouped = np.bincount(row).max() > 1
    replicated = np.bincount(cell).max() > 1
    col = np.unique(np.round(logx[-1], 6), return_inverse=True)[1]
    if replicated:
        # without rows of several points a row is a point: its offset is the within part
        shared = _shared_components(M, r, [Z @ Z.T, C @ C.T] if grouped else [C @ C.T])
        (sb2, sc2), sw2 = (shared[:2] if grouped else (0.0, shared[0])), shared[-1]
        point_sd = _column_sds(logy, np.hstack([Z, C]) if grouped else C, col, sw2)
    else:
        sb2, sw2 = _two_components(M, r, Z @ Z.T, grouped)
        sc2 = 0.0
        m_jj = np.maximum(np.diag(M), 1e-6)
        k = np.bincount(col).astype(float)
        col_var = np.bincount(col, r * r / m_jj) / k
        shrunk = (k * col_var + ROW_COLUMN_PRIOR * sw2) / (k + ROW_COLUMN_PRIOR)
        point_sd = np.sqrt(np.maximum(shrunk[col], sw2))
    # one seed per size: a row's offset and the law's N term are the same direction, so sb is floored
    n_of_row = np.exp(logx[0])[np.unique(row, return_index=True)[1]]
    measured = bool(grouped and len(np.unique(n_of_row)) < row.max() + 1)
    floor2 = ROW_NOISE_FLOOR ** 2 * sw2 if grouped and not measured else 0.0
    return {"row_sd_log": float(np.sqrt(max(sb2, floor2))), "row_sd_log_estimated": float(np.sqrt(sb2)),
            "row_noise_measured": measured, "row_noise_floored": bool(floor2 > sb2),
            "point_sd_log": point_sd, "within_sd_log": float(np.sqrt(sw2)), "n_rows": int(row.max() + 1),
            "grouped": bool(grouped), "cell_sd_log": float(np.sqrt(sc2)), "cell_noise_measured": bool(replicated)}


def _two_components(M, r, ZZ, grouped: bool) -> tuple[float, float]:
    """(sb^2, sw^2) from r'r and r'ZZ'r; without rows of several points, (0, r'r / tr M). Where sw^2
    comes out negative the first equation alone gives sb^2 and sw^2 falls back to the pooled value."""
    tr_m = max(np.trace(M), 1e-12)
    pooled = float(r @ r / tr_m)
    sb2, sw2 = 0.0, pooled
    if grouped:
        lhs = np.array([[np.trace(M @ ZZ), tr_m], [np.trace(ZZ @ M @ ZZ @ M), np.trace(ZZ @ M)]])
        rhs = np.array([r @ r, r @ ZZ @ r])
        try:
            sb2, sw2 = np.linalg.solve(lhs, rhs)
        except np.linalg.LinAlgError:
            sb2, sw2 = 0.0, pooled
        if sw2 <= 0:                       # everything looks shared: the first equation alone gives sb
            sb2, sw2 = pooled * tr_m / max(np.trace(M @ ZZ), 1e-12), 0.0
        sb2, sw2 = max(float(sb2), 0.0), max(float(sw2), 0.0)
        if sw2 == 0.0:
            sw2 = pooled
    return sb2, sw2


def _shared_components(M, r, shared: list) -> list[float]:
    """The variances of noise covariance sum_k s_k^2 G_k + sw^2 I, G_k the `shared` ZZ'-like matrices
    (rows, cells), from E[r'Q r] = tr(Q M Sigma M) for Q in (*shared, I): [s_1^2, ..., sw^2]. A shared
    component that comes out negative is dropped, the most negative first, with its own equation, and
    the smaller system solved again; the within part is never dropped, only clipped at 0 (replicates
    measure it directly)."""
    G = [*shared, np.eye(len(r))]
    lhs = np.array([[np.trace(Q @ M @ S @ M) for S in G] for Q in G])
    rhs = np.array([r @ Q @ r for Q in G])
    keep = list(range(len(G)))
    while True:
        s = np.zeros(len(G))
        s[keep] = np.linalg.lstsq(lhs[np.ix_(keep, keep)], rhs[keep], rcond=None)[0]
        negative = [i for i in keep[:-1] if s[i] < 0]
        if not negative:
            return [max(float(v), 0.0) for v in s]
        keep.remove(min(negative, key=lambda i: s[i]))


def _column_sds(logy, shared, col, sw2: float) -> np.ndarray:
    """Each point's sd with replicated cells: its D column's scatter about every row and cell offset
    (the residuals e = M2 y, M2 the annihilator of the row and cell indicators `shared`, which also
    spans the law: E[e_j^2] = sw^2 M2_jj), sum e^2 / sum M2_jj over the column, shrunk toward sw^2
    with ROW_COLUMN_PRIOR pseudo-points, where that is larger than sw^2."""
    M2 = np.eye(len(logy)) - shared @ np.linalg.pinv(shared)
    e = M2 @ logy
    dof = np.bincount(col, np.clip(np.diag(M2), 0.0, None))
    col_var = np.bincount(col, e * e) / np.maximum(dof, 1e-12)
    shrunk = (dof * col_var + ROW_COLUMN_PRIOR * sw2) / (dof + ROW_COLUMN_PRIOR)
    return np.sqrt(np.maximum(shrunk[col], sw2))


def synthetic_log_losses(fitted, row, noise: dict, n_boot: int, rng, cell=None) -> np.ndarray:
    """n_boot synthetic data sets (n_boot, n): the fitted log-losses plus a normal offset per row (sd
    noise['row_sd_log'], shared by a stable run and its branches) plus one per point (its sd), plus,
    where noise['cell_sd_log'] > 0, one per (N, D) cell (`cell`, cell_index of the points), shared by
    a cell's seeds. The cell offsets are drawn after the others, so without them the draws are the
    same as they were before cells existed."""
    shared = rng.standard_normal((n_boot, row.max() + 1))[:, row] * noise["row_sd_log"]
    out = fitted + shared + rng.standard_normal((n_boot, len(fitted))) * noise["point_sd_log"]
    if noise.get("cell_sd_log", 0.0) > 0:
        out = out + rng.standard_normal((n_boot, cell.max() + 1))[:, cell] * noise["cell_sd_log"]
    return out


def _row_bootstrap(theta_hat, logx, logy, row, with_e, n_boot, seed):
    """Refit on n_boot synthetic data sets at the runs' own (N, D): the fitted log-loss plus a normal
    offset per row (sd noise_components' row_sd_log, shared by a stable run and its branches) plus a
    normal offset per point (its column's sd), each refit started from the full-data optimum. Returns
    the parameter rows (S, p) (non-finite refits kept as NaN rows, so a caller can count them), the
    noise components, and None or a reason."""
    if n_boot < 1:
        return None, None, "no bootstrap resamples asked for"
    theta_hat = np.asarray(theta_hat, dtype=float)
    n, p = len(logy), len(theta_hat)
    if n <= p:
        return None, None, f"{n} points leave no degree of freedom for {p} parameters"
    noise = noise_components(theta_hat, logx, logy, row, with_e)
    fitted = _log_law(theta_hat, logx, with_e)[0][0]
    synthetic = synthetic_log_losses(fitted, row, noise, n_boot, np.random.default_rng(seed), cell_index(logx))
    theta, f = _refine_batch(np.repeat(theta_hat[None], n_boot, 0), logx, synthetic, np.ones(n), with_e)
    theta[~(np.all(np.isfinite(theta), axis=1) & np.isfinite(f))] = np.nan
    return theta, noise, None


def _interval(samples, n_missing: int = 0) -> list[float | None] | None:
    """2.5th and 97.5th percentiles over every draw, none dropped: a draw without a value (NaN: no
    optimum, a failed refit; `n_missing` more of them) counts as beyond both ends, +-inf beyond its
    own. A side with more than 2.5% of draws beyond it is None ("unbounded"): the interval is open
    there. None without draws."""
    x = np.concatenate([np.asarray(samples, dtype=float).ravel(), np.full(int(n_missing), np.nan)])
    if x.size == 0 or np.isnan(x).all():
        return None
    with np.errstate(invalid="ignore"):
        lo = np.percentile(np.where(np.isnan(x), -np.inf, x), 2.5)
        hi = np.percentile(np.where(np.isnan(x), np.inf, x), 97.5)
    return [float(lo) if np.isfinite(lo) else None, float(hi) if np.isfinite(hi) else None]


def is_open(ci) -> bool:
    """An interval with a side reported unbounded (None)."""
    return bool(ci) and (ci[0] is None or ci[1] is None)


def _percentiles(samples) -> list[float] | None:
    """2.5th and 97.5th percentiles of the finite draws (a draw can be NaN where, say, an exponent at
    its bound of 0 leaves no compute-optimal point); None when no draw is finite."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def clean_points(columns: dict, loss) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    """Keep the points whose every column and loss are finite and positive. Returns the kept columns,
    losses, the kept mask and one note per reason a point was dropped."""
    loss = np.asarray([np.nan if v is None else v for v in loss], dtype=float)
    ok = np.isfinite(loss) & (loss > 0)
    notes = []
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} point(s) without a finite positive loss (diverged or missing) "
                     f"left out")
    for name, values in columns.items():
        v = np.asarray([np.nan if t is None else t for t in values], dtype=float)
        bad = ok & ~(np.isfinite(v) & (v > 0))
        if bad.any():
            notes.append(f"{int(bad.sum())} point(s) with a non-positive or non-finite {name} left out")
        ok &= ~bad
    kept = {name: np.asarray([np.nan if t is None else t for t in values], dtype=float)[ok]
            for name, values in columns.items()}
    return kept, loss[ok], ok, notes


def residual_std_log(log_pred, log_loss, n_params: int) -> float | None:
    """The observation noise of a fit: the standard deviation of its log-loss residuals with the
    degrees-of-freedom correction sqrt(sum r^2 / (n - p)); None without a degree of freedom."""
    r = np.asarray(log_loss, dtype=float) - np.asarray(log_pred, dtype=float)
    dof = len(r) - n_params
    return float(np.sqrt(np.sum(r * r) / dof)) if dof > 0 else None


def with_noise(draws, sigma_log: float | None, seed: int = BOOTSTRAP_SEED):
    """Bootstrap draws of the law's L (S, n) times exp(sigma z), z standard normal: draws of a new
    observation, whose percentiles are the prediction interval (fit uncertainty plus the scatter of
    one run). None without draws or without a noise estimate."""
    if draws is None or sigma_log is None:
        return None
    z = np.random.default_rng(seed).standard_normal(np.shape(draws))
    return np.asarray(draws) * np.exp(sigma_log * z)


def _unavailable(reason: str, n_points: int, **extra) -> dict:
    return {"available": False, "reason": reason, "n_points": int(n_points), **extra}


def fit_power_law(x, y, n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Robust fit of L = c + a x^-b, with 95% bootstrap intervals.

    Objective: the summed Huber loss (delta 1e-3) of log L residuals, as in the Chinchilla replication;
    35 starts over (b, c), the best 12 refined by L-BFGS-B. With 3 distinct x or fewer, c + a x^-b is
    exactly determined, so the two-parameter L = a x^-b is fitted instead and the note says so.
    Intervals: percentile bootstrap over points (runs), warm-started refits; none when the law has no
    degree of freedom left. The returned dict holds the bootstrap rows under `_samples` (theta in units
    of `_x_ref`) for bands and predictions; callers drop keys starting with '_' before writing JSON.
    `available` is False with a `reason` when the points cannot be fitted."""
    cols, ys, _, notes = clean_points({"x": x}, y)
    xs = cols["x"]
    n = int(len(xs))
    if n < 2 or len(np.unique(xs)) < 2:
        return _unavailable(f"needs at least 2 distinct usable points, got {len(np.unique(xs))}"
                            + (f" ({'; '.join(notes)})" if notes else ""), n)
    if np.ptp(np.log(ys)) < 1e-9:
        return _unavailable(f"all {n} losses are equal ({ys[0]:.4g}): there is no trend to fit", n)
    three = len(np.unique(xs)) > 3
    x_ref = float(np.exp(np.mean(np.log(xs))))            # fit in units of the geometric mean of x
    logx = np.log(xs / x_ref)[None, :]
    logy = np.log(ys)
    if three:
        starts = []
        for b0 in (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5):
            for cfrac in (1e-3, 0.3, 0.6, 0.85, 0.95):
                c0 = cfrac * ys.min()
                starts.append([np.log(max(ys.mean() - c0, 1e-6)), b0, np.log(c0)])
    else:
        slope, intercept = np.polyfit(logx[0], logy, 1)
        starts = [[intercept, -slope], [np.log(ys.mean()), 0.1], [np.log(ys.mean()), 0.5]]
    best = _fit_from_starts(starts, logx, logy, three, ONE_VAR_REFINED)
    if best is None:
        return _unavailable("the optimiser did not converge from any start", n)
    theta = best[0]
    n_par = 3 if three else 2
    a, b, c = _one_var_params(theta[None], x_ref, three)
    pred = power_law(xs, a[0], b[0], c[0])
    sse = float(np.sum((pred - ys) ** 2))
    sst = float(np.sum((ys - ys.mean()) ** 2))
    notes = ([] if three else [f"{n} points with {len(np.unique(xs))} distinct x exactly determine "
                                f"c + a x^-b; fitted a x^-b (c = 0)"]) + notes
    fit = {"available": True, "law": "L = c + a * x^-b" if three else "L = a * x^-b",
           "form": "three_parameter" if three else "two_parameter",
           "a": float(a[0]), "b": float(b[0]), "c": float(c[0]), "r2": 1 - sse / sst,
           "n_points": n, "dof": n - n_par, "n_bootstrap": 0,
           "residual_std_log": residual_std_log(np.log(pred), logy, n_par),
           "method": f"Huber (delta {HUBER_DELTA:g}, summed) on log-loss residuals, L-BFGS-B from the "
                     f"best {min(ONE_VAR_REFINED, len(starts))} of {len(starts)} starts; 95% CI: percentile bootstrap over runs, seed {seed}, "
                     f"refits warm-started from the full-data optimum",
           "ci95": {"a": None, "b": None, "c": None}, "_x_ref": x_ref, "_with_e": three}
    fit["c_at_bound"] = bool(three and c[0] < 1e-3 * ys.min())
    if fit["c_at_bound"]:
        notes.append("c fell to its bound 0: these runs do not identify an irreducible loss, so far "
                     "extrapolations keep falling toward 0; read them as a pure power law's, likely too low")
    if n - n_par < 1:
        notes.append("no degree of freedom left: no interval can be estimated")
    else:
        samples, why = _bootstrap(theta, logx, logy, three, n_bootstrap, seed, n_par)
        if samples is None:
            notes.append(f"no interval: {why}")
        else:
            sa, sb, sc = _one_var_params(samples, x_ref, three)
            fit["ci95"] = {"a": _percentiles(sa), "b": _percentiles(sb),
                           "c": _percentiles(sc) if three else [0.0, 0.0]}
            fit["n_bootstrap"] = int(len(samples))
            fit["_samples"] = samples
            if n - n_par < 3:
                notes.append(f"only {n - n_par} degree(s) of freedom: the intervals are rough")
    fit["note"] = "; ".join(notes) or None
    return fit


def _one_var_params(theta, x_ref, with_e):
    """(a, b, c) in units of x from fitted rows theta = (log a', b[, log c]) in units of x_ref."""
    b = theta[:, 1]
    a = np.exp(theta[:, 0]) * np.power(x_ref, b)        # a' (x / x_ref)^-b = a' x_ref^b x^-b
    c = np.exp(theta[:, 2]) if with_e else np.zeros(len(theta))
    return a, b, c


def law_samples(fit: dict, x) -> np.ndarray | None:
    """Bootstrap draws of a one-variable fit's L at x: (S, len(x)), or None without samples."""
    if not fit.get("available") or fit.get("_samples") is None:
        return None
    logx = np.log(np.asarray(x, dtype=float).reshape(1, -1) / fit["_x_ref"])
    return np.exp(_log_law(fit["_samples"], logx, fit["_with_e"])[0])


def band95(fit: dict, x) -> dict | None:
    """The 95% band of a fitted law over x: {'x', 'lo', 'hi'}, None without bootstrap samples."""
    draws = law_samples(fit, x)
    if draws is None:
        return None
    lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
    return {"x": [float(v) for v in x], "lo": lo.tolist(), "hi": hi.tolist()}


def fit_joint_law(n_params, tokens, loss, n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                  rows=None) -> dict:
    """Chinchilla Approach 3 as the replication does it: log L = logsumexp(a - alpha log N,
    b - beta log D, e), summed Huber (delta 1e-3) on log-loss residuals, L-BFGS-B from the grid of
    starts (JOINT_GRID), lowest objective kept; intervals from _row_bootstrap, which draws noise
    shared by each row (`rows`: one label per point, the stable run a point belongs to; None: every
    point its own row, independent noise). `_samples` holds the finite parameter draws (a, alpha, b,
    beta, e), `n_bootstrap_failed` the refits that gave none (counted as open in every interval).
    Unavailable, with the reason, when the runs cannot identify five parameters."""
    cols, ys, kept, notes = clean_points({"N": n_params, "D": tokens}, loss)
    row = row_index(None if rows is None else [r for r, k in zip(rows, kept) if k], int(kept.sum()))
    N, D = cols["N"], cols["D"]
    n = int(len(ys))
    n_distinct = (len(np.unique(N)), len(np.unique(D)))
    if n_distinct[0] < 3 or n_distinct[1] < 3 or n < 6:
        return _unavailable(f"the joint law has 5 parameters and needs at least 3 distinct N, 3 distinct D "
                            f"and 6 runs; got {n_distinct[0]} distinct N, {n_distinct[1]} distinct D, "
                            f"{n} usable runs" + (f" ({'; '.join(notes)})" if notes else ""), n)
    if np.ptp(np.log(ys)) < 1e-9:
        return _unavailable(f"all {n} losses are equal ({ys[0]:.4g}): there is no trend to fit", n)
    logx = np.log(np.vstack([N, D]))
    logy = np.log(ys)
    g = JOINT_GRID
    grid = np.array(np.meshgrid(g["a"], g["alpha"], g["b"], g["beta"], g["e"], indexing="ij")).reshape(5, -1).T
    best = _fit_from_starts(grid, logx, logy, True, JOINT_REFINED)
    if best is None:
        return _unavailable("the optimiser did not converge from any start", n)
    theta = best[0]
    E, A, B, alpha, beta = _joint_params(theta[None])
    pred = joint_law(N, D, E[0], A[0], B[0], alpha[0], beta[0])
    sse, sst = float(np.sum((pred - ys) ** 2)), float(np.sum((ys - ys.mean()) ** 2))
    fit = {"available": True, "law": "L = E + A / N^alpha + B / D^beta",
           "E": float(E[0]), "A": float(A[0]), "B": float(B[0]), "alpha": float(alpha[0]),
           "beta": float(beta[0]), "N_opt_exponent": float(beta[0] / (alpha[0] + beta[0])),
           "r2": 1 - sse / sst, "n_points": n, "dof": n - 5,
           "residual_std_log": residual_std_log(np.log(pred), logy, 5),
           "n_distinct_N": n_distinct[0], "n_distinct_D": n_distinct[1],
           "huber_objective": best[1], "n_bootstrap": 0,
           "method": f"log-sum-exp form, Huber (delta {HUBER_DELTA:g}, summed) on log-loss residuals, "
                     f"L-BFGS-B from the best {JOINT_REFINED} of a {len(grid)}-start grid (Besiroglu et al. "
                     f"2024); 95% CI: percentile parametric bootstrap at the runs' own N and D, seed {seed}, "
                     f"refits started from the full-data optimum; " + (
                         "noise drawn per row (a stable run and its cooldown branches share one normal "
                         "offset) plus per point (its D column's scatter)" if rows is not None else
                         "points taken as independent (no rows given), each with its D column's scatter"),
           "ci95": {k: None for k in ("E", "A", "B", "alpha", "beta")}}
    fit["E_at_bound"] = bool(E[0] < 1e-3 * ys.min())
    if fit["E_at_bound"]:
        notes.append("E fell to its bound 0: these runs do not identify an irreducible loss, so the "
                     "compute-optimal allocation and far predictions are not trustworthy")
    samples, noise, why = _row_bootstrap(theta, logx, logy, row, True, n_bootstrap, seed)
    if samples is None:
        notes.append(f"no interval: {why}")
    else:
        _add_joint_intervals(fit, samples, noise, ys.min(), notes)
    fit["note"] = "; ".join(notes) or None
    return fit


def _add_joint_intervals(fit: dict, samples, noise: dict, min_loss: float, notes: list) -> None:
    """fit_joint_law's intervals from its bootstrap draws (S, 5) (NaN rows: failed refits, counted
    open), the noise they were drawn with and what they are conditional on; E, alpha, beta and the
    allocation reported open when too many draws put E at its bound (a note added)."""
    good = np.all(np.isfinite(samples), axis=1)
    failed = int((~good).sum())
    samples = samples[good]
    cols = dict(zip(("E", "A", "B", "alpha", "beta"), _joint_params(samples)))
    fit["ci95"] = {k: _interval(v, failed) for k, v in cols.items()}
    fit["N_opt_exponent_ci95"] = _interval(cols["beta"] / (cols["alpha"] + cols["beta"]), failed)
    fit["n_bootstrap"] = int(len(samples))
    fit["n_bootstrap_failed"] = failed
    fit["_samples"] = samples
    fit["noise"] = {k: v for k, v in noise.items() if k != "point_sd_log"} | {
        "point_sd_log_range": [float(noise["point_sd_log"].min()), float(noise["point_sd_log"].max())]}
    fit["conditional_on"] = intervals_conditional_on(noise)
    if noise["cell_noise_measured"]:
        fit["method"] += (", plus one per (N, D) cell shared by its seeds (the law's misfit there, "
                          "measured across the seeds)")
    # E at its bound in many draws: the runs cannot place the floor, so neither the exponents
    unidentified = float(np.mean(cols["E"] < 1e-3 * min_loss)) if len(samples) else 1.0
    fit["draws_E_at_bound"] = unidentified
    if unidentified > OPEN_SHARE:
        fit["unidentified"] = ["E", "alpha", "beta", "N_opt_exponent"]
        fit["ci95"].update(E=UNIDENTIFIED, alpha=UNIDENTIFIED, beta=UNIDENTIFIED)
        fit["N_opt_exponent_ci95"] = UNIDENTIFIED
        notes.append(f"{unidentified:.0%} of the bootstrap draws put E at its bound 0: the runs do not "
                     f"identify the floor, so E, alpha, beta and the allocation are reported open")


def intervals_conditional_on(noise: dict) -> str:
    """What the joint law's intervals assume, in one sentence for the log and results.json."""
    cell = (f"a cell-shared misfit of {noise['cell_sd_log']:.2%} measured across seeds (the law's lack of fit "
            f"at each (N, D), the same for its seeds), " if noise.get("cell_noise_measured") else "")
    if not noise["grouped"]:
        return (f"the fitted form, {cell}and independent noise per run (no run shares a seed row with "
                f"another), with each D column's own scatter")
    row = (f"a row-shared noise of {noise['row_sd_log']:.2%} measured across seeds" if noise["row_noise_measured"]
           else f"a row-shared noise of {noise['row_sd_log']:.2%} (one seed per size cannot measure it; "
                f"{'floored at ' + format(ROW_NOISE_FLOOR, 'g') + 'x the within-row scatter' if noise['row_noise_floored'] else 'estimated from the residuals'})")
    return (f"the fitted form, {row}, {cell}and per-run noise of {noise['within_sd_log']:.2%} or its D column's "
            f"larger scatter")


def interval_coverage(truth: dict, n_params, tokens, noise_sd: float | None, n_sets: int,
                      n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED, rows=None, noise=None,
                      flops: float = 1e18) -> dict:
    """How often the joint fit's nominal 95% intervals of alpha, beta, a = beta/(alpha+beta) and tokens
    per parameter at `flops` (C = 6 N D) hold the truth, over n_sets synthetic data sets
    loss = L(N, D) * exp(noise) at the points (n_params, tokens). The noise is noise_sd z per point, or
    noise(rng) (a log-noise vector, e.g. shared by `rows`); `rows` is passed to the fit. An interval
    with an open side counts as covering on that side; `open` counts the sets that reported one.
    Set i draws its noise and its bootstrap from seed + i."""
    n_params, tokens = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
    clean = joint_law(n_params, tokens, **truth)
    n_opt, d_opt, _ = compute_optimal_allocation(**truth, flops=flops)
    true = {"alpha": truth["alpha"], "beta": truth["beta"],
            "N_opt_exponent": truth["beta"] / (truth["alpha"] + truth["beta"]),
            "tokens_per_parameter": float(d_opt.item() / n_opt.item())}
    covered, opened, widths = dict.fromkeys(true, 0), dict.fromkeys(true, 0), {k: [] for k in true}
    for i in range(n_sets):
        rng = np.random.default_rng(seed + i)
        loss = clean * np.exp(noise(rng) if noise else rng.normal(0, noise_sd, len(clean)))
        fit = fit_joint_law(n_params, tokens, loss, n_bootstrap, seed + i, rows=rows)
        intervals = {**fit["ci95"], "N_opt_exponent": fit.get("N_opt_exponent_ci95"),
                     "tokens_per_parameter": None}
        if fit.get("_samples") is not None:
            E, A, B, al, be = _joint_params(fit["_samples"])
            nd = compute_optimal_allocation(E, A, B, al, be, flops)
            intervals["tokens_per_parameter"] = _interval(nd[1][:, 0] / nd[0][:, 0], fit["n_bootstrap_failed"])
            if "N_opt_exponent" in fit.get("unidentified", []):
                intervals["tokens_per_parameter"] = [None, None]
        for k, v in true.items():
            ci = intervals[k]
            covered[k] += bool(ci and (ci[0] is None or ci[0] <= v) and (ci[1] is None or v <= ci[1]))
            opened[k] += is_open(ci)
            if ci and not is_open(ci):
                widths[k].append(ci[1] / ci[0] if k == "tokens_per_parameter" else ci[1] - ci[0])
    return {"n_sets": n_sets, "noise_sd": noise_sd, "n_points": len(clean), "covered": covered,
            "coverage": {k: c / n_sets for k, c in covered.items()}, "open": opened,
            "median_width": {k: float(np.median(w)) if w else None for k, w in widths.items()}}


def _joint_params(theta):
    """(E, A, B, alpha, beta) from rows theta = (a, alpha, b, beta, e)."""
    with np.errstate(over="ignore"):        # a wild bootstrap draw's inf is left out of every interval
        return np.exp(theta[:, 4]), np.exp(theta[:, 0]), np.exp(theta[:, 2]), theta[:, 1], theta[:, 3]


def joint_samples(fit: dict, n_params, tokens) -> np.ndarray | None:
    """Bootstrap draws of the joint law's L at points (N, D): (S, n), or None without samples."""
    if not fit.get("available") or fit.get("_samples") is None:
        return None
    logx = np.log(np.vstack([np.atleast_1d(n_params), np.atleast_1d(tokens)]).astype(float))
    with np.errstate(over="ignore"):        # a wild draw's inf is left out of every interval
        return np.exp(_log_law(fit["_samples"], logx, True)[0])


# --- several studies with one floor: each recipe's joint law, E shared (compare_quick_vs_real --a/--b) --
# theta = (a_1, alpha_1, b_1, beta_1, ..., a_m, alpha_m, b_m, beta_m, e): 4 m + 1 columns.
# Huber's constant on residuals in units of the noise sd: 95% of least squares' efficiency under normal
# noise, where HUBER_DELTA (about 0.1 sd at 1% noise) is least absolute deviations (64%). docs/fits.md.
SHARED_FLOOR_HUBER_C = 1.345


def _study_theta(theta, s: int) -> np.ndarray:
    """Study s's rows (a, alpha, b, beta, e) of the shared-floor parameter rows theta (S, 4 m + 1)."""
    return np.concatenate([theta[:, 4 * s:4 * s + 4], theta[:, -1:]], axis=1)


def _shared_floor_law(theta, logxs) -> tuple[np.ndarray, np.ndarray]:
    """log L of every study's points, concatenated in study order (S, n), and its Jacobian in the shared
    columns (S, n, 4 m + 1): a study's points depend on its own four columns and on e."""
    theta = np.atleast_2d(theta)
    preds, jacs = [], []
    for s, logx in enumerate(logxs):
        pred, share = _log_law(_study_theta(theta, s), logx, True)
        own = _jacobian(share, logx, True)                                   # (S, n_s, 5)
        J = np.zeros((theta.shape[0], logx.shape[1], theta.shape[1]))
        J[:, :, 4 * s:4 * s + 4] = own[:, :, :4]
        J[:, :, -1] = own[:, :, 4]
        preds.append(pred)
        jacs.append(J)
    return np.concatenate(preds, axis=1), np.concatenate(jacs, axis=1)


def _refine_shared_floor(theta, logxs, logy, scale=1.0, delta: float = HUBER_DELTA, max_iter: int = 200):
    """_refine_batch's damped, Huber-reweighted Gauss-Newton (_damped_irls) for the shared-floor law:
    every row of theta (S, p) against its own log losses (S, n) or one vector (n,); the objective is
    sum huber(r / scale, delta) (scale: one log-loss scale, or one per point). Returns (theta, objective)."""
    theta = np.array(theta, dtype=float)
    n = sum(logx.shape[1] for logx in logxs)
    logy = np.broadcast_to(logy, (theta.shape[0], n))
    scale = np.broadcast_to(np.asarray(scale, dtype=float), (n,))

    def evaluate(rows, idx):
        with np.errstate(over="ignore", invalid="ignore"):
            pred, J = _shared_floor_law(rows, logxs)
            r = pred - logy[idx]
            return r, J, huber(r / scale, delta).sum(axis=1)

    def irls_weights(r, idx):
        return np.minimum(1.0, delta * scale / np.maximum(np.abs(r), 1e-300)) / scale ** 2
    return _damped_irls(theta, evaluate, irls_weights, max_iter, from_finite_only=True)


def fit_joint_laws_shared_floor(studies: list[dict], n_bootstrap: int = N_BOOTSTRAP,
                                seed: int = BOOTSTRAP_SEED, huber_c: float | None = SHARED_FLOOR_HUBER_C) -> dict:
    """The joint laws L_s = E + A_s / N^alpha_s + B_s / D^beta_s of several studies fitted together with
    one irreducible loss E (recipes trained on the same corpus and tokenizer share its entropy floor; the
    caller checks that they do). `studies`: each a dict with 'N', 'D', 'loss' lists and 'rows' (as for
    fit_joint_law) and 'theta', the study's own fit (a, alpha, b, beta, e) to start from.

    The fit minimises a summed Huber objective over every study's points, started from each study's
    own fit with e set to each study's e and to their mean: first with delta HUBER_DELTA on log-loss
    residuals, then (huber_c not None) with delta huber_c on residuals in units of each study's noise sd
    as measured about that first fit. The interval is fit_joint_law's parametric bootstrap done for all studies
    at once: each study's synthetic losses are its fitted ones plus noise drawn from its own residuals
    (noise_components about its law in the shared fit: a row part and a per-point part), and every draw
    refits all studies together with the same objective, so draw i holds a law of each study.
    `_samples` holds the draws (S, 4 m + 1), NaN rows where a refit failed."""
    logxs, logys, rows = _shared_floor_points(studies)
    if logxs is None:
        return _unavailable("each study's joint law needs at least 3 distinct N, 3 distinct D and 6 runs",
                            int(sum(len(y) for y in logys)))
    m = len(studies)
    own = np.array([st["theta"] for st in studies], dtype=float)             # (m, 5)
    floors = sorted({*own[:, 4], float(own[:, 4].mean())})
    starts = np.array([np.concatenate([own[:, :4].ravel(), [e]]) for e in floors])
    logy = np.concatenate(logys)

    def best_of(theta, f):
        if not np.isfinite(f).any():
            return None
        i = int(np.nanargmin(np.where(np.isfinite(f), f, np.nan)))
        return theta[i], float(f[i])

    def noises_at(theta):
        return [noise_components(_study_theta(theta[None], s)[0], logxs[s], logys[s], rows[s], True)
                for s in range(m)]

    best = best_of(*_refine_shared_floor(starts, logxs, logy))
    if best is None:
        return _unavailable("the optimiser did not converge from any start", len(logy))
    scale, delta, sd = np.ones(len(logy)), HUBER_DELTA, None
    if huber_c is not None:
        sd = [math.sqrt(nz["row_sd_log_estimated"] ** 2 + nz["within_sd_log"] ** 2) for nz in noises_at(best[0])]
        scale = np.concatenate([np.full(lx.shape[1], max(v, 1e-6)) for v, lx in zip(sd, logxs)])
        delta = huber_c
        best = best_of(*_refine_shared_floor(np.vstack([best[0][None], starts]), logxs, logy, scale, delta))
        if best is None:
            return _unavailable("the optimiser did not converge from any start", len(logy))
    theta_hat, objective = best
    laws = [dict(zip(("E", "A", "B", "alpha", "beta"), (float(v[0]) for v in shared_floor_params(theta_hat, s))))
            for s in range(m)]
    fit = {"available": True, "law": "L_s = E + A_s / N^alpha_s + B_s / D^beta_s, E shared",
           "E": laws[0]["E"], "laws": laws, "objective": objective, "n_points": int(len(logy)),
           "dof": int(len(logy) - (4 * m + 1)), "n_bootstrap": 0, "ci95": {"E": None},
           "E_at_bound": bool(laws[0]["E"] < 1e-3 * math.exp(logy.min())),
           "huber": ({"delta": HUBER_DELTA, "on": "log-loss residuals"} if huber_c is None else
                     {"delta": huber_c, "on": "log-loss residuals over each study's noise sd",
                      "noise_sd_log": sd}),
           "method": f"the studies' joint laws fitted together with one E: summed Huber on log-loss residuals, "
                     f"damped Gauss-Newton from each study's own fit; 95% CI: parametric bootstrap at every "
                     f"study's own N and D, seed {seed}, each study's noise from its own residuals (per row "
                     f"and per point), all studies refitted together per draw"}
    if n_bootstrap < 1:
        return fit
    noises = noises_at(theta_hat)
    if any(nz["cell_noise_measured"] for nz in noises):
        fit["method"] += ", and per (N, D) cell where a study has several seeds of it"
    samples = _shared_floor_bootstrap(theta_hat, logxs, noises, rows, scale, delta, n_bootstrap, seed)
    good = ~np.isnan(samples).any(axis=1)
    failed = int((~good).sum())
    floor = np.exp(samples[good, -1])
    fit["ci95"] = {"E": _interval(floor, failed)}
    fit["draws_E_at_bound"] = float(np.mean(floor < 1e-3 * math.exp(logy.min()))) if good.any() else 1.0
    fit["n_bootstrap"], fit["n_bootstrap_failed"] = int(good.sum()), failed
    fit["noise"] = [{k: v for k, v in nz.items() if k != "point_sd_log"} for nz in noises]
    fit["_samples"] = samples
    return fit


def _shared_floor_points(studies: list[dict]) -> tuple:
    """Each study's log (N, D) (2, n_s), log losses and row index, its unusable points left out; logxs
    None when a study has fewer than 3 distinct N, 3 distinct D or 6 runs."""
    logxs, logys, rows = [], [], []
    for st in studies:
        cols, ys, kept, _ = clean_points({"N": st["N"], "D": st["D"]}, st["loss"])
        r = st.get("rows")
        rows.append(row_index(None if r is None else [x for x, k in zip(r, kept) if k], int(kept.sum())))
        logxs.append(np.log(np.vstack([cols["N"], cols["D"]])))
        logys.append(np.log(ys))
        if len(np.unique(cols["N"])) < 3 or len(np.unique(cols["D"])) < 3 or len(ys) < 6:
            return None, logys, rows
    return logxs, logys, rows


def _shared_floor_bootstrap(theta_hat, logxs, noises, rows, scale, delta: float, n_bootstrap: int,
                            seed: int) -> np.ndarray:
    """fit_joint_laws_shared_floor's draws (S, 4 m + 1), NaN rows where a refit failed: every study's
    synthetic losses (its fitted ones plus its own row and point noise), all studies refitted together
    per draw with the fit's objective (scale, delta)."""
    fitted, _ = _shared_floor_law(theta_hat[None], logxs)
    rng = np.random.default_rng(seed)
    synthetic, start = [], 0
    for s, noise in enumerate(noises):
        n_s = logxs[s].shape[1]
        synthetic.append(synthetic_log_losses(fitted[0, start:start + n_s], rows[s], noise, n_bootstrap, rng,
                                              cell_index(logxs[s])))
        start += n_s
    samples, f = _refine_shared_floor(np.repeat(theta_hat[None], n_bootstrap, 0), logxs,
                                      np.concatenate(synthetic, axis=1), scale, delta)
    samples[~(np.all(np.isfinite(samples), axis=1) & np.isfinite(f))] = np.nan
    return samples


def shared_floor_params(theta, s: int) -> tuple:
    """(E, A, B, alpha, beta) arrays of study s from shared-floor parameter rows theta (S, 4 m + 1)."""
    return _joint_params(_study_theta(np.atleast_2d(theta), s))

def compute_optimal_allocation(E, A, B, alpha, beta, flops, flops_per_nd: float = 6.0):
    """Minimise E + A/N^alpha + B/D^beta subject to C = k N D (k = flops_per_nd: 6 in the textbook
    count, the runs' measured FLOPs per token and parameter otherwise). Setting the derivative along
    the constraint to zero gives N_opt = G (C/k)^(beta/(alpha+beta)), D_opt = G^-1 (C/k)^(alpha/(alpha+beta))
    with G = (alpha A / (beta B))^(1/(alpha+beta)). Returns (N_opt, D_opt, loss at the optimum)."""
    E, A, B, alpha, beta = (np.asarray(v, dtype=float)[..., None] for v in (E, A, B, alpha, beta))
    c6 = np.asarray(flops, dtype=float) / flops_per_nd
    # a bootstrap draw with an exponent at its bound of 0 has no interior optimum: NaN, left out of intervals
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        G = np.power(alpha * A / (beta * B), 1.0 / (alpha + beta))
        n_opt = G * np.power(c6, beta / (alpha + beta))
        d_opt = np.power(c6, alpha / (alpha + beta)) / G
        return n_opt, d_opt, E + A * n_opt ** -alpha + B * d_opt ** -beta


def compute_budgets(run_flops) -> list[tuple[str, float]]:
    """The runs' own budgets (each distinct one when 4 or fewer, else the smallest and largest) and a few
    landmarks, smallest first."""
    run_flops = sorted({float(f"{f:.3g}") for f in run_flops if f and np.isfinite(f) and f > 0})
    if len(run_flops) > 4:
        run_flops = [run_flops[0], run_flops[-1]]
    budgets = [(f"runs: {f:.3g} FLOPs", f) for f in run_flops]
    budgets += [("1e18 FLOPs", 1e18), ("1e21 FLOPs", 1e21), ("Chinchilla (5.76e23 FLOPs)", 5.76e23),
                ("1e25 FLOPs", 1e25)]
    return sorted(budgets, key=lambda t: t[1])


def flops_per_nd(points: list[dict]) -> float:
    """The runs' training FLOPs per token and parameter (k in C = k N D, N the fitted count): the
    geometric mean over the points of C / (N D); 6 without points."""
    k = [point_flops(p) / (p["N"] * p["D"]) for p in points]
    return float(np.exp(np.mean(np.log(k)))) if k else 6.0


def compute_optimal(joint: dict, run_flops, k_flops: float = 6.0) -> dict:
    """N_opt(C), D_opt(C), tokens per parameter and the loss at the optimum under C = k N D, with 95%
    intervals from the joint law's bootstrap, for the budgets of compute_budgets. A draw without an
    optimum is kept as NaN: past 2.5% of draws the interval is open on that side (_interval)."""
    if not joint.get("available"):
        return {"available": False, "reason": f"needs the joint law L(N, D), which is unavailable: "
                                              f"{joint.get('reason')}"}
    budgets = compute_budgets(run_flops)
    flops = np.array([c for _, c in budgets])
    n_opt, d_opt, l_opt = (v.reshape(-1) for v in compute_optimal_allocation(
        joint["E"], joint["A"], joint["B"], joint["alpha"], joint["beta"], flops, k_flops))
    draws = None
    failed = joint.get("n_bootstrap_failed", 0)
    unidentified = "N_opt_exponent" in joint.get("unidentified", [])
    if joint.get("_samples") is not None:
        E, A, B, al, be = _joint_params(joint["_samples"])
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = compute_optimal_allocation(E, A, B, al, be, flops, k_flops)           # each (S, n_budgets)
    # one new run trained at the optimum: the loss draws with the joint fit's residual scatter
    noisy_loss = with_noise(draws[2], joint.get("residual_std_log")) if draws is not None else None

    def interval(v):
        return None if draws is None else [None, None] if unidentified else _interval(v, failed)

    rows = []
    for i, (label, c) in enumerate(budgets):
        row = {"label": label, "flops": c, "N_opt": float(n_opt[i]), "D_opt": float(d_opt[i]),
               "tokens_per_parameter": float(d_opt[i] / n_opt[i]), "loss": float(l_opt[i])}
        for key, k in (("N_opt", 0), ("D_opt", 1), ("loss", 2)):
            row[f"{key}_ci95"] = interval(draws[k][:, i]) if draws is not None else None
        with np.errstate(invalid="ignore", divide="ignore"):
            row["tokens_per_parameter_ci95"] = interval(draws[1][:, i] / draws[0][:, i]) if draws is not None else None
        row["loss_pi95"] = _percentiles(noisy_loss[:, i]) if noisy_loss is not None else None
        if draws is not None:        # counted as beyond both ends of every interval (_interval)
            n_d = draws[0][:, i], draws[1][:, i]
            row["draws_without_optimum"] = int(np.sum(~(np.isfinite(n_d[0]) & np.isfinite(n_d[1])
                                                        & (n_d[0] > 0) & (n_d[1] > 0)))) + failed
            row["open"] = is_open(row["tokens_per_parameter_ci95"]) or is_open(row["N_opt_ci95"])
        rows.append(row)
    a_exp = joint["beta"] / (joint["alpha"] + joint["beta"])
    positive = [f for f in run_flops if f and np.isfinite(f) and f > 0]
    grid = np.logspace(np.log10(min(positive) / 3 if positive else 1e15), 25, 40)
    curve = compute_optimal_allocation(joint["E"], joint["A"], joint["B"], joint["alpha"], joint["beta"], grid,
                                       k_flops)
    frontier = {"flops": grid.tolist(), "N_opt": curve[0].reshape(-1).tolist(),
                "D_opt": curve[1].reshape(-1).tolist(), "loss": curve[2].reshape(-1).tolist()}
    if joint.get("_samples") is not None:
        E, A, B, al, be = _joint_params(joint["_samples"])
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            allocation = compute_optimal_allocation(E, A, B, al, be, grid, k_flops)
        for key, draw in zip(("N_opt", "D_opt", "loss"), allocation):
            with warnings.catch_warnings():       # an all-NaN column gives NaN, written as null below
                warnings.simplefilter("ignore", RuntimeWarning)
                lo, hi = np.nanpercentile(draw, [2.5, 97.5], axis=0)
            frontier[f"{key}_lo"] = [float(v) if np.isfinite(v) else None for v in lo]
            frontier[f"{key}_hi"] = [float(v) if np.isfinite(v) else None for v in hi]
    out = {"available": True, "constraint": f"C = {k_flops:.3g} N D", "flops_per_nd": k_flops,
           "n_count": joint.get("n_count"),
           "N_opt_exponent": a_exp, "D_opt_exponent": 1 - a_exp,
           "note": "N_opt grows as C^(beta/(alpha+beta)), D_opt as C^(alpha/(alpha+beta)); far beyond the "
                   "runs' compute these are extrapolations of the joint law",
           "budgets": rows, "frontier": frontier}
    if draws is not None:
        E, A, B, al, be = _joint_params(joint["_samples"])
        out["N_opt_exponent_ci95"] = [None, None] if unidentified else _interval(be / (al + be), failed)
        out["D_opt_exponent_ci95"] = [None, None] if unidentified else _interval(al / (al + be), failed)
    return out


# --- a check of the fits: the compute-optimal model at a larger budget (--validate) -----------------

VALIDATE_NAME = "validate"         # the --validate run's name begins with it


def fitted_runs(points: list[dict]) -> list[dict]:
    """The points the laws are fitted to: those of the joint law (not the --validate run, a check)."""
    return [p for p in points if ROLE_JOINT in p["roles"]]


def validation_target(joint: dict, run_flops, factor: float) -> dict:
    """The joint law's compute-optimal (N_opt, D_opt) at `factor` times the largest run's compute
    C = 6 N D, or {'available': False, 'reason'} when the law cannot say where that is."""
    if not joint.get("available"):
        return _unavailable(f"the joint law is unavailable: {joint.get('reason')}", joint.get("n_points", 0))
    if joint.get("E_at_bound"):
        return _unavailable("the joint law's E is at its bound 0, so its compute-optimal allocation is not "
                            "trustworthy", joint["n_points"])
    largest = float(max(run_flops))
    n_opt, d_opt, loss = (float(np.ravel(v)[0]) for v in compute_optimal_allocation(
        joint["E"], joint["A"], joint["B"], joint["alpha"], joint["beta"], factor * largest))
    if not all(np.isfinite(v) and v > 0 for v in (n_opt, d_opt)):
        return _unavailable("the joint law has no interior compute-optimal point", joint["n_points"])
    return {"available": True, "factor": float(factor), "largest_run_flops": largest,
            "target_flops": factor * largest, "N_opt": n_opt, "D_opt": d_opt, "loss_at_optimum": loss}


def predict_validation(joint: dict, n_params: float, tokens: float, seed: int = BOOTSTRAP_SEED) -> dict:
    """The joint law's loss at (N, D), with the 95% confidence interval of the law (`_ci95`) and the 95%
    prediction interval of one new run there (`_pi95`: the draws with the fit's residual scatter)."""
    draws = joint_samples(joint, n_params, tokens)
    draws = draws[:, 0] if draws is not None else None
    noisy = with_noise(draws, joint.get("residual_std_log"), seed)
    return {"predicted_loss": float(joint_law(n_params, tokens, joint["E"], joint["A"], joint["B"],
                                              joint["alpha"], joint["beta"])),
            "predicted_loss_ci95": _percentiles(draws) if draws is not None else None,
            "predicted_loss_pi95": _percentiles(noisy) if noisy is not None else None}


def score_validation(prediction: dict, measured: float | None) -> dict:
    """Measured against predicted: the relative error predicted / measured - 1, the same of each
    interval's ends, and whether the measured loss lies within the ci95 and the pi95 (None where there
    is no measured loss or no interval)."""
    if measured is None or not np.isfinite(measured) or measured <= 0:
        return {"measured_loss": None, "relative_error": None, "within_ci95": None, "within_pi95": None}
    out = {"measured_loss": float(measured), "relative_error": prediction["predicted_loss"] / measured - 1}
    for tag in ("ci95", "pi95"):
        iv = prediction.get(f"predicted_loss_{tag}")
        out[f"relative_error_{tag}"] = [v / measured - 1 for v in iv] if iv else None
        out[f"within_{tag}"] = bool(iv[0] <= measured <= iv[1]) if iv else None
    return out


# --- IsoFLOP profiles (Chinchilla Approach 2) ------------------------------------------------------

def isoflop_slices(points: list[dict], span: float = ISOFLOP_SPAN) -> tuple[list[dict], str]:
    """Group points {'N', 'D', 'loss'[, 'C', 'row']} into compute budgets, C the runs' real FLOPs
    (point_flops).

    Binned: sorted by C, a budget opens at the cheapest point not yet grouped and takes every point
    whose C is within a factor `span` of it; its C is the geometric mean of its points'.
    Interpolated (when binning gives fewer than 3 budgets of 3 sizes, as on a grid of sizes x token
    horizons whose products do not line up): budgets evenly spaced in log C over the range that 3 or
    more sizes reach, and at each size the loss interpolated linearly in log D between its measured
    horizons, never extrapolated. Returns the budgets [{'flops', 'N' (n,), 'loss' (n,), 'row' (n,)}]
    and the rule; a budget's `row` names the seed row each loss comes from (its size, interpolated)."""
    pts = sorted(points, key=point_flops)
    bins, i = [], 0
    while i < len(pts):
        c0 = point_flops(pts[i])
        group = [p for p in pts[i:] if point_flops(p) <= span * c0]
        i += len(group)
        C = np.exp(np.mean([np.log(point_flops(p)) for p in group]))
        bins.append({"flops": float(C), "N": np.array([p["N"] for p in group]),
                     "loss": np.array([p["loss"] for p in group]),
                     "row": [p.get("row", p.get("name", j)) for j, p in enumerate(group)]})
    rule = f"binned by compute: each budget's runs within a factor {span:g} of its cheapest run"
    if sum(len(np.unique(b["N"])) >= ISOFLOP_MIN_SIZES for b in bins) >= ISOFLOP_MIN_BUDGETS:
        return bins, rule
    curves, k_of = {}, {}
    for p in points:
        curves.setdefault(p["N"], []).append((np.log(p["D"]), p["loss"]))
        k_of[p["N"]] = point_flops(p) / (p["N"] * p["D"])           # FLOPs per token and parameter
    curves = {n: np.array(sorted(c)) for n, c in curves.items() if len({d for d, _ in c}) >= 2}
    reach = np.array([[np.log(k_of[n] * n) + c[0, 0], np.log(k_of[n] * n) + c[-1, 0]] for n, c in curves.items()])
    if len(reach) < ISOFLOP_MIN_SIZES:
        return bins, rule
    lo, hi = np.sort(reach[:, 0])[ISOFLOP_MIN_SIZES - 1], np.sort(reach[:, 1])[-ISOFLOP_MIN_SIZES]
    if hi <= lo:
        return bins, rule
    slices = []
    for logc in np.linspace(lo, hi, ISOFLOP_INTERPOLATED_BUDGETS):
        inside = [(n, np.interp(logc - np.log(k_of[n] * n), c[:, 0], c[:, 1]))
                  for n, c in curves.items() if c[0, 0] <= logc - np.log(k_of[n] * n) <= c[-1, 0]]
        slices.append({"flops": float(np.exp(logc)), "N": np.array([n for n, _ in inside]),
                       "loss": np.array([v for _, v in inside]), "row": [("size", n) for n, _ in inside]})
    return slices, ("interpolated: budgets evenly spaced in log C where 3 or more sizes reach; each "
                    "size's loss interpolated linearly in log D between its measured token horizons")


def _parabola_vertices(log_n, loss, weights) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares parabolas loss = q u^2 + r u + s in u = log N - mean, one per weight
    row (S, n) (and per loss row, when loss is (S, n)): the vertex log N (S,) and the loss there (S,),
    NaN where the parabola opens downward or the row weights fewer than 3 distinct sizes."""
    centre = log_n.mean()
    u = log_n - centre
    X = np.stack([u * u, u, np.ones_like(u)], axis=1)                       # (n, 3)
    loss = np.broadcast_to(loss, weights.shape)
    distinct = (weights[:, None, :] * (log_n[None, None, :] == np.unique(log_n)[None, :, None]) > 0)
    ok = distinct.any(axis=2).sum(axis=1) >= 3
    coef = np.full((len(weights), 3), np.nan)
    if ok.any():
        XtWX = np.einsum("sn,ni,nj->sij", weights[ok], X, X)
        coef[ok] = np.linalg.solve(XtWX, np.einsum("sn,ni,sn->si", weights[ok], X, loss[ok])[:, :, None])[:, :, 0]
    q, r, s = coef.T
    with np.errstate(invalid="ignore", divide="ignore"):
        u_min = np.where(q > 0, -r / (2 * q), np.nan)
    return u_min + centre, s + u_min * (r + q * u_min)


def _isoflop_budget(s: dict, k_flops: float) -> dict:
    """One budget's parabola: its row for results.json, `refused` where the minimum is at the edge of
    its sizes or the parabola opens downward."""
    log_n, loss, C = np.log(s["N"]), np.asarray(s["loss"], dtype=float), s["flops"]
    v, l_opt = (float(t[0]) for t in _parabola_vertices(log_n, loss, np.ones((1, len(loss)))))
    row = {"label": f"{C:.3g} FLOPs", "flops": C, "n_runs": int(len(loss)), "n_sizes": int(len(np.unique(log_n))),
           "N_range": [float(s["N"].min()), float(s["N"].max())], "N_opt": float(np.exp(v)),
           "D_opt": float(C / (k_flops * np.exp(v))), "loss_at_opt": l_opt, "used": False, "N_opt_ci95": None}
    lowest = log_n[np.argmin(loss)]
    if not np.isfinite(v):
        row["refused"] = "the parabola opens downward: no minimum"
    elif lowest in (log_n.min(), log_n.max()) or not log_n.min() < v < log_n.max():
        end = "smallest" if v <= np.median(log_n) else "largest"
        row["refused"] = f"minimum at the edge of its sizes (the {end}, {format_count(np.exp(log_n.min() if end == 'smallest' else log_n.max()))})"
    if "refused" not in row:
        row["used"] = True
    return row


def isoflop_draws(budgets: list[dict], joint: dict | None, n_bootstrap: int, rng) -> tuple[list, str | None]:
    """Bootstrap draws of every budget's vertex log N (S,) from one set of perturbed losses: each loss
    times exp(row offset + own offset), the row offset shared by every budget's entries from the same
    seed row, the sds the joint law's noise components (its row-shared and within-row sd; with seeds, the
    within and cell-shared sds together, as the within sd was before the cell part was split from it, so a
    second seed does not narrow these intervals by dropping the law's misfit). All budgets are drawn
    together, so a seed's luck moves them together. None with a reason without a noise estimate."""
    noise = (joint or {}).get("noise")
    if not noise or not (noise["row_sd_log"] > 0 or noise["within_sd_log"] > 0):
        return [None] * len(budgets), "no noise estimate (the joint law's residuals) to resample"
    keys = {k: i for i, k in enumerate(dict.fromkeys(r for b in budgets for r in b["row"]))}
    shared = rng.standard_normal((n_bootstrap, len(keys))) * noise["row_sd_log"]
    own_sd = math.hypot(noise["within_sd_log"], noise.get("cell_sd_log", 0.0))     # hypot(w, 0) is w
    out = []
    for b in budgets:
        idx = np.array([keys[r] for r in b["row"]])
        own = rng.standard_normal((n_bootstrap, len(idx))) * own_sd
        loss = np.asarray(b["loss"], dtype=float)[None] * np.exp(shared[:, idx] + own)
        out.append(_parabola_vertices(np.log(b["N"]), loss, np.ones_like(loss))[0])
    return out, None


def _slope_draws(x, Y) -> np.ndarray:
    """Least-squares slopes of the columns of Y (n, S) against x (n,) over each column's finite
    entries (a resampled budget without a minimum drops out of that draw); NaN with fewer than
    ISOFLOP_MIN_BUDGETS of them."""
    m = np.isfinite(Y)
    k = m.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = np.where(m, x[:, None] - (m * x[:, None]).sum(axis=0) / k, 0.0)
        yc = np.where(m, Y - np.where(m, Y, 0.0).sum(axis=0) / k, 0.0)
        slope = (xc * yc).sum(axis=0) / (xc * xc).sum(axis=0)
    return np.where(k >= ISOFLOP_MIN_BUDGETS, slope, np.nan)


def _nonzero(ci):
    """An interval, or None where it has zero width (every draw the same: nothing was resampled)."""
    return ci if ci and (is_open(ci) or ci[1] > ci[0]) else None


def fit_isoflop(points: list[dict], joint: dict | None = None, n_bootstrap: int = N_BOOTSTRAP,
                seed: int = BOOTSTRAP_SEED) -> dict:
    """Chinchilla Approach 2: per compute budget (isoflop_slices) a parabola of loss in log N, its
    vertex N_opt (refused at the edge of the budget's sizes), then N_opt ~ C^a and D_opt ~ C^b by
    least squares in log-log. Intervals: every budget redrawn together from the joint law's noise
    (isoflop_draws), the line refitted per draw; a budget's own N_opt interval only with
    ISOFLOP_INTERVAL_MIN_SIZES sizes or more (with 3 the parabola fits exactly and its spread is the
    noise model's alone). With the joint law, `a` is set beside its beta/(alpha+beta) and a warning is
    given when the two 95% intervals do not overlap."""
    slices, rule = isoflop_slices(points)
    usable = [s for s in slices if len(np.unique(s["N"])) >= ISOFLOP_MIN_SIZES]
    if len(usable) < ISOFLOP_MIN_BUDGETS:
        return {"available": False, "grouping": rule,
                "reason": f"needs at least {ISOFLOP_MIN_BUDGETS} compute budgets with {ISOFLOP_MIN_SIZES} or more "
                          f"sizes each; found {len(usable)} ({len(slices)} budgets in all)"}
    k_flops = flops_per_nd(points)
    rows = [_isoflop_budget(s, k_flops) for s in usable]
    vertex_draws, why = isoflop_draws(usable, joint, n_bootstrap, np.random.default_rng(seed))
    for r, d in zip(rows, vertex_draws):
        if r["used"] and d is not None and r["n_sizes"] >= ISOFLOP_INTERVAL_MIN_SIZES:
            r["N_opt_ci95"] = _nonzero(_interval(np.exp(d)))
    used = [(r, d) for r, d in zip(rows, vertex_draws) if r["used"]]
    out = {"available": False, "method": "Chinchilla Approach 2: a parabola of loss in log N per compute budget; "
                                         "N_opt ~ C^a, D_opt ~ C^b by least squares in log-log, C the runs' real "
                                         "FLOPs; 95% CI: every budget redrawn together with the joint law's "
                                         f"row-shared and per-run noise, seed {seed}; a budget's own interval "
                                         f"only with {ISOFLOP_INTERVAL_MIN_SIZES}+ sizes",
           "grouping": rule, "budgets": rows,
           "refused_budgets": [f"{r['label']}: {r['refused']}" for r in rows if not r["used"]]}
    if len(used) < ISOFLOP_MIN_BUDGETS:
        return {**out, "reason": f"only {len(used)} of {len(rows)} budgets have an interior minimum; "
                                 f"needs {ISOFLOP_MIN_BUDGETS}"}
    log_c = np.log([r["flops"] for r, _ in used])
    log_n = np.log([r["N_opt"] for r, _ in used])
    out.update(available=True, n_budgets_used=len(used),
               N_opt_exponent=float(np.polyfit(log_c, log_n, 1)[0]), N_opt_exponent_ci95=None,
               D_opt_exponent=float(np.polyfit(log_c, log_c - np.log(k_flops) - log_n, 1)[0]),
               D_opt_exponent_ci95=None, n_bootstrap=0)
    if why is None:
        Y = np.array([d for _, d in used])
        a_draws = _slope_draws(log_c, Y)
        b_draws = _slope_draws(log_c, log_c[:, None] - np.log(k_flops) - Y)
        out.update(n_bootstrap=int(np.isfinite(a_draws).sum()), N_opt_exponent_ci95=_nonzero(_interval(a_draws)),
                   D_opt_exponent_ci95=_nonzero(_interval(b_draws)))
    if out["N_opt_exponent_ci95"] is None:
        out["no_interval"] = why or "every draw gave the same exponent"
    return {**out, **isoflop_agreement(out, joint or {})}


def isoflop_agreement(iso: dict, joint: dict) -> dict:
    """Approach 2's a beside the joint law's beta/(alpha+beta), and a warning when their 95% intervals
    do not overlap."""
    if not joint.get("available"):
        return {"joint_N_opt_exponent": None, "intervals_overlap": None, "warning": None}
    mine, theirs = _nonzero(iso.get("N_opt_exponent_ci95")), _nonzero(joint.get("N_opt_exponent_ci95"))
    inf = float("inf")
    overlap = (bool((mine[0] if mine[0] is not None else -inf) <= (theirs[1] if theirs[1] is not None else inf)
                    and (theirs[0] if theirs[0] is not None else -inf) <= (mine[1] if mine[1] is not None else inf))
               if mine and theirs else None)     # None: a side without an interval is not compared
    warning = None
    if overlap is False:
        warning = (f"IsoFLOP a = {iso['N_opt_exponent']:.3f} {_fmt_ci(mine)} and the joint law's "
                   f"beta/(alpha+beta) = {joint['N_opt_exponent']:.3f} {_fmt_ci(theirs)} disagree: their "
                   f"95% intervals do not overlap")
    return {"joint_N_opt_exponent": joint.get("N_opt_exponent"), "joint_N_opt_exponent_ci95": theirs,
            "intervals_overlap": overlap, "warning": warning}


# --- runs -> points ---------------------------------------------------------------------------------

def roles_of(record: dict) -> tuple[str, ...]:
    """A run record's roles. Records written before roles existed (schema 1, 0cf71dd) said `sweep`
    ("params", "horizons", "data", "validate", "lr") and two flags: `in_param_sweep` (True, False or
    None: then the stable runs of the parameter sweep) and `in_data_sweep`."""
    if "roles" in record:
        return tuple(record["roles"])
    sweep = record.get("sweep")
    if sweep in ("validate", "lr"):
        return (ROLE_VALIDATION,) if sweep == "validate" else (ROLE_LR,)
    on_n = sweep == "params" if record.get("in_param_sweep") is None else bool(record["in_param_sweep"])
    on_d = sweep == "data" or bool(record.get("in_data_sweep"))
    return tuple(r for r, on in ((ROLE_N, on_n), (ROLE_D, on_d), (ROLE_JOINT, True)) if on)


POINT_COLUMNS = ("run_id", "name", "seed", "status", "roles", "branch_of", "n_layer", "d_model", "peak_lr",
                 "N_nonembedding", "N_total", "D", "flops", "loss")


def point_row(record: dict) -> dict:
    """A run record as a row of results.json's points table: N under both counts, D, the run's real
    training FLOPs (its FLOPs per token x D; 6 N D for a record without them), the final validation loss
    (None unless completed) and its roles. Reads records of every schema; a row is returned as it is."""
    if is_point(record):
        return record
    n, d = record.get("n_params_nonembedding"), record.get("tokens")
    fpt = record.get("flops_per_token")
    done = record.get("status") == "completed"
    return {"run_id": record.get("run_id", record.get("name")), "name": record.get("name"),
            "seed": record.get("seed") or 0, "status": record.get("status"), "roles": list(roles_of(record)),
            "branch_of": record.get("branch_of"), "n_layer": record.get("n_layer"), "d_model": record.get("d_model"),
            "peak_lr": record.get("peak_lr"), "N_nonembedding": n, "N_total": record.get("n_params_total"), "D": d,
            "flops": (fpt * d if fpt else 6.0 * n * d) if n and d else None,
            "loss": record.get("final_val_loss") if done else None}


def is_point(row: dict) -> bool:
    return "D" in row and "roles" in row and "loss" in row


def as_points(runs: list[dict]) -> list[dict]:
    """Points-table rows, from rows (kept) or run records of any schema (converted)."""
    return [point_row(r) for r in runs]


def usable_runs(points: list[dict], sweep: str) -> list[dict]:
    """The completed points of one sweep's law (L(N) for "params", L(D) for "data")."""
    return [p for p in points if SWEEP_ROLE[sweep] in p["roles"] and p["status"] == "completed"
            and p["loss"] is not None]


SWEEP_X = {"params": "N_nonembedding", "data": "D"}


def fit_sweeps(points: list[dict], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
               n_count: str = DEFAULT_N_COUNT) -> dict:
    """Fits of both sweeps (x is non-embedding N for the parameter sweep, tokens D for the data sweep),
    each with its 95% band from the smallest run to the right edge of its figure panel, and the joint
    L(N, D) over every completed run of both sweeps (all seeds), N counted as `n_count`, its bootstrap
    drawing noise per row (run_row)."""
    fits = {}
    for sweep, key in SWEEP_X.items():
        runs = usable_runs(points, sweep)
        skipped = [p for p in points if SWEEP_ROLE[sweep] in p["roles"] and p not in runs]
        fit = fit_power_law([r[key] for r in runs], [r["loss"] for r in runs], n_bootstrap, seed)
        if skipped:
            msg = f"{len(skipped)} run(s) left out: " + ", ".join(f"{e.get('name')} ({e.get('status')})"
                                                                   for e in skipped)
            key_ = "note" if fit.get("available") else "reason"
            fit[key_] = "; ".join(filter(None, [fit.get(key_), msg]))
        fit["x"] = key
        if fit.get("available"):
            xs = np.array([r[key] for r in runs], dtype=float)
            grid = np.logspace(np.log10(xs.min() / 2), np.log10(X_MAX[sweep]), 60)
            fit["band95"] = band95(fit, grid)
        fits[sweep] = fit
    done = runs_as_points(points, n_count)
    fits["joint"] = fit_joint_law([p["N"] for p in done], [p["D"] for p in done], [p["loss"] for p in done],
                                  n_bootstrap, seed, rows=point_rows(done))
    fits["joint"]["n_count"] = n_count
    return fits


def predictions_from_fits(fits: dict, fixed: dict | None = None) -> list[dict]:
    """Predicted loss at every reference model, with the 95% confidence interval of the law
    (`predicted_loss_ci95`) and the wider 95% prediction interval of one new run there, which adds the
    fit's residual scatter (`predicted_loss_pi95`), where the fit has bootstrap draws. With the sweeps'
    `fixed` other variable (sweep_fixed_values), the joint law's prediction on the same slice too."""
    out = []
    for sweep, models in REFERENCE_MODELS.items():
        fit = fits.get(sweep, {})
        draws = law_samples(fit, [x for _, x in models])
        noisy = with_noise(draws, fit.get("residual_std_log"))
        joint = joint_slice(fits.get("joint", {}), sweep, [x for _, x in models], (fixed or {}).get(sweep))
        for i, (name, x) in enumerate(models):
            pred = float(power_law(x, fit["a"], fit["b"], fit["c"])) if fit.get("available") else None
            out.append({"name": name, "sweep": sweep, "N" if sweep == "params" else "D": x,
                        "predicted_loss": pred,
                        "predicted_loss_ci95": _percentiles(draws[:, i]) if draws is not None else None,
                        "predicted_loss_pi95": _percentiles(noisy[:, i]) if noisy is not None else None,
                        "kaplan_loss": float(kaplan_law(x, sweep)), **joint[i]})
    return out


def reference_predictions(joint: dict, corpus: dict | None = None) -> list[dict]:
    """The joint law's loss at every REFERENCE_POINTS model's published (N, D), with its 95% confidence
    interval (the law) and prediction interval (one new run), for this corpus and tokenizer. Empty
    without a joint law."""
    if not joint.get("available"):
        return []
    N, D = (np.array([m[i] for m in REFERENCE_POINTS]) for i in (1, 2))
    pred = joint_law(N, D, *(joint[k] for k in ("E", "A", "B", "alpha", "beta")))
    draws = joint_samples(joint, N, D)
    noisy = with_noise(draws, joint.get("residual_std_log"))
    unidentified = bool(joint.get("unidentified"))
    failed = joint.get("n_bootstrap_failed", 0)
    corpus = corpus or {}
    return [{"name": name, "N": float(n), "D": float(d), "predicted_loss": float(pred[i]),
             "predicted_loss_ci95": (None if draws is None else [None, None] if unidentified
                                     else _interval(draws[:, i], failed)),
             "predicted_loss_pi95": (None if noisy is None else [None, None] if unidentified
                                     else _interval(noisy[:, i], failed)),
             "law": "joint", "n_count": joint.get("n_count"), "corpus": corpus.get("name"),
             "tokenizer": corpus.get("tokenizer")}
            for i, (name, n, d) in enumerate(REFERENCE_POINTS)]


def sweep_fixed_values(points: list[dict]) -> dict:
    """The variable each sweep holds fixed: the parameter sweep's D and the data sweep's N."""
    out = {}
    for sweep, other in (("params", "D"), ("data", "N_nonembedding")):
        values = {p[other] for p in usable_runs(points, sweep)}
        if len(values) == 1 and None not in values:
            out[sweep] = float(values.pop())
    return out


def joint_slice(joint: dict, sweep: str, xs: list[float], fixed: float | None) -> list[dict]:
    """The joint law's loss at each x of a sweep's slice (N = x at the sweep's D, or D = x at its N),
    with its 95% interval: the extrapolation a grid of runs makes, next to the one-variable law's."""
    if not joint.get("available") or fixed is None:
        return [{} for _ in xs]
    n, d = (xs, [fixed] * len(xs)) if sweep == "params" else ([fixed] * len(xs), xs)
    pred = joint_law(n, d, *(joint[k] for k in ("E", "A", "B", "alpha", "beta")))
    draws = joint_samples(joint, n, d)
    return [{"joint_predicted_loss": float(pred[i]), "joint_at": {"N": n[i], "D": d[i]},
             "joint_predicted_loss_ci95": _percentiles(draws[:, i]) if draws is not None else None}
            for i in range(len(xs))]


def _relative_error(pred, measured, draws, noisy=None):
    """Signed relative error of a prediction, with the intervals of the bootstrap predictions: `_ci95`
    for the law (confidence), `_pi95` for a new run (prediction: the law's draws with residual noise)."""
    err = {"predicted_loss": float(pred), "measured_loss": float(measured),
           "relative_error": float(pred / measured - 1)}
    for tag, d in (("ci95", draws), ("pi95", noisy)):
        ci = err[f"predicted_loss_{tag}"] = _percentiles(d) if d is not None else None
        err[f"relative_error_{tag}"] = [v / measured - 1 for v in ci] if ci else None     # None: too few finite draws
    pi = err["predicted_loss_pi95"]
    err["within_pi95"] = bool(pi[0] <= measured <= pi[1]) if pi else None
    return err


def holdout_one_variable(runs: list[dict], key: str, n_bootstrap: int, seed: int) -> dict:
    """Refit one sweep without its largest x (every run there, all seeds) and predict that x."""
    xs = np.array([r[key] for r in runs], dtype=float)
    ys = np.array([r["loss"] for r in runs], dtype=float)
    if len(np.unique(xs)) < 3:
        return {"available": False, "reason": f"needs at least 3 distinct {key} (2 left to fit after holding "
                                              f"out the largest), got {len(np.unique(xs))}"}
    top = xs == xs.max()
    fit = fit_power_law(xs[~top], ys[~top], n_bootstrap, seed)
    if not fit.get("available"):
        return {"available": False, "reason": f"refit without the largest {key}: {fit['reason']}"}
    x_out, measured = float(xs.max()), float(ys[top].mean())
    draws = law_samples(fit, [x_out])
    noisy = with_noise(draws, fit["residual_std_log"], seed)
    out = {"available": True, "held_out": f"largest {key}", key: x_out, "held_out_value": x_out,
           "runs": [r["name"] for r, t in zip(runs, top) if t], "n_fit_points": int((~top).sum()),
           "fit_law": fit["law"], "fit_b": fit["b"], "residual_std_log": fit["residual_std_log"],
           **_relative_error(power_law(x_out, fit["a"], fit["b"], fit["c"]), measured,
                             draws[:, 0] if draws is not None else None,
                             noisy[:, 0] if noisy is not None else None)}
    out["note"] = fit.get("note")
    return out


def holdout_joint(points: list[dict], axis: str, n_bootstrap: int, seed: int) -> dict:
    """Refit the joint law without every run at the largest N (axis 'N') or D (axis 'D'); predict
    those runs. The relative error is the mean over the held-out runs, its interval the bootstrap's."""
    vals = np.array([p[axis] for p in points], dtype=float)
    top = vals == vals.max()
    rest = [p for p, t in zip(points, top) if not t]
    held = [p for p, t in zip(points, top) if t]
    fit = fit_joint_law([p["N"] for p in rest], [p["D"] for p in rest], [p["loss"] for p in rest],
                        n_bootstrap, seed, rows=point_rows(rest))
    if not fit.get("available"):
        return {"available": False, "reason": f"refit without the largest {axis}: {fit['reason']}"}
    summary = _predict_held_out(fit, held, seed)
    return {"available": True, "held_out": f"largest {axis}", axis: float(vals.max()),
            "held_out_value": float(vals.max()),
            "n_fit_points": len(rest), "fit_law": fit["law"],
            "fit": {k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "residual_std_log")},
            "relative_error": summary["mean_bias"], "relative_error_ci95": summary["mean_bias_ci95"],
            "relative_error_pi95": summary["mean_bias_pi95"], "runs": summary["runs"], "note": fit.get("note")}


def _predict_held_out(fit: dict, held: list[dict], seed: int) -> dict:
    """A fit's predictions of held-out points {'name', 'N', 'D', 'loss'} (a one-variable fit reads
    its x from 'x'): each run's relative error with its ci95 and pi95, and over the runs the mean
    absolute error and the mean signed error (bias), each with the bootstrap's 95% interval."""
    measured = np.array([p["loss"] for p in held], dtype=float)
    if "E" in fit:
        N, D = (np.array([p[k] for p in held], dtype=float) for k in ("N", "D"))
        pred = joint_law(N, D, fit["E"], fit["A"], fit["B"], fit["alpha"], fit["beta"])
        draws = joint_samples(fit, N, D)
    else:
        x = np.array([p["x"] for p in held], dtype=float)
        pred, draws = power_law(x, fit["a"], fit["b"], fit["c"]), law_samples(fit, x)
    noisy = with_noise(draws, fit.get("residual_std_log"), seed)
    runs = [{k: p[k] for k in ("name", "x", "N", "D", "C") if k in p}
            | _relative_error(pr, m, *(d[:, i] if d is not None else None for d in (draws, noisy)))
            for i, (p, pr, m) in enumerate(zip(held, pred, measured))]
    out = {"n_predicted": len(held), "runs": runs,
           "mean_abs_error": float(np.mean(np.abs(pred / measured - 1))),
           "mean_bias": float(np.mean(pred / measured - 1))}
    rel = draws / measured - 1 if draws is not None else None
    out["mean_abs_error_ci95"] = _percentiles(np.abs(rel).mean(axis=1)) if rel is not None else None
    out["mean_bias_ci95"] = _percentiles(rel.mean(axis=1)) if rel is not None else None
    out["mean_bias_pi95"] = _percentiles((noisy / measured - 1).mean(axis=1)) if noisy is not None else None
    inside = [r["within_pi95"] for r in runs if r["within_pi95"] is not None]
    out["share_within_pi95"] = float(np.mean(inside)) if inside else None
    return out


def _cutoff_indices(n_candidates: int, max_cutoffs: int) -> list[int]:
    """At most max_cutoffs of n_candidates cutoffs, evenly spaced, always keeping the last (largest)."""
    if n_candidates <= max_cutoffs:
        return list(range(n_candidates))
    return sorted({int(round(v)) for v in np.linspace(0, n_candidates - 1, max_cutoffs)})


def rollout(points: list[dict], order_key: str, min_fit: int, fit_fn, n_bootstrap: int = ROLLOUT_BOOTSTRAP,
            seed: int = BOOTSTRAP_SEED, max_cutoffs: int = ROLLOUT_MAX_CUTOFFS) -> dict:
    """Refit on every expanding prefix of the points ordered by `order_key` (points with equal values
    enter together) from `min_fit` distinct values on, and predict every larger point. fit_fn(prefix,
    n_bootstrap, seed) returns a fit. With more candidate cutoffs than max_cutoffs, an evenly spaced
    subset is refitted, the largest always among them. The largest usable cutoff is the headline
    (rollout_headline); only it lists its predictions run by run, the others their summaries."""
    vals = np.array([p[order_key] for p in points], dtype=float)
    levels = np.unique(vals)
    candidates = levels[min_fit - 1:-1]                    # the last value fitted at each cutoff
    if not len(candidates):
        return {"available": False, "reason": f"needs at least {min_fit + 1} distinct {order_key} ({min_fit} to "
                                              f"fit, one larger to predict), got {len(levels)}"}
    cutoffs = []
    for i in _cutoff_indices(len(candidates), max_cutoffs):
        fit_mask = vals <= candidates[i]
        fit = fit_fn([p for p, m in zip(points, fit_mask) if m], n_bootstrap, seed)
        row = {"fit_up_to": float(candidates[i]), "n_fit_points": int(fit_mask.sum())}
        if not fit.get("available"):
            cutoffs.append({**row, "available": False, "reason": fit["reason"]})
            continue
        held = [p for p, m in zip(points, fit_mask) if not m]
        cutoffs.append({**row, "available": True, "n_bootstrap": fit["n_bootstrap"],
                        **_predict_held_out(fit, held, seed)})
    usable = [i for i, c in enumerate(cutoffs) if c["available"]]
    for i, c in enumerate(cutoffs):
        if usable and i != usable[-1]:
            c.pop("runs", None)
    return {"available": bool(usable), "order": order_key, "n_candidate_cutoffs": int(len(candidates)),
            "cutoffs": cutoffs, "headline_cutoff": usable[-1] if usable else None,
            **({} if usable else {"reason": f"no cutoff could be fitted: {cutoffs[-1]['reason']}"})}


def rollout_headline(ro: dict) -> dict | None:
    """A rollout's largest usable cutoff: its headline check."""
    i = ro.get("headline_cutoff")
    return ro["cutoffs"][i] if i is not None else None


def rollout_one_variable(runs: list[dict], key: str, n_bootstrap: int = ROLLOUT_BOOTSTRAP,
                         seed: int = BOOTSTRAP_SEED) -> dict:
    """Rollout of one sweep's L = c + a x^-b: fit the runs at the 3 smallest x, then 4, ..., and
    predict every run at a larger x."""
    points = [{"name": r["name"], "x": float(r[key]), "loss": float(r["loss"])} for r in runs]
    out = rollout(points, "x", 3, lambda pts, nb, s: fit_power_law([p["x"] for p in pts], [p["loss"] for p in pts],
                                                                   nb, s), n_bootstrap, seed)
    var = {"N_nonembedding": "N", "D": "D"}.get(key, key)
    return {**out, "order": f"{var}, ascending (runs at equal {var} enter together)"}


def rollout_joint(points: list[dict], n_bootstrap: int = ROLLOUT_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Rollout of the joint law, points ordered by compute C (the runs' real FLOPs): fit the 6 cheapest
    runs or more, predict every costlier one."""
    pts = [{**p, "C": point_flops(p)} for p in points]
    out = rollout(pts, "C", 6, lambda ps, nb, s: fit_joint_law([p["N"] for p in ps], [p["D"] for p in ps],
                                                               [p["loss"] for p in ps], nb, s,
                                                               rows=point_rows(ps)), n_bootstrap, seed)
    return {**out, "order": "compute C (FLOPs per token x D), ascending (runs at equal C enter together)"}


def run_row(e: dict) -> tuple:
    """The row a run's loss shares its noise with: its stable run (itself, or the run it branched
    from) and its seed. A WSD branch starts from its stable run's weights and data order."""
    return (e.get("branch_of") or e.get("name"), e.get("seed") or 0)


def runs_as_points(points: list[dict], n_count: str = DEFAULT_N_COUNT) -> list[dict]:
    """The joint law's points (completed, not the --validate run) with the fit's columns added: N
    counted as `n_count` (a row without a total count falls back to non-embedding), C the run's real
    training FLOPs, and the row its loss shares noise with (run_row)."""
    out = []
    for p in fitted_runs(as_points(points)):
        n = p[N_COUNTS[n_count]] or p["N_nonembedding"]
        vals = (n, p["D"], p["loss"])
        if p["status"] == "completed" and all(v is not None and np.isfinite(v) and v > 0 for v in vals):
            out.append({**p, "row": run_row(p), "N": float(n), "D": float(p["D"]), "C": float(p["flops"]),
                        "loss": float(p["loss"])})
    return out


def point_rows(points: list[dict]):
    """The points' rows for fit_joint_law, or None (independent) when the points carry none."""
    return [p["row"] for p in points] if points and all(p.get("row") is not None for p in points) else None


def point_flops(p: dict) -> float:
    return p.get("C") or 6.0 * p["N"] * p["D"]


def analyse_points(points: list[dict], fits: dict, n_bootstrap: int, seed: int) -> dict:
    """The hold-out checks of the joint law and the compute-optimal allocation over a set of points."""
    holdout = {}
    if fits["joint"].get("available"):
        for axis in ("N", "D"):
            holdout[f"joint_largest_{axis}"] = holdout_joint(points, axis, n_bootstrap, seed)
        holdout["rollout_joint"] = rollout_joint(points, min(n_bootstrap, ROLLOUT_BOOTSTRAP), seed)
    else:
        for key in ("joint_largest_N", "joint_largest_D", "rollout_joint"):
            holdout[key] = {"available": False, "reason": f"the joint law is unavailable: {fits['joint']['reason']}"}
    co = compute_optimal(fits["joint"], [point_flops(p) for p in points], flops_per_nd(points))
    return {"holdout": holdout, "compute_optimal": co,
            "isoflop": fit_isoflop(points, fits["joint"], n_bootstrap, seed)}


def tokens_per_parameter_by_count(points: list[dict], fits: dict, n_bootstrap: int, seed: int) -> dict:
    """Tokens per parameter at the compute-optimal point under both N counts, each from its own joint
    law (the fitted count's is compute_optimal's; the other is refitted here), at the largest run's
    compute and at 1e18 FLOPs, each with its interval; and the largest run's own D / N under both."""
    out = {}
    for count in N_COUNTS:
        pts = runs_as_points(points, count)
        if not pts:
            continue
        joint = fits["joint"] if fits["joint"].get("n_count") == count else fit_joint_law(
            [p["N"] for p in pts], [p["D"] for p in pts], [p["loss"] for p in pts], n_bootstrap, seed,
            rows=point_rows(pts)) | {"n_count": count}
        largest = max(pts, key=point_flops)
        row = {"largest_run": largest["name"], "largest_run_tokens_per_parameter": largest["D"] / largest["N"],
               "alpha": joint.get("alpha"), "alpha_ci95": (joint.get("ci95") or {}).get("alpha")}
        co = compute_optimal(joint, [point_flops(largest)], flops_per_nd(pts))
        for b in co.get("budgets", []):
            if b["label"].startswith("runs:") or b["label"] == "1e18 FLOPs":
                key = "at_largest_run_compute" if b["label"].startswith("runs:") else "at_1e18_flops"
                row[key] = {"flops": b["flops"], "tokens_per_parameter": b["tokens_per_parameter"],
                            "tokens_per_parameter_ci95": b["tokens_per_parameter_ci95"]}
        out[count] = row
    return out


def strip_private(obj):
    """A copy without the keys starting with '_' (bootstrap rows and internal units), for JSON."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def fit_order(p: dict) -> tuple:
    """A fixed order of the points, so that the bootstrap's draws do not depend on the order the runs
    finished in: the plan's groups (a separate data sweep's runs, the branches, the stable runs), then
    N, D, seed and name."""
    group = 0 if str(p["name"]).startswith("data-") else 1 if p["branch_of"] else 2
    return group, p["N_nonembedding"] or 0, p["D"] or 0, p["seed"] or 0, str(p["name"])


def analyse_runs(runs: list[dict], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED,
                 n_count: str = DEFAULT_N_COUNT, corpus: dict | None = None) -> dict:
    """Everything results.json says about the fits of a set of training runs (points-table rows, or run
    records of any schema): `fits` (params, data, joint), `predictions`, `holdout`, `compute_optimal`.
    Pure; never raises on degenerate runs. The --validate run, a check of these fits, is left out."""
    points = sorted(fitted_runs(as_points(runs)), key=fit_order)
    fits = fit_sweeps(points, n_bootstrap, seed, n_count)
    holdout = {}
    for sweep, key in SWEEP_X.items():
        used = usable_runs(points, sweep)
        holdout[sweep] = holdout_one_variable(used, key, n_bootstrap, seed)
        holdout[f"rollout_{sweep}"] = rollout_one_variable(used, key, min(n_bootstrap, ROLLOUT_BOOTSTRAP), seed)
    extra = analyse_points(runs_as_points(points, n_count), fits, n_bootstrap, seed)
    holdout.update(extra["holdout"])
    out = {"fits": fits, "predictions": predictions_from_fits(fits, sweep_fixed_values(points)),
           "holdout": holdout,
           "compute_optimal": extra["compute_optimal"], "isoflop": extra["isoflop"]}
    if fits["joint"].get("available"):
        out["compute_optimal"]["tokens_per_parameter_by_count"] = tokens_per_parameter_by_count(
            points, fits, n_bootstrap, seed)
    out["reference_models"] = reference_predictions(fits["joint"], corpus)
    return strip_private(out)


# --- a table of runs (--fit-csv) --------------------------------------------------------------------

def read_runs_csv(path: Path) -> list[dict]:
    """Rows of a CSV with columns N, D, loss (optional name and branch_of, as the runner writes them:
    a run and the stable run it branched from) as points; with branch_of each point carries its row
    (the stable run's name), whose points share their noise. A malformed file raises UserError naming
    the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--fit-csv {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise UserError(f"--fit-csv {path}: the file is empty; give a header line 'N,D,loss' and one run a line")
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in ("N", "D", "loss") if c not in header]
    if missing:
        raise UserError(f"--fit-csv {path} line 1: missing column(s) {', '.join(missing)}; the header must "
                        f"name N, D and loss (optionally name), found {', '.join(header) or 'nothing'}")
    idx = {c: header.index(c) for c in ("N", "D", "loss")}
    name_i = header.index("name") if "name" in header else None
    branch_i = header.index("branch_of") if "branch_of" in header else None
    if branch_i is not None and name_i is None:
        raise UserError(f"--fit-csv {path} line 1: a branch_of column needs a name column (the runs it names)")
    status_i = header.index("status") if "status" in header else None     # runs.csv's
    points = []
    for line_no, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"--fit-csv {path} line {line_no}: {len(row)} field(s), the header has {len(header)}")
        if status_i is not None and row[status_i].strip() not in ("", "completed"):
            continue                        # a diverged run of runs.csv: no final loss to fit
        p = {"name": row[name_i].strip() if name_i is not None else f"line {line_no}", "line": line_no}
        if branch_i is not None:
            p["row"] = row[branch_i].strip() or p["name"]
        for col, i in idx.items():
            try:
                p[col] = float(row[i])
            except ValueError:
                raise UserError(f"--fit-csv {path} line {line_no}: column {col} is '{row[i].strip()}', "
                                f"not a number") from None
        points.append(p)
    if not points:
        raise UserError(f"--fit-csv {path}: a header but no rows; give one run a line")
    return points


def analyse_table(points: list[dict], n_bootstrap: int = N_BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> dict:
    """Joint law, hold-out checks and compute-optimal allocation of a table of runs."""
    fits = {"joint": fit_joint_law([p["N"] for p in points], [p["D"] for p in points],
                                   [p["loss"] for p in points], n_bootstrap, seed, rows=point_rows(points))}
    _, _, ok, notes = clean_points({"N": [p["N"] for p in points], "D": [p["D"] for p in points]},
                                   [p["loss"] for p in points])
    usable = [p for p, k in zip(points, ok) if k]
    extra = analyse_points(usable, fits, n_bootstrap, seed)
    for sweep in SWEEP_X:
        fits[sweep] = {"available": False, "reason": "a table of runs has no sweep; see fits.joint",
                       "n_points": 0, "x": SWEEP_X[sweep]}
    dropped = [p["line"] for p, k in zip(points, ok) if not k]
    return strip_private({"fits": fits, "predictions": [], "holdout": extra["holdout"],
                          "compute_optimal": extra["compute_optimal"], "isoflop": extra["isoflop"],
                          "rows_left_out": {"lines": dropped, "why": notes} if dropped else None})

# --- --lr-sweep: a parabola in log LR per size, its optimum with an interval, the rule checked --------

LR_RULE_TOLERANCE = 1.3            # warn when the rule's LR is more than this factor from a size's optimum
LR_DRAWS = 4000                    # coefficient draws behind each optimum's 95% interval


def fit_lr_parabola(lrs, losses, n_draws: int = LR_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """Least-squares parabola loss = q u^2 + r u + s in u = ln(LR) - mean, and its vertex: the optimum LR.

    The interval: coefficient draws from the fit's covariance (residual variance on n - 3 degrees of
    freedom, Student-t draws), each draw's vertex, its 2.5th and 97.5th percentiles. A draw that opens
    downward has its optimum at the tried range's lower-loss edge, beyond it (+-inf); a percentile
    outside the tried range is reported unbounded (None): a sweep cannot place an optimum it did not
    bracket. The point estimate is None, with `edge` "below" or "above", when the vertex is outside the
    tried range or the parabola opens downward. Conditional on one seed: the runs of a size share their
    initialisation and batches, so the residuals hold the curve's misfit, not the seed's luck."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    ok = np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0)
    x, y = np.log(lrs[ok]), losses[ok]
    if len(np.unique(x)) < 3:
        return _unavailable("fewer than 3 learning rates with a finite loss", int(ok.sum()))
    centre = float(x.mean())
    u = x - centre
    X = np.stack([u * u, u, np.ones_like(u)], axis=1)                        # (n, 3)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    q, r, s = (float(c) for c in coef)
    lo_u, hi_u = float(u.min()), float(u.max())
    loss_at = lambda uu: q * uu * uu + r * uu + s                            # noqa: E731
    edge = None
    if q <= 0:
        edge = "above" if loss_at(hi_u) < loss_at(lo_u) else "below"
        reason = "the parabola opens downward: the loss has no minimum inside the tried range"
    else:
        u_opt = -r / (2 * q)
        if not lo_u <= u_opt <= hi_u:
            edge = "above" if u_opt > hi_u else "below"
        reason = f"the optimum lies {edge} the tried range" if edge else None
    out = {"available": True, "n_points": len(x), "coef": [q, r, s], "centre_log_lr": centre,
           "lr_tried": [float(np.exp(x.min())), float(np.exp(x.max()))], "edge": edge, "reason": reason,
           "optimum_lr": None if edge else float(np.exp(u_opt + centre)),
           "loss_at_optimum": None if edge else float(loss_at(u_opt)),
           "optimum_lr_ci95": None, "residual_std": None}
    dof = len(x) - 3
    if dof == 0:
        out["reason"] = (reason + "; " if reason else "") + "3 points fit exactly: no interval"
        return out
    residual_var = float(np.sum((y - X @ coef) ** 2)) / dof
    out["residual_std"] = math.sqrt(residual_var)
    rng = np.random.default_rng(seed)
    cov = residual_var * np.linalg.inv(X.T @ X)
    z = rng.multivariate_normal(np.zeros(3), cov, size=n_draws, method="eigh")
    draws = coef + z / np.sqrt(rng.chisquare(dof, size=(n_draws, 1)) / dof)        # (S, 3), Student-t
    dq, dr, ds = draws.T
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(dq > 0, -dr / (2 * dq), np.nan)
    lower_edge_wins = dq * hi_u**2 + dr * hi_u < dq * lo_u**2 + dr * lo_u           # (S,) loss lower at the top
    vertex = np.where(np.isnan(vertex), np.where(lower_edge_wins, np.inf, -np.inf), vertex)
    v = np.sort(vertex)
    lo, hi = v[int(math.floor(0.025 * (n_draws - 1)))], v[int(math.ceil(0.975 * (n_draws - 1)))]
    out["optimum_lr_ci95"] = [float(np.exp(lo + centre)) if lo >= lo_u else None,
                              float(np.exp(hi + centre)) if hi <= hi_u else None]
    out["draws_without_optimum"] = round(float(np.mean(dq <= 0)), 4)
    return out


def optimum_over_rule(fit: dict, rule_lr: float) -> dict:
    """The optimum as a multiple of the rule's LR, with its interval (None: unbounded); at an edge the
    point is None and the interval says which side: [largest multiple tried, None] or [None, smallest]."""
    if not fit.get("available"):
        return {"optimum_over_rule": None, "optimum_over_rule_ci95": None}
    lo_m, hi_m = (lr / rule_lr for lr in fit["lr_tried"])
    if fit["edge"]:
        return {"optimum_over_rule": None,
                "optimum_over_rule_ci95": [hi_m, None] if fit["edge"] == "above" else [None, lo_m]}
    ci = fit["optimum_lr_ci95"]
    return {"optimum_over_rule": fit["optimum_lr"] / rule_lr,
            "optimum_over_rule_ci95": None if ci is None else [None if c is None else c / rule_lr for c in ci]}


def rule_off_factor(size: dict) -> float | None:
    """How far the rule is from the optimum, as a factor >= 1 (at an edge: at least this far); None
    when the fit is unavailable."""
    ratio, ci = size.get("optimum_over_rule"), size.get("optimum_over_rule_ci95")
    if ratio is not None:
        return max(ratio, 1 / ratio)
    if ci and (ci[0] is None) != (ci[1] is None):
        bound = ci[0] if ci[0] is not None else ci[1]
        return max(bound, 1 / bound)
    return None


def lr_rule_warnings(sizes: list[dict], tolerance: float = LR_RULE_TOLERANCE) -> list[str]:
    """One line per size whose optimum is more than `tolerance` x from the rule's LR (either way)."""
    lines = []
    for sz in sizes:
        factor = rule_off_factor(sz)
        if factor is None or factor <= tolerance:
            continue
        at_least = "at least " if sz["optimum_over_rule"] is None else ""
        higher = sz["optimum_over_rule"] > 1 if sz["optimum_over_rule"] is not None else sz["edge"] == "above"
        lines.append(f"warning: the LR rule is {at_least}{factor:.2f}x off at "
                     f"{format_count(sz['n_params_nonembedding'])} (d_model {sz['d_model']}): the optimum is "
                     f"{'higher' if higher else 'lower'} than the rule's {sz['rule_lr']:.3g} "
                     f"(tolerance {tolerance:g}x)")
    return lines


def analyse_lr_sweep(runs: list[dict], uncapped_lr: Callable[[int], float],
                     tolerance: float = LR_RULE_TOLERANCE, n_draws: int = LR_DRAWS, seed: int = BOOTSTRAP_SEED) -> dict:
    """--lr-sweep's results: a flat points table (size, multiplier, validation loss), one row per size
    (the parabola's optimum, its interval, the optimum over the rule) and the warning lines.
    A run's multiplier is in its name (build_lr_sweep_plan's); the rule's LR is its peak LR over it, as
    trained. `uncapped_lr(d_model)`: the preset's rule without its cap, for reference."""
    points, by_size = [], {}
    for e in sorted(as_points(runs), key=lambda e: (e["N_nonembedding"], e["peak_lr"])):
        multiplier = lr_multiplier_of(e["name"])
        points.append({"n_params_nonembedding": e["N_nonembedding"], "d_model": e["d_model"],
                       "multiplier": multiplier, "peak_lr": e["peak_lr"], "rule_lr": e["peak_lr"] / multiplier,
                       "final_val_loss": e["loss"], "status": e["status"]})
        by_size.setdefault((e["N_nonembedding"], e["d_model"]), []).append(points[-1])
    sizes = []
    for (n, d_model), pts in sorted(by_size.items()):
        fit = fit_lr_parabola([p["peak_lr"] for p in pts],
                              [np.nan if p["final_val_loss"] is None else p["final_val_loss"] for p in pts],
                              n_draws, seed)
        best = min((p for p in pts if p["final_val_loss"] is not None), key=lambda p: p["final_val_loss"],
                   default=None)
        rule_lr = float(np.median([p["rule_lr"] for p in pts]))
        sizes.append({"n_params_nonembedding": n, "d_model": d_model, "rule_lr": rule_lr,
                      "uncapped_rule_lr": uncapped_lr(d_model),
                      "best_multiplier": best and best["multiplier"], "best_loss": best and best["final_val_loss"],
                      **{k: fit.get(k) for k in ("available", "optimum_lr", "optimum_lr_ci95", "loss_at_optimum",
                                                 "edge", "reason", "residual_std", "draws_without_optimum",
                                                 "coef", "centre_log_lr", "lr_tried")},
                      **optimum_over_rule(fit, rule_lr)})
    return {"points": points, "sizes": sizes, "tolerance": tolerance,
            "warnings": lr_rule_warnings(sizes, tolerance),
            "interval": ("95% percentiles of the vertex over Student-t draws of the parabola's coefficients "
                         "(residual variance, n - 3 degrees of freedom); conditional on one seed and data order")}

# ----------------------------------------------------------------------------------------------------
# 10. figure: the 2x2 summary (loss vs N, loss vs D, and both sweeps' training curves)
# ----------------------------------------------------------------------------------------------------

# The figures redrawn after each run use this many bootstrap resamples (the final one uses --bootstrap).
INTERIM_BOOTSTRAP = 100

def save_figure_atomic(fig, path: Path) -> None:
    """Write a figure to a temporary file and rename it, so a reader never sees half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def saved_curves(out_dir: Path) -> dict[str, dict]:
    """run_id -> training curve, from the run records under out_dir/runs/ (results.json holds none)."""
    curves = {}
    for path in sorted((Path(out_dir) / "runs").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(path.read_text())
            if isinstance(rec, dict) and isinstance(rec.get("curve"), dict):
                curves[rec.get("run_id", path.stem)] = rec["curve"]
    return curves


def draw_figures(results: dict, out_dir: Path, curves: dict | None = None) -> None:
    """scaling_laws_complete.png and compute_optimal.png, each written atomically; a plotting error is
    one log line, never a lost result or a stopped run. The training curves are the run records' under
    out_dir/runs/ unless `curves` (run_id -> curve) gives them."""
    curves = saved_curves(out_dir) if curves is None else curves
    for name, plot in (("scaling_laws_complete.png", lambda r, p: plot_scaling_figure(r, p, curves)),
                       ("compute_optimal.png", plot_compute_optimal_figure)):
        try:
            plot(results, out_dir / name)
        except Exception as e:   # the results are already on disk; say what failed and go on
            log(f"figure: could not draw {name} ({type(e).__name__}: {e})")


# The interim figures take at most about this share of a study's wall time (RedrawClock).
INTERIM_FIGURE_SHARE = 0.2


@dataclasses.dataclass
class RedrawClock:
    """When the interim figures are due: after the first finished run, then once the time since the
    last redraw ended is at least (1 / INTERIM_FIGURE_SHARE - 1) = 4 times what that redraw took. A redraw
    costs about 2 s, so runs of 10 s or more get one each; a plan of second-long runs (a smoke test, a
    small grid on a GPU) is not slowed several-fold by figures nobody opens before it ends. The final
    figures are always drawn."""
    last_end: float | None = None
    last_cost: float = 0.0

    def due(self) -> bool:
        return self.last_end is None or (time.time() - self.last_end
                                         >= self.last_cost * (1 / INTERIM_FIGURE_SHARE - 1))

    def drawn(self, t0: float) -> None:
        self.last_end = time.time()
        self.last_cost = self.last_end - t0


def draw_interim_figures(results: dict, out_dir: Path, n_runs_total: int,
                         clock: RedrawClock, n_bootstrap: int = INTERIM_BOOTSTRAP) -> None:
    """The figures of the runs finished so far, redrawn after each run so they can be opened before the
    plan ends: fits on partial data (unavailable while too few points), `n_bootstrap` resamples (fewer
    than the final figure's, to stay cheap), said in the title. A failure is one log line. An
    --lr-sweep has no scaling laws to draw: its one figure waits for the end (a redraw costs seconds).
    Only when the session's `clock` says a redraw is due."""
    if results["config"].get("lr_multipliers") or not clock.due():
        return
    t0 = time.time()
    done = [p for p in results["points"] if p["status"] in FINAL_STATUSES]
    interim = {**results, "points": done,
               "interim": f"interim: {len(done)} of {n_runs_total} runs, {n_bootstrap} bootstrap resamples"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interim.update(analyse_runs(done, n_bootstrap,
                                        n_count=(results.get("config") or {}).get("n_count") or DEFAULT_N_COUNT,
                                        corpus=(results.get("environment") or {}).get("corpus")))
            flag_rising_losses(interim["fits"])
    except Exception as e:
        log(f"figure: the interim fits failed ({type(e).__name__}: {e}); the figures wait for the next run")
        return
    draw_figures(interim, out_dir)
    clock.drawn(t0)
    log(f"figure: redrawn {out_dir / 'scaling_laws_complete.png'} ({interim['interim']}; "
        f"{format_duration(time.time() - t0)})")


def plot_scaling_figure(results: dict, path: Path, curves: dict | None = None) -> None:
    save_figure_atomic(build_scaling_figure(results, curves or {}), path)


def seed_groups(xs, ys) -> list[tuple[float, float, float, float, int]]:
    """(x, mean, lowest, highest, number of runs) per distinct x: the spread over repeated seeds."""
    out = []
    for x in sorted(set(np.asarray(xs, dtype=float).tolist())):
        vals = np.asarray(ys, dtype=float)[np.asarray(xs, dtype=float) == x]
        out.append((x, float(vals.mean()), float(vals.min()), float(vals.max()), int(len(vals))))
    return out


def build_scaling_figure(results: dict, curves: dict):
    """The 2x2 figure of a results dict: (1) loss vs N, (2) loss vs D, (3)-(4) the sweeps' curves
    (`curves`: run_id -> curve; a run without one is left out of panels 3 and 4)."""
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    draw_law_panel(axes[0][0], results, "params", "o", "non-embedding parameters N")
    draw_law_panel(axes[0][1], results, "data", "s", "training tokens D")
    # panel 3 from blue (smallest N) to yellow (largest), panel 4 from purple (least D) to yellow
    draw_curves_panel(axes[1][0], results["points"], curves, "params", "3. training curves, parameter sweep",
                      plt.get_cmap("cividis"))
    draw_curves_panel(axes[1][1], results["points"], curves, "data", "4. training curves, data sweep",
                      plt.get_cmap("viridis"))
    env = results.get("environment", {})
    corpus = env.get("corpus", {})
    fig.suptitle(f"Scaling laws, mode '{results.get('mode')}' on {env.get('device', '?')}: "
                 f"{corpus.get('name', '?')}" + (f" ({results['interim']})" if results.get("interim") else ""),
                 fontsize=14)
    fig.text(0.5, 0.008, f"Predicted losses are for this corpus ({corpus.get('name', '?')}) and tokenizer "
             f"({corpus.get('tokenizer', '?')}), not the named models' own losses;\nextrapolating many "
             f"orders of magnitude from these runs is uncertain, and the bands only show how much the fit "
             f"moves when the runs are resampled.", ha="center", fontsize=9, style="italic")
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    return fig


def draw_law_panel(ax, results: dict, sweep: str, marker: str, xlabel: str) -> None:
    """Panel 1 or 2: one sweep's final losses, its fit and extrapolation with the 95% band, the reference
    models' predictions, Kaplan's law, the hold-out check and (panel 1) the --validate run."""
    x_max, key = X_MAX[sweep], SWEEP_X[sweep]
    runs = [r for r in usable_runs(results["points"], sweep) if r[key] and r[key] > 0 and r["loss"] > 0]
    xs = np.array([r[key] for r in runs], dtype=float)
    ys = np.array([r["loss"] for r in runs], dtype=float)
    draw_measured(ax, xs, ys, marker)
    fit = results["fits"].get(sweep, {})
    lo = xs.min() / 2 if len(xs) else 1e4
    grid_all = np.logspace(np.log10(lo), np.log10(x_max), 300)
    ref = kaplan_law(grid_all, sweep)
    xc, alpha = KAPLAN[sweep]
    ax.plot(grid_all, ref, ":", color="green", lw=1.5,
            label=f"Kaplan et al. 2020: ({xc:.1e}/{'N' if sweep == 'params' else 'D'})^{alpha}"
                  f" (WebText2, GPT-2 tokenizer)")
    if fit.get("available"):
        draw_fit(ax, fit, sweep, xs, x_max, reference_marks(results, sweep),
                 sweep_fixed_values(results["points"]).get(sweep))
    else:
        ax.text(0.5, 0.5, f"fit unavailable:\n{_wrap(fit.get('reason', 'no runs'))}",
                transform=ax.transAxes, ha="center", va="center", color="darkred", fontsize=11)
    if sweep == "data" and (note := repetition_note(results.get("data_budget") or {})):   # past 4 epochs
        ax.text(0.02, 0.15, _wrap(note, 75), transform=ax.transAxes, fontsize=8, color="darkred",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
    draw_holdout(ax, results.get("holdout", {}), sweep, key)
    if sweep == "params":
        draw_validation(ax, results.get("validation"), "N")
    ax.set_xscale("log")
    ax.set_xlim(lo, x_max * 3)
    bottom = min([*(ys if len(ys) else [2]), *ref[-1:]]) * 0.8
    if fit.get("available"):
        bottom = min(bottom, power_law(x_max, fit["a"], fit["b"], fit["c"]) * 0.9)
        if fit.get("band95"):       # show the band's lower edge too, within reason
            bottom = min(bottom, max(min(fit["band95"]["lo"]), bottom / 3))
    ax.set_ylim(max(0, bottom), (ys.max() * 1.05 if len(ys) else 10) * 1.1)
    marks = reference_marks(results, sweep)
    if marks:
        bottom = min(bottom, *(p["predicted_loss"] * 0.9 for p in marks))
        ax.set_ylim(max(0, bottom), (ys.max() * 1.05 if len(ys) else 10) * 1.1)
    if fit.get("available"):
        label_predictions(ax, marks, sweep, x_max)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{'1' if sweep == 'params' else '2'}. loss vs {xlabel}", fontsize=12)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")


def draw_measured(ax, xs: np.ndarray, ys: np.ndarray, marker: str) -> None:
    """The final losses; with repeated seeds each run faint and the mean with its range."""
    groups = seed_groups(xs, ys)
    if any(n > 1 for *_, n in groups):
        ax.scatter(xs, ys, c="tab:blue", marker=marker, s=18, alpha=0.35, zorder=4, label="each seed")
        gx, gmean, glo, ghi = (np.array([g[i] for g in groups]) for i in range(4))
        ax.errorbar(gx, gmean, yerr=[gmean - glo, ghi - gmean], fmt=marker, color="tab:blue", ms=8,
                    capsize=4, zorder=5, label=f"mean of {max(n for *_, n in groups)} seeds "
                                               f"(bars: lowest to highest)")
    else:
        ax.scatter(xs, ys, c="tab:blue", marker=marker, s=60, zorder=5, label="measured (final val loss)")


def draw_fit(ax, fit: dict, sweep: str, xs: np.ndarray, x_max: float, predictions: list[dict],
             fixed: float | None = None) -> None:
    """The fitted law over the runs (solid, labelled with the D or N it holds fixed), its extrapolation
    (dashed) and 95% band, and a star at every reference model (reference_marks: the joint law at the
    model's own N and D) with its predicted loss and interval."""
    a, b, c = fit["a"], fit["b"], fit["c"]
    inside = np.logspace(np.log10(xs.min()), np.log10(xs.max()), 100)
    beyond = np.logspace(np.log10(xs.max()), np.log10(x_max), 200)
    var = "N" if sweep == "params" else "D"
    ax.plot(inside, power_law(inside, a, b, c), "-", color="red", lw=2,
            label=f"fit: L = {floor_text(c, fit.get('c_at_bound'), '{:.3g}')} + "
                  f"{power_term(f'{a:.3g}', var, b, 3)}  (R² = {fit['r2']:.3f})"
                  + (f"\n  at {'D' if sweep == 'params' else 'N'} = {format_count(fixed)}"
                     f"{' tokens' if sweep == 'params' else ' parameters'} (held fixed)" if fixed else "")
                  + ("\n  c at its bound 0: no floor identified, far predictions likely too low"
                     if fit.get("c_at_bound") else "")
                  + (f"\n  {rising_note(var)}" if b < 0 else ""))
    ax.plot(beyond, power_law(beyond, a, b, c), "--", color="red", lw=1.5, label="extrapolation")
    band = fit.get("band95")
    if band:
        ax.fill_between(band["x"], band["lo"], band["hi"], color="red", alpha=0.12, lw=0,
                        label=f"95% band (bootstrap over {fit['n_points']} runs)")
    else:
        ax.plot([], [], " ", label="no 95% band: " + (fit.get("note") or "no bootstrap")[:60])
    marks = marked_predictions(predictions, sweep)
    shared = shared_prediction_text(marks)
    for i, p in enumerate(marks):
        ax.plot([p["N" if sweep == "params" else "D"]], [p["predicted_loss"]], "*", color="darkred", ms=13,
                zorder=6, label=("joint law L(N, D) at each model's own N and D"
                                 + (f": {shared} for every one" if shared else "")) if i == 0 else None)


def prediction_text(p: dict) -> str:
    """'1.98 [1.69, 2.13]': a star's predicted loss and its closed interval."""
    ci = p.get("predicted_loss_ci95")
    ci = ci if ci and not is_open(ci) else None
    return f"{p['predicted_loss']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def shared_prediction_text(marks: list[dict]) -> str | None:
    """The stars' common value when every one prints the same loss (far beyond the runs the joint law is at
    its floor for all of them), with the union of their intervals: said once in the legend instead of on
    five overlapping labels."""
    if len(marks) < 2 or len({f"{p['predicted_loss']:.2f}" for p in marks}) > 1:
        return None
    cis = [p.get("predicted_loss_ci95") for p in marks]
    if any(not ci or is_open(ci) for ci in cis):
        return f"{marks[0]['predicted_loss']:.2f}"
    return f"{marks[0]['predicted_loss']:.2f}, 95% within [{min(c[0] for c in cis):.2f}, {max(c[1] for c in cis):.2f}]"


def reference_marks(results: dict, sweep: str) -> list[dict]:
    """The reference stars of panel 1 (at N) or 2 (at D): results.json's reference_models, each the
    joint law at the model's published N and D, labelled with both."""
    return [{**p, "sweep": sweep, "name": f"{p['name']}, {format_count(p['D'])} tokens"}
            for p in results.get("reference_models") or [] if p.get("predicted_loss") is not None]


def marked_predictions(predictions: list[dict], sweep: str) -> list[dict]:
    """The reference models a law panel marks: this sweep's, with a predicted loss."""
    return [p for p in predictions if p["sweep"] == sweep and p["predicted_loss"] is not None]


def label_predictions(ax, predictions: list[dict], sweep: str, x_max: float) -> None:
    """Each marked reference model's name, predicted loss and interval beside its star; called once the
    y-limits are set. Neighbours (GPT-3/GPT-4, LLaMA/Llama 2) sit close on a log axis, so labels alternate
    above, below, further below; stars in the upper 40% of the panel, where the legend is, are labelled
    below only (on a high floor LLaMA's label went under the legend). A label at the right edge extends to
    the left."""
    lo, hi = ax.get_ylim()
    key = "N" if sweep == "params" else "D"
    marks = sorted(marked_predictions(predictions, sweep), key=lambda p: p[key])   # neighbours alternate
    shared = shared_prediction_text(marks)          # then the legend gives the value and labels name only
    if shared:                                      # stars at one x (Llama 3 at 15T tokens) share one label
        short = lambda p: p["name"].split(" (")[0].split(", ")[0]                 # noqa: E731
        at = lambda p: round(math.log10(p[key]), 1)                                # noqa: E731
        by_x: dict[float, list[str]] = {}
        for p in marks:
            by_x.setdefault(at(p), []).append(short(p))
        marks = [{**p, "name": ", ".join(by_x[at(p)])} for p in marks if short(p) == by_x[at(p)][0]]
    for i, p in enumerate(marks):
        x, y = p["N" if sweep == "params" else "D"], p["predicted_loss"]
        offsets = ((0, -30), (0, -56), (0, -82)) if y > lo + 0.6 * (hi - lo) else ((0, 12), (0, -30), (0, -56))
        if shared:
            offsets = ((0, 12), (0, -22), (0, 26), (0, -36)) if y <= lo + 0.6 * (hi - lo) else \
                ((0, -22), (0, -36), (0, -50), (0, -64))
        name = f"{p['name'].split(' (')[0]}{'' if p.get('law') == 'joint' else ' ' + format_count(x)}"
        ax.annotate(name if shared else f"{name}\n{prediction_text(p)}",
                    (x, y), textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=7.5,
                    ha="right" if x > x_max / 3 else "center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})


def draw_holdout(ax, holdout: dict, sweep: str, key: str) -> None:
    """The held-out run circled, and the hold-out and rollout checks in a box at the bottom left."""
    ho = holdout.get(sweep)
    if not ho:
        return
    if ho.get("available"):
        ax.scatter([ho[key]], [ho["measured_loss"]], s=220, facecolors="none", edgecolors="black",
                   zorder=7, label="held out for the check below")
    text = holdout_text(ho, "N" if sweep == "params" else "D", holdout.get(f"rollout_{sweep}"))
    ax.text(0.02, 0.03, "\n".join(_wrap(line, 80) for line in text.split("\n")), transform=ax.transAxes,
            fontsize=8.5, va="bottom", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.6"})


def draw_curves_panel(ax, points: list[dict], curves: dict, sweep: str, title: str, cmap) -> None:
    """Panels 3 and 4: validation (dots) and training (faint) curves of one sweep, one colour per size."""
    runs = sorted([p for p in points if SWEEP_ROLE[sweep] in p["roles"] and p["run_id"] in curves],
                  key=lambda p: (p["N_nonembedding"], p["D"]))
    sizes = sorted({(p["N_nonembedding"], p["D"]) for p in runs})
    labelled = set()
    for r in runs:
        size = (r["N_nonembedding"], r["D"])
        color = cmap(sizes.index(size) / max(1, len(sizes) - 1))   # repeated seeds share a colour
        cur = curves[r["run_id"]]
        label = (f"N = {format_count(r['N_nonembedding'])}" if sweep == "params"
                 else f"D = {format_count(r['D'])}")
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


def draw_validation(ax, v: dict | None, x: str) -> None:
    """The --validate run on a loss panel, at x = its N ('N') or its compute ('flops'): the prediction
    with its 95% prediction interval (thin bar) and confidence interval (thick bar), and the measured loss."""
    if not v or not v.get("available"):
        return
    xv, pred = v["N" if x == "N" else "flops"], v["predicted_loss"]
    for tag, width in (("pi95", 1.2), ("ci95", 4)):
        iv = v.get(f"predicted_loss_{tag}")
        if iv:
            ax.errorbar([xv], [pred], yerr=[[pred - iv[0]], [iv[1] - pred]], fmt="none", ecolor="purple",
                        elinewidth=width, capsize=6 if tag == "pi95" else 0, zorder=7)
    ax.plot([xv], [pred], "D", color="purple", mfc="white", ms=8, zorder=8,
            label=f"validate ({format_count(v['N'])} N, {format_count(v['D'])} D): predicted {pred:.3f} "
                  f"{_fmt_ci(v.get('predicted_loss_pi95'))} (bars: 95% PI, thick: CI)")
    if v.get("measured_loss") is not None:
        where = {True: "inside", False: "outside", None: "no interval"}[v.get("within_pi95")]
        ax.plot([xv], [v["measured_loss"]], "X", color="magenta", ms=12, zorder=9,
                label=f"validate: measured {v['measured_loss']:.3f}, error {100 * v['relative_error']:+.1f}% "
                      f"({where} the PI)")


def floor_text(value: float, at_bound: bool, fmt: str = "{:.4g}") -> str:
    """A fitted floor (c or E): '0 (at its bound)' when the fit pushed it to its bound, not 2.3e-67."""
    return "0 (at its bound)" if at_bound else fmt.format(value)


def power_term(coef_text: str, var: str, exponent: float, digits: int = 4) -> str:
    """'15.6/N^0.1766' for a loss that falls with N; '15.6 * N^+0.0003' when the fitted exponent is
    negative (the loss rises with N), never 'N^--0.0003'."""
    if exponent >= 0:
        return f"{coef_text}/{var}^{exponent:.{digits}f}"
    return f"{coef_text} * {var}^+{-exponent:.{digits}f}"


def rising_note(var: str) -> str:
    return f"the loss did not fall with {var}: the fitted exponent is negative"


def flag_rising_losses(fits: dict) -> None:
    """Name a negative exponent in the fits themselves: `loss_rises` (one-variable fits) or
    `loss_rises_with` (the joint law: ['N'], ['D'] or both), and a note saying so."""
    for sweep, var in (("params", "N"), ("data", "D")):
        fit = fits.get(sweep) or {}
        if fit.get("available"):
            fit["loss_rises"] = bool(fit["b"] < 0)
            if fit["loss_rises"]:
                fit["note"] = "; ".join(filter(None, [rising_note(var), fit.get("note")]))
    joint = fits.get("joint") or {}
    if joint.get("available"):
        joint["loss_rises_with"] = [v for v, k in (("N", "alpha"), ("D", "beta")) if joint[k] < 0]
        if joint["loss_rises_with"]:
            joint["note"] = "; ".join(filter(None, [rising_note(" or ".join(joint["loss_rises_with"])),
                                                    joint.get("note")]))


def _wrap(text: str, width: int = 60) -> str:
    return "\n".join(textwrap.wrap(str(text), width))


def _fmt_ci(ci, fmt="{:.3f}") -> str:
    """[lo, hi]; a side reported unbounded (None) reads "unbounded" and the interval is marked open."""
    if not ci:
        return "(no interval)"
    if ci[0] is None and ci[1] is None:
        return "(open: not identified by these runs)"
    text = f"[{'unbounded' if ci[0] is None else fmt.format(ci[0])}, {'unbounded' if ci[1] is None else fmt.format(ci[1])}]"
    return text + (" (open)" if is_open(ci) else "")


def _fmt_pct(ci) -> str:
    return _fmt_ci(ci and [None if v is None else 100 * v for v in ci], "{:+.1f}%")


def holdout_text(ho: dict, var: str, rollout: dict | None = None) -> str:
    """Two or three lines on a hold-out check (and its rollout, if given), for the log and the figure.
    Intervals: 95% confidence of the law, then ('new run') the 95% prediction interval."""
    if not ho.get("available"):
        text = f"hold-out check unavailable: {ho.get('reason')}"
    else:
        if "predicted_loss" in ho:
            what = (f"predicts {ho['predicted_loss']:.3f} {_fmt_ci(ho.get('predicted_loss_ci95'))} (new run "
                    f"{_fmt_ci(ho.get('predicted_loss_pi95'))}) vs measured {ho['measured_loss']:.3f}: error")
        else:
            what = f"predicts the {len(ho['runs'])} held-out run(s) with mean error"
        text = (f"hold-out: refit on {ho['n_fit_points']} runs without the largest {var} ({format_count(ho['held_out_value'])})\n"
                f"{what} {100 * ho['relative_error']:+.1f}% {_fmt_pct(ho.get('relative_error_ci95'))} "
                f"(new run {_fmt_pct(ho.get('relative_error_pi95'))})")
    return text + ("\n" + rollout_text(rollout) if rollout else "")


def rollout_text(ro: dict) -> str:
    """One line on a rollout check: its largest cutoff's mean absolute error and bias."""
    if not ro.get("available"):
        return f"rollout unavailable: {ro.get('reason')}"
    h = rollout_headline(ro)
    return (f"rollout over {len(ro['cutoffs'])} cutoffs by {ro['order'].split(',')[0]}; at the largest, "
            f"{h['n_fit_points']} runs predict {h['n_predicted']} with mean |error| "
            f"{100 * h['mean_abs_error']:.1f}% {_fmt_ci(h['mean_abs_error_ci95'] and [100 * v for v in h['mean_abs_error_ci95']], '{:.1f}%')}, "
            f"bias {100 * h['mean_bias']:+.1f}% {_fmt_pct(h['mean_bias_ci95'])}")


def plot_compute_optimal_figure(results: dict, path: Path) -> None:
    save_figure_atomic(build_compute_optimal_figure(results), path)


def draw_joint_panel(ax3, joint: dict, pts: list[dict], holdout: dict) -> None:
    """Panel 3 of compute_optimal.png: measured against joint-law loss, the hold-out runs marked."""
    if joint.get("available") and pts:
        measured = np.array([p["loss"] for p in pts])
        fitted = joint_law([p["N"] for p in pts], [p["D"] for p in pts], joint["E"], joint["A"], joint["B"],
                           joint["alpha"], joint["beta"])
        ax3.scatter(measured, fitted, s=18, color="tab:blue", label="joint fit on all runs")
        for axis, color in (("N", "tab:red"), ("D", "tab:green")):
            ho = holdout.get(f"joint_largest_{axis}", {})
            if ho.get("available"):
                m = [r["measured_loss"] for r in ho["runs"]]
                pr = [r["predicted_loss"] for r in ho["runs"]]
                ax3.scatter(m, pr, s=60, marker="D", facecolors="none", edgecolors=color,
                            label=f"held out: largest {axis}, error {100 * ho['relative_error']:+.1f}% "
                                  f"{_fmt_ci(ho.get('relative_error_ci95') and [100 * v for v in ho['relative_error_ci95']], '{:+.1f}%')}")
        lo, hi = measured.min() * 0.97, measured.max() * 1.03
        ax3.plot([lo, hi], [lo, hi], ":", color="gray")
        ax3.set_title(f"3. L = {floor_text(joint['E'], joint.get('E_at_bound'), '{:.3g}')} + "
                      f"{power_term(format(joint['A'], '.3g'), 'N', joint['alpha'], 3)} + "
                      f"{power_term(format(joint['B'], '.3g'), 'D', joint['beta'], 3)}  (R² = {joint['r2']:.3f})"
                      + (f"\n{rising_note(' or '.join(joint['loss_rises_with']))}"
                         if joint.get("loss_rises_with") else ""), fontsize=10)
        ax3.legend(fontsize=8)
    else:
        ax3.text(0.5, 0.5, _wrap(f"joint law L(N, D) unavailable: {joint.get('reason', 'not fitted')}"),
                 transform=ax3.transAxes, ha="center", va="center", color="darkred", fontsize=10)
        ax3.set_title("3. joint law L(N, D)", fontsize=10)
    ax3.set_xlabel("measured loss")
    ax3.set_ylabel("joint-law loss")
    ax3.grid(True, alpha=0.3)


def as_floats(values) -> np.ndarray:
    """A band's edge from results.json, where a budget no bootstrap draw reaches is null: NaN, not drawn."""
    return np.array(values, dtype=float)


def build_compute_optimal_figure(results: dict):
    """(1) loss vs compute C (the runs' real FLOPs): the runs and the joint law's compute-optimal frontier
    with its 95% band; (2) N_opt(C) and D_opt(C), tokens per parameter under both N counts; (3) measured
    vs joint-law loss, hold-out predictions marked."""
    joint = results.get("fits", {}).get("joint", {})
    pts = runs_as_points(results.get("points", []), joint.get("n_count") or DEFAULT_N_COUNT)
    co = results.get("compute_optimal", {})
    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    ax = axes[0]
    if pts:
        C = np.array([point_flops(p) for p in pts])
        sc = ax.scatter(C, [p["loss"] for p in pts], c=np.log10([p["N"] for p in pts]), cmap="viridis", s=25,
                        zorder=5, label="runs (colour: log10 N)")
        fig.colorbar(sc, ax=ax, label="log10 N")
    if co.get("available"):
        fr = co["frontier"]
        ax.plot(fr["flops"], fr["loss"], "-", color="red", lw=2, label="compute-optimal loss L(N_opt, D_opt)")
        if "loss_lo" in fr:
            ax.fill_between(fr["flops"], as_floats(fr["loss_lo"]), as_floats(fr["loss_hi"]), color="red",
                            alpha=0.15, lw=0, label="95% band")
        ax.set_xscale("log")
        for b in co["budgets"]:
            ax.plot([b["flops"]], [b["loss"]], "*", color="darkred", ms=10)
        ax2 = axes[1]
        for key, color, name in (("N_opt", "tab:blue", "N_opt (parameters)"), ("D_opt", "tab:orange", "D_opt (tokens)")):
            ax2.plot(fr["flops"], fr[key], "-", color=color, lw=2, label=name)
            if f"{key}_lo" in fr:
                ax2.fill_between(fr["flops"], as_floats(fr[f"{key}_lo"]), as_floats(fr[f"{key}_hi"]), color=color,
                                 alpha=0.15, lw=0)
        last = co["budgets"][-1]
        ax2.set_title(f"2. compute-optimal allocation ({co.get('constraint', 'C = 6 N D')}, N {co.get('n_count') or 'as given'})"
                      f"\nat {last['flops']:.3g} FLOPs: "
                      f"{last['tokens_per_parameter']:.3g} tokens/parameter "        # 1e25's can be 1e-4
                      f"{_fmt_ci(last.get('tokens_per_parameter_ci95'), '{:.3g}')}", fontsize=10)
        by_count = co.get("tokens_per_parameter_by_count") or {}
        lines = [f"tokens/parameter, N = {count} parameters: largest run {row['largest_run_tokens_per_parameter']:.3g}"
                 + "".join(f"; {where} {row[key]['tokens_per_parameter']:.3g} "
                           f"{_fmt_ci(row[key]['tokens_per_parameter_ci95'], '{:.3g}')}"
                           for key, where in (("at_largest_run_compute", "optimum at its C"),
                                              ("at_1e18_flops", "at 1e18")) if row.get(key))
                 for count, row in by_count.items()]
        if lines:
            ax2.text(0.02, 0.02, "\n".join(_wrap(t, 70) for t in lines), transform=ax2.transAxes, fontsize=7,
                     va="bottom", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.legend(fontsize=8)
    else:
        for a in axes[:2]:
            a.text(0.5, 0.5, _wrap(f"compute-optimal allocation unavailable: {co.get('reason', 'no joint fit')}"),
                   transform=a.transAxes, ha="center", va="center", color="darkred", fontsize=10)
        axes[1].set_title("2. compute-optimal allocation", fontsize=10)
    if pts and not co.get("available"):
        ax.set_xscale("log")
    ax.set_xlabel("training compute C = FLOPs per token x D")
    ax.set_ylabel("loss (nats/token)")
    draw_validation(ax, results.get("validation"), "flops")
    ax.set_title("1. loss vs compute, compute-optimal frontier of the joint law", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.5 * (hi - lo))           # headroom: the legend sits above the runs, not on them
    ax.legend(fontsize=7, loc="upper right")
    axes[1].set_xlabel("training compute C (FLOPs)")
    axes[1].grid(True, which="both", alpha=0.3)
    draw_joint_panel(axes[2], joint, pts, results.get("holdout", {}))
    fig.suptitle("Compute-optimal allocation from the joint law L(N, D) = E + A/N^alpha + B/D^beta", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    if not co.get("available"):          # never drawn as if it were an answer
        fig.text(0.5, 0.5, _wrap("NOT A COMPUTE-OPTIMAL ANSWER: " + str(co.get("reason", "the joint law is "
                                 "unavailable")), 70), ha="center", va="center", fontsize=18, color="darkred",
                 weight="bold", bbox={"facecolor": "white", "edgecolor": "darkred", "alpha": 0.9, "lw": 3})
    return fig

# --- --lr-sweep's figure: loss against the LR multiplier per size; each size's optimum against the rule ---

def plot_lr_sweep_figure(results: dict, path: Path) -> None:
    save_figure_atomic(build_lr_sweep_figure(results["lr_sweep"]), path)


def build_lr_sweep_figure(sweep: dict):
    """(1) final validation loss against LR / rule per size, the fitted parabola and the optimum with its
    95% interval (an arrow where it is beyond the tried range); (2) the optimum LR against d_model with
    the rule, capped and uncapped."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("viridis")
    sizes = sweep["sizes"]
    for i, sz in enumerate(sizes):
        colour = cmap(i / max(1, len(sizes) - 1))
        pts = [p for p in sweep["points"] if p["n_params_nonembedding"] == sz["n_params_nonembedding"]
               and p["final_val_loss"] is not None]
        label = f"N={format_count(sz['n_params_nonembedding'])} (d {sz['d_model']})"
        ax.plot([p["multiplier"] for p in pts], [p["final_val_loss"] for p in pts], "o", color=colour, label=label)
        if sz.get("coef"):
            q, r, s = sz["coef"]
            lr = np.geomspace(*sz["lr_tried"], 60)
            u = np.log(lr) - sz["centre_log_lr"]
            ax.plot(lr / sz["rule_lr"], q * u * u + r * u + s, "-", color=colour, lw=1, alpha=0.7)
        if sz.get("optimum_over_rule") is not None:
            m, y = sz["optimum_over_rule"], sz["loss_at_optimum"]
            lo, hi = sz["optimum_over_rule_ci95"] or (None, None)
            lo_m, hi_m = (lr / sz["rule_lr"] for lr in sz["lr_tried"])
            ax.errorbar([m], [y], xerr=[[m - (lo or lo_m)], [(hi or hi_m) - m]], fmt="*", ms=12, color=colour,
                        capsize=3, mec="k")
        elif sz.get("edge") and pts:
            end = (max if sz["edge"] == "above" else min)(pts, key=lambda p: p["multiplier"])
            ax.annotate("", xy=(end["multiplier"] * (1.3 if sz["edge"] == "above" else 1 / 1.3), end["final_val_loss"]),
                        xytext=(end["multiplier"], end["final_val_loss"]),
                        arrowprops={"arrowstyle": "->", "color": colour})
    ax.axvline(1.0, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("peak LR / the rule's LR")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"LR sweep at {format_count(sweep['horizon_tokens'])} tokens ({sweep['horizon_steps']} steps); "
                 f"* optimum, bar 95% (a bar that reaches the range's edge is unbounded)", fontsize=9)
    ax.legend(fontsize=8)
    widths = np.array([sz["d_model"] for sz in sizes], dtype=float)
    ax2.plot(widths, [sz["rule_lr"] for sz in sizes], "-", color="k", label="rule (as trained)")
    ax2.plot(widths, [sz["uncapped_rule_lr"] for sz in sizes], "--", color="grey", label="rule without its cap")
    for sz in sizes:
        x = sz["d_model"]
        tried = sz.get("lr_tried") or [sz["rule_lr"]] * 2
        ax2.plot([x, x], tried, "-", color="lightgrey", lw=6, solid_capstyle="butt")
        if sz.get("optimum_lr") is not None:
            lo, hi = sz["optimum_lr_ci95"] or (None, None)
            ax2.errorbar([x], [sz["optimum_lr"]], yerr=[[sz["optimum_lr"] - (lo or tried[0])],
                                                         [(hi or tried[1]) - sz["optimum_lr"]]],
                         fmt="*", ms=12, color="C3", capsize=3)
        elif sz.get("edge"):
            y = tried[1] if sz["edge"] == "above" else tried[0]
            ax2.plot([x], [y], "^" if sz["edge"] == "above" else "v", color="C3", ms=9)
    ax2.plot([], [], "*", color="C3", ms=10, label="optimum, 95% (to the edge: unbounded; triangle: beyond it)")
    ax2.plot([], [], "-", color="lightgrey", lw=6, label="range tried")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("d_model")
    ax2.set_ylabel("peak learning rate")
    ax2.set_title("optimum against the rule", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig

# ----------------------------------------------------------------------------------------------------
# 11. exports: runs.csv (a table any fitter reads) and the --tracker writers (TensorBoard, wandb)
# ----------------------------------------------------------------------------------------------------

# runs.csv's columns: N is counted as the study's joint law counts it (n_count: non-embedding or total),
# N_nonembedding and N_total give both counts; D is the run's tokens, flops the model's real FLOPs per
# token x D (6 N D where a record lacks them), loss the final validation loss (empty unless completed);
# --fit-csv reads N, D, loss, name and branch_of and skips rows whose status is not completed.
RUNS_CSV_COLUMNS = ("name", "run_id", "roles", "branch_of", "seed", "status",
                    "n_count", "N", "N_nonembedding", "N_total", "D", "flops", "loss")


def runs_table(points: list[dict], n_count: str = DEFAULT_N_COUNT) -> list[dict]:
    """runs.csv's rows: every finished run the fits may use (not the --validate run, a check of them),
    its roles joined by '+'."""
    rows = []
    for p in fitted_runs(as_points(points)):
        if p["status"] not in FINAL_STATUSES:
            continue
        counted = p[N_COUNTS[n_count]] is not None
        rows.append({"name": p["name"], "run_id": p["run_id"], "roles": "+".join(p["roles"]),
                     "branch_of": p["branch_of"], "seed": p["seed"], "status": p["status"],
                     "n_count": n_count if counted else "non-embedding",
                     "N": p[N_COUNTS[n_count]] if counted else p["N_nonembedding"],
                     "N_nonembedding": p["N_nonembedding"], "N_total": p["N_total"], "D": p["D"],
                     "flops": None if p["flops"] is None else float(p["flops"]), "loss": p["loss"]})
    return rows


def write_runs_csv(path: Path, points: list[dict], n_count: str = DEFAULT_N_COUNT) -> None:
    """runs.csv beside results.json (written after it), atomically; a missing value is an empty cell and
    floats keep every digit, so --fit-csv on it refits exactly the study's points."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RUNS_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in runs_table(points, n_count):
        writer.writerow({k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}     # --tracker NAME -> the pip package


def import_tracker(name: str):
    """The library behind --tracker NAME, imported only when it is chosen (neither is in requirements.txt);
    a missing one is a one-line UserError, raised before any work."""
    try:
        if name == "wandb":
            import wandb                                   # only with --tracker wandb
            return wandb
        import torch.utils.tensorboard as tensorboard      # only with --tracker tensorboard
        return tensorboard
    except ImportError:
        raise UserError(f"--tracker {name} needs the {TRACKER_PACKAGES[name]} package: pip install "
                        f"{TRACKER_PACKAGES[name]}") from None


def study_summary(results: dict) -> dict[str, float]:
    """The numbers of a study's fits that a tracker shows as summary values, flat: each law's constants
    and exponents, the hold-out checks' relative errors, tokens per parameter at each compute budget."""
    out = {}
    fits = results.get("fits") or {}
    for sweep in SWEEP_X:
        for key in ("a", "b", "c", "r2"):
            if (fits.get(sweep) or {}).get("available"):
                out[f"fit/{sweep}_{key}"] = fits[sweep].get(key)
    joint = fits.get("joint") or {}
    if joint.get("available"):
        for key in ("E", "A", "B", "alpha", "beta", "r2", "N_opt_exponent"):
            out[f"fit/joint_{key}"] = joint.get(key)
    for key, check in (results.get("holdout") or {}).items():
        if isinstance(check, dict) and check.get("available") and check.get("relative_error") is not None:
            out[f"holdout/{key}_relative_error"] = check["relative_error"]
    for budget in (results.get("compute_optimal") or {}).get("budgets") or []:
        key = f"compute_optimal/tokens_per_parameter_at_{budget['flops']:.3g}_flops"
        out[key] = budget.get("tokens_per_parameter")
    v = results.get("validation") or {}
    if v.get("relative_error") is not None:
        out["validate/relative_error"] = v["relative_error"]
    return {k: float(x) for k, x in out.items() if isinstance(x, (int, float)) and math.isfinite(x)}


class Tracker:
    """--tracker none, and what every tracker shares. Each run writes under its run_id, its step axis the
    tokens seen; a run that resumes (or restarts) never writes a point twice: the subclasses drop or purge
    what an earlier process already wrote. The study (its fits and figures) writes under 'fits'."""

    def __init__(self, out_dir: Path | None = None, tokens_per_step: int = 0, study: bool = False):
        self.out_dir, self.tokens_per_step, self.with_study = out_dir, tokens_per_step, study
        self.runs: dict[str, object] = {}         # run_id -> the tool's open run
        self.floor: dict[str, int] = {}           # run_id -> points at or below these tokens are not written
        self.figures_seen: dict[str, tuple] = {}  # figure file -> (mtime_ns, size) last sent
        self.summary_sent: dict | None = None
        self.failed = False                       # once the tool fails, nothing more is sent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- runs: the Trainer calls these ----------------------------------------------------------------

    def start_run(self, exp: RunSpec, state: "TrainState") -> None:
        """Open `exp`'s run at state.step. A new run (or branch) writes the curve's points at that step
        first (the untrained model's loss; a branch's starting point on its stable run); a resumed one
        continues after the checkpoint's step."""
        resumed = bool(state.resumed_at_steps) and state.resumed_at_steps[-1] == state.step
        tokens = state.step * self.tokens_per_step
        self.end_run(exp, None)
        if self.failed:
            return
        with self.guarded(f"opening {exp.run_id}"):
            self.runs[exp.run_id] = self.open_run(exp, tokens, resumed)
        if resumed:
            return
        curve = state.curve
        if curve["step"] and curve["step"][-1] == state.step:
            self.point(exp, tokens, {"train/loss": curve["train_loss"][-1], "train/lr": curve["lr"][-1]})
        if curve["eval_step"] and curve["eval_step"][-1] == state.step:
            self.point(exp, tokens, {"val/loss": curve["val_loss"][-1]})

    def point(self, exp: RunSpec, tokens: int, values: dict) -> None:
        run = self.runs.get(exp.run_id)
        if run is not None and tokens > self.floor.get(exp.run_id, -1):
            with self.guarded(f"writing {exp.run_id}"):
                self.write(exp, run, tokens, {k: float(v) for k, v in values.items() if v is not None})

    def end_run(self, exp: RunSpec, record: dict | None) -> None:
        run = self.runs.pop(exp.run_id, None)
        if run is not None:
            with self.guarded(f"closing {exp.run_id}"):
                self.close_run(run, record)

    @contextlib.contextmanager
    def guarded(self, what: str):
        """A tracker that fails (no network, no login, a full disk) says so in one line and sends nothing
        more; the study goes on, and its log, figures, results.json and runs.csv hold everything."""
        try:
            yield
        except Exception as e:
            log(f"tracker: {what} failed ({type(e).__name__}: {str(e).strip()[:200]}); the study goes on "
                f"without it")
            self.failed, self.runs = True, {}

    # --- the study: after each run (figures redrawn) and after the fits ------------------------------

    def study(self, results: dict, out_dir: Path) -> None:
        """Send the figures redrawn since the last call, and the fits once results.json has new ones."""
        if not self.with_study or self.failed:
            return
        # the figures' step: finished runs, which only grow, also across the processes of a resumed study
        n_done = sum(1 for p in results.get("points") or [] if p["status"] in FINAL_STATUSES)
        with self.guarded("sending the figures and fits"):
            for name in ("scaling_laws_complete.png", "compute_optimal.png"):
                path = out_dir / name
                with contextlib.suppress(OSError):
                    seen = (path.stat().st_mtime_ns, path.stat().st_size)
                    if self.figures_seen.get(name) != seen:
                        self.figures_seen[name] = seen
                        self.write_figure(name.removesuffix(".png"), path, n_done)
            summary = study_summary(results)
            if summary and summary != self.summary_sent:
                self.summary_sent = summary
                fitted = fitted_runs(results.get("points") or [])
                self.write_summary(summary, sum(1 for p in fitted if p["status"] == "completed"))

    # --- what a tool implements ----------------------------------------------------------------------

    def open_run(self, exp: RunSpec, tokens: int, resumed: bool):
        return None

    def write(self, exp: RunSpec, run, tokens: int, values: dict) -> None:
        pass

    def close_run(self, run, record: dict | None) -> None:
        pass

    def write_figure(self, name: str, path: Path, step: int) -> None:
        pass

    def write_summary(self, summary: dict, step: int) -> None:
        pass

    def close_study(self) -> None:
        pass

    def close(self) -> None:
        with self.guarded("closing"):
            for run_id in list(self.runs):
                self.close_run(self.runs.pop(run_id), None)
            self.close_study()


class NullTracker(Tracker):
    """--tracker none, torchrun's other ranks, and Trainers that time steps: nothing is written."""


def wait_past_event_files(folder: Path) -> None:
    """Until the clock's second is past every event file's in `folder`. TensorBoard reads a folder's files
    in name order, and a name starts with the second it was opened in; a resumed run's writer opened in
    the same second as the killed one's (a rerun within a second, as a script or test may do) could sort
    first, and its points would then read as orphans of the older file and be dropped."""
    stamps = [int(m.group(1)) for f in (folder.glob("events.out.tfevents.*") if folder.is_dir() else [])
              if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f.name))]
    while stamps and time.time() < max(stamps) + 1:
        time.sleep(0.05)


class TensorBoardTracker(Tracker):
    """One event folder per run under <output>/tb/ (and tb/fits), so `tensorboard --logdir <output>` shows
    the study. Every point is flushed at once: a SIGKILL loses none, and a resumed run's writer purges
    the points after its checkpoint's step, which it then writes again."""

    def __init__(self, module, out_dir: Path, tokens_per_step: int, study: bool):
        super().__init__(out_dir, tokens_per_step, study)
        self.tb = module
        self.fits_writer = None

    def open_run(self, exp, tokens, resumed):
        folder = self.out_dir / "tb" / exp.run_id
        wait_past_event_files(folder)
        # purge_step hides every event at or after it in this folder (TensorBoard's own rule for restarts)
        return self.tb.SummaryWriter(str(folder), purge_step=tokens + 1 if resumed else tokens)

    def write(self, exp, run, tokens, values):
        for key, value in values.items():
            run.add_scalar(key, value, tokens)
        run.flush()

    def close_run(self, run, record):
        run.close()

    def fits(self):
        if self.fits_writer is None:
            self.fits_writer = self.tb.SummaryWriter(str(self.out_dir / "tb" / "fits"))
        return self.fits_writer

    def write_figure(self, name, path, step):
        self.fits().add_image(f"figures/{name}", plt.imread(str(path)), step, dataformats="HWC")
        self.fits().flush()

    def write_summary(self, summary, step):
        for key, value in summary.items():
            self.fits().add_scalar(key, value, step)
        self.fits().add_text("fits", "\n\n".join(f"{k}: {v:.6g}" for k, v in summary.items()), step)
        self.fits().flush()

    def close_study(self):
        if self.fits_writer is not None:
            self.fits_writer.close()
            self.fits_writer = None


class WandbTracker(Tracker):
    """One wandb run per training run, named by its run_id and grouped by study (<output folder>/<mode>),
    plus a 'fits' run holding the study's summary values and figures. WANDB_MODE=offline writes under
    <output>/wandb/ without touching the network (`wandb sync` uploads later). wandb keeps no record of
    what a killed process logged, so each run's id and last point sent live in wandb/resume/<run_id>.json
    (the study's in fits.json): a rerun continues that wandb run after that point."""

    def __init__(self, module, out_dir: Path, tokens_per_step: int, study: bool, group: str):
        super().__init__(out_dir, tokens_per_step, study)
        self.wandb, self.group = module, group
        self.fits_run = None

    def init(self, name: str, run_id: str | None, job_type: str, config: dict | None = None):
        return self.wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "scaling-lab", group=self.group, name=name,
            id=run_id, resume="allow" if run_id else None, job_type=job_type, config=config,
            dir=str(self.out_dir),
            # several runs at once (a cooldown branch inside its stable run); our own log is the console
            settings=self.wandb.Settings(reinit="create_new", console="off", silent=True))

    def earlier(self, key: str) -> dict:
        """What an earlier process of this study sent to the wandb run `key` (a run_id, or 'fits')."""
        path = self.out_dir / "wandb" / "resume" / f"{key}.json"
        return read_json_file(path, "delete it to start that wandb run anew") if path.exists() else {}

    def remember(self, key: str, wandb_id: str, tokens: int) -> None:
        path = self.out_dir / "wandb" / "resume" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"id": wandb_id, "tokens": tokens})

    def open_run(self, exp, tokens, resumed):
        earlier = self.earlier(exp.run_id)
        self.floor[exp.run_id] = max(tokens if resumed else -1, earlier.get("tokens", -1))
        run = self.init(exp.run_id, earlier.get("id") or os.urandom(6).hex(), "+".join(exp.roles) or "run",
                        {**dataclasses.asdict(exp), "tokens_per_step": self.tokens_per_step})
        self.remember(exp.run_id, run.id, self.floor[exp.run_id])
        return run

    def write(self, exp, run, tokens, values):
        run.log({**values, "tokens": tokens, "step": tokens // self.tokens_per_step}, step=tokens)
        # after the call: a kill between the two loses this point's record, never writes it twice
        self.remember(exp.run_id, run.id, tokens)

    def close_run(self, run, record):
        if record is not None:
            run.summary.update({k: record.get(k) for k in ("status", "final_val_loss", "initial_loss",
                                                           "wall_time_s", "tokens_per_s", "mfu")})
        run.finish(exit_code=0 if record is not None else 1)

    def fits(self):
        if self.fits_run is None:
            self.fits_run = self.init("fits", self.earlier("fits").get("id") or os.urandom(6).hex(), "fits")
            self.remember("fits", self.fits_run.id, 0)
        return self.fits_run

    def write_figure(self, name, path, step):
        self.fits().log({f"figures/{name}": self.wandb.Image(str(path))}, step=step)

    def write_summary(self, summary, step):
        self.fits().summary.update({**summary, "runs_fitted": step})

    def close_study(self):
        if self.fits_run is not None:
            self.fits_run.finish()
            self.fits_run = None


def open_tracker(cfg: RunConfig, scope: "RunScope", is_main: bool) -> Tracker:
    """The tracker of one process: rank 0 only under torchrun (one writer per run); the study's fits and
    figures only from the process that fits a whole plan (not a --parallel child, --shard or --only)."""
    if cfg.tracker == "none" or not is_main:
        return NullTracker()
    out_dir, study = Path(cfg.output_dir), not scope.partial and not scope.child
    module = import_tracker(cfg.tracker)
    if cfg.tracker == "tensorboard":
        return TensorBoardTracker(module, out_dir, cfg.tokens_per_step, study)
    return WandbTracker(module, out_dir, cfg.tokens_per_step, study, f"{out_dir.resolve().name}/{cfg.mode}")

# ----------------------------------------------------------------------------------------------------
# 12. CLI: arguments, the run's configuration, prepare -> train -> finish, the summary, main()
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
    """Every option, in named groups (so --help reads by purpose)."""
    p = _Parser(description="Train a ladder of GPT models, fit scaling laws, extrapolate, plot.")
    for add_options in (add_plan_options, add_device_options, add_long_run_options):
        add_options(p)
    return p


def add_plan_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to run")
    g.add_argument("--mode", default="quick",
                   help=f"preset: {', '.join(PRESETS)} (tiny is sized for a CPU; default quick)")
    g.add_argument("--param-sizes", help="replace the parameter sweep's N targets, e.g. 1M,3M,10M")
    g.add_argument("--data-sizes", help="replace the data sweep's D targets, e.g. 5M,20M")
    g.add_argument("--data-model-size", help="N target of the data sweep's model (default: the preset's)")
    g = p.add_argument_group("data")
    g.add_argument("--data",
                   help="'builtin' (the Python standard library), a text file, a folder of text files, "
                        "a uint16 .bin (uint32 .u32.bin) token file, hf:NAME[:CONFIG][@REVISION] (a "
                        "Hugging Face Hub dataset, streamed), or a local dataset folder (save_to_disk "
                        f"output, or .parquet or .jsonl files); default builtin for tiny, else {NATURAL_TEXT}")
    g.add_argument("--max-tokens", type=count_arg, help="prepare at most this many training tokens, e.g. 50M "
                   "(default: all of a local corpus; a Hub stream: the largest run's x 1.05)")
    g.add_argument("--vocab-size", type=positive_int, help="BPE vocabulary (default: the preset's)")
    g.add_argument("--cache-dir", help="tokenizer and token cache (default ~/.cache/scaling-lab, or "
                                       "$SCALING_LAB_CACHE)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=positive_int, help="steps of every parameter-sweep run")
    g.add_argument("--batch-size", type=positive_int, help="sequences per micro-batch")
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--context-length", type=positive_int, help="tokens per sequence")
    g.add_argument("--lr", type=positive_float,
                   help="one peak learning rate for every size (default: min(5e-3, 0.4/d_model); tiny: "
                        "0.3/d_model, no cap)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order")
    g.add_argument("--arch", choices=ARCHS, default="gpt2",
                   help="gpt2 (LayerNorm, learned positions, GELU) or llama (RMSNorm, rotary positions, SwiGLU, "
                        "no biases; results in scaling_results_<mode>_llama_v2); default gpt2")
    g.add_argument("--lr-sweep", action="store_true",
                   help="instead of the ladder: train every size at a few multiples of its LR rule at the "
                        "ladder's shortest horizon, fit each size's optimum (output default "
                        "scaling_results_<mode>_lrsweep)")
    g.add_argument("--lr-multipliers", help="--lr-sweep's multiples of the rule (default "
                   + ",".join(f"{m:g}" for m in DEFAULT_LR_MULTIPLIERS) + ")")
    g.add_argument("--validate", nargs="?", const=4.0, type=positive_float, metavar="FACTOR",
                   help="after the fits, predict the joint law's compute-optimal model at FACTOR (default 4) "
                        "times the largest run's compute, then train it and compare (never fitted)")
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--schedule", choices=["cosine", "wsd"],
                   help="cosine decay, or wsd: warmup, constant peak, cooldown (default: the preset's)")
    g.add_argument("--warmup-steps", type=positive_int,
                   help="warmup of every run (default: 10%% of the parameter sweep's steps, the same for all)")
    g.add_argument("--cooldown-frac", type=positive_float, default=0.2,
                   help="wsd: the cooldown's share of each run's (or branch's) steps (default 0.2)")
    g.add_argument("--cooldown-shape", choices=["1-sqrt", "linear"], default="1-sqrt",
                   help="wsd: the cooldown's shape (default 1-sqrt, Hagele et al. 2024's best)")
    g.add_argument("--horizons",
                   help="wsd: each parameter-sweep run also gives its loss at these token counts (0.5M,1M,2M) or "
                        "multiples of its D (0.25x,0.5x,1x), as cooldowns branched from one run")


def add_device_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=positive_int, help="steps between validation evaluations")
    g.add_argument("--eval-batches", type=positive_int, help="validation batches per evaluation")
    g.add_argument("--log-interval", type=positive_int, help="steps between log lines")
    g.add_argument("--tracker", choices=["none", "tensorboard", "wandb"], default="none",
                   help="also send every run's curves and the study's fits and figures to TensorBoard (under "
                        "<output>/tb/) or Weights & Biases (WANDB_MODE=offline works without network); "
                        "default none")
    g = p.add_argument_group("device and output")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks CUDA, then MPS, then CPU")
    g.add_argument("--output-dir", help="default scaling_results_<mode>_v2 (--arch llama: _<mode>_llama_v2)")
    g.add_argument("--no-estimate", action="store_true", help="skip the timed steps of the plan's estimate")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan, the data budget, the memory check and the time estimate, then exit "
                        "without preparing data or training (with --no-estimate: in seconds)")
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, fp32 on MPS and CPU; bf16 on a CPU needs avx512_bf16/AMX")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default on CUDA only)")
    g.add_argument("--no-compile", dest="compile", action="store_false", help="never torch.compile")
    g.add_argument("--peak-tflops", type=positive_float,
                   help="device peak for MFU (default: data sheet for known GPUs, else a measured matmul)")
    g.add_argument("--benchmark", action="store_true",
                   help="time every model size of the mode, print tokens/s, MFU, memory and the projected "
                        "wall time, write benchmark.json; trains nothing else")
    g.add_argument("--benchmark-steps", type=positive_int, default=30, help="timed steps per size")


def add_long_run_options(p: argparse.ArgumentParser) -> None:
    # fitting without training (no torch needed): saved runs or any table of runs
    fit = p.add_argument_group("fitting")
    fit.add_argument("--fit-only", metavar="PATH",
                     help="recompute fits, predictions and figures from a results folder or its results.json")
    fit.add_argument("--fit-csv", metavar="FILE",
                     help="fit L(N, D) to a CSV with columns N, D, loss (optional name); writes results.json "
                          "and compute_optimal.png to --output-dir (default fit_results_<file name>)")
    fit.add_argument("--bootstrap", type=positive_int, default=N_BOOTSTRAP,
                     help=f"bootstrap resamples behind every 95%% interval (default {N_BOOTSTRAP})")
    fit.add_argument("--n-count", choices=list(N_COUNTS), default=None,
                     help=f"the N of the joint law and the allocation: every parameter (total, Chinchilla's "
                          f"count) or all but the embeddings (non-embedding, Kaplan's); default "
                          f"{DEFAULT_N_COUNT}, or what the results folder was fitted with")
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
    # beyond one process: torchrun is detected from its environment; these split a sweep's runs
    g = p.add_argument_group("several processes and jobs (torchrun needs no option: see README)")
    g.add_argument("--shard", metavar="I/N",
                   help="train every N-th run of the plan starting at I (0-based), e.g. a job array's task; "
                        "writes results.shard-I-of-N.json; merge the shards with --fit-only FOLDER")
    g.add_argument("--only", metavar="NAME[,NAME]",
                   help="train only these experiments (e.g. params-N25K) or runs (params-N25K-seed1); "
                        "merge with --fit-only FOLDER")
    g.add_argument("--parallel", type=positive_int, metavar="K",
                   help="train up to K runs at once as separate processes on this machine, each with 1/K of "
                        "the GPU's memory (or of the cores); default on CUDA: several when every model is "
                        "under 100M parameters (see README), else 1")
    g.add_argument("--parallel-child", type=positive_int, help=argparse.SUPPRESS)   # set by --parallel


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
    """The run's settings: the mode's preset, overridden by every option given."""
    if args.mode not in PRESETS:
        raise UserError(f"unknown mode '{args.mode}': choose one of {', '.join(PRESETS)}")
    preset = PRESETS[args.mode]
    parse_checkpoint_every(args.checkpoint_every)         # a bad value is reported before any work
    data = args.data or default_data(preset.name)
    if not 0 < args.cooldown_frac < 1:
        raise UserError(f"--cooldown-frac {args.cooldown_frac}: give the cooldown's share of a run, between 0 and 1")
    check_vocab_size(args.vocab_size or preset.vocab_size, data)          # before any text is read
    check_data_source(data)
    if args.tracker != "none":
        import_tracker(args.tracker)                # a missing library is said before any work
    if args.lr_multipliers and not args.lr_sweep:
        raise UserError("--lr-multipliers sets --lr-sweep's multiples: add --lr-sweep")
    if args.lr_sweep and args.validate is not None:
        raise UserError("--validate checks the ladder's fits; --lr-sweep trains no ladder: run them separately")
    lr_multipliers = (parse_lr_multipliers(args.lr_multipliers or ",".join(map(str, DEFAULT_LR_MULTIPLIERS)))
                      if args.lr_sweep else None)
    schedule = args.schedule or preset.schedule
    preset_horizons = preset.horizons if schedule == preset.schedule else None   # tiny's branches need WSD
    return RunConfig(
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
        data=data, device=args.device, dtype=args.dtype, compile=args.compile,
        peak_tflops=args.peak_tflops,
        output_dir=args.output_dir or default_output_dir(preset.name, args.arch, args.lr_sweep),
        cache_dir=args.cache_dir or str(default_cache_dir()),
        text_column=args.text_column, split=args.split, num_proc=args.num_proc,
        bpe_sample_chars=args.bpe_sample_chars, no_repeat=args.no_repeat, max_tokens=args.max_tokens,
        seeds=parse_seeds(args.seeds, args.seed), checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, validate=args.validate, n_count=args.n_count, schedule=schedule,
        cooldown_frac=args.cooldown_frac, cooldown_shape=args.cooldown_shape,
        horizons=args.horizons if args.horizons is not None else preset_horizons,
        row_steps=(list(preset.row_steps) if preset.row_steps and not args.param_sizes and not args.max_steps
                   and args.horizons is None and preset_horizons else None),
        warmup_frac=preset.warmup_frac, warmup_steps=args.warmup_steps, arch=args.arch,
        tracker=args.tracker, lr_multipliers=lr_multipliers,
    ), preset


def default_output_dir(mode: str, arch: str, lr_sweep: bool = False) -> str:
    """gpt2's folder keeps its name; another recipe gets its own, so neither archives the other's runs;
    an --lr-sweep gets its own too, so it never disturbs the ladder's."""
    return f"scaling_results_{mode}{'' if arch == 'gpt2' else '_' + arch}_{'lrsweep' if lr_sweep else 'v2'}"


def print_plan(plan: list[RunSpec], cfg: RunConfig, estimates: dict[str, float] | None) -> None:
    log(f"plan: {len(plan)} experiments, {format_count(cfg.tokens_per_step)} tokens per step "
        f"(batch {cfg.batch_size} x context {cfg.context_length} x accum {cfg.grad_accum}), {cfg.schedule} "
        f"schedule, {plan_warmup_steps(cfg)} warmup steps for every run")
    log(f"  {'name':<20} {'N':>8} {'n_layer':>7} {'d_model':>7} {'D':>8} {'steps':>6} {'FLOPs':>9} "
        f"{'lr':>8} {'est.':>8}")
    for e in plan:
        est = format_duration(estimates[e.name]) if estimates else "-"
        branch = f"  cooldown branch of {e.branch_of} from step {e.branch_step}" if e.branch_of else ""
        log(f"  {e.name:<20} {format_count(e.n_params_nonembedding):>8} {e.n_layer:>7} {e.d_model:>7} "
            f"{format_count(e.tokens):>8} {e.steps:>6} {e.flops:>9.2e} {e.peak_lr:>8.2e} {est:>8}{branch}")
    for line in branch_savings_lines(plan):
        log(line)
    rows_of_n = {e.branch_of or e.name for e in plan if e.has(ROLE_N)}     # the rows L(N)'s points are in
    if longer := [e for e in plan if e.name in rows_of_n and not e.has(ROLE_N)]:
        at = next(e for e in plan if e.has(ROLE_N))
        log(f"  parameter sweep: every size at {format_count(at.tokens)} tokens (L(N)); "
            f"{', '.join(e.name for e in longer)} go on to {format_count(max(e.tokens for e in longer))} "
            f"for the joint law")
    if shared := [e for e in plan if e.has(ROLE_D) and (e.branch_of or e.name) in rows_of_n]:
        log(f"  data sweep: the {format_count(shared[0].n_params_nonembedding)} model's runs above at "
            f"{', '.join(format_count(e.tokens) for e in shared)} tokens (its horizons; nothing trains twice)")
    if estimates:
        log(f"  estimated training time: {format_duration(sum(estimates.values()))} on this device")


def branch_savings_lines(plan: list[RunSpec]) -> list[str]:
    """What WSD's branches save: per stable run, the tokens it processes (its own steps plus its branches'
    cooldowns) against separate runs to every horizon; then the FLOPs of the whole plan."""
    lines = []
    for main in (e for e in plan if e.branch_points):
        branches = [b for b in plan if b.branch_of == main.name]
        processed = main.tokens + sum(b.tokens_processed for b in branches)
        separate = main.tokens + sum(b.tokens for b in branches)
        lines.append(f"  {main.name}: one run with {len(branches)} cooldown branches processes "
                     f"{format_count(processed)} tokens, {processed / separate:.2f}x the {format_count(separate)} "
                     f"of separate runs to its {len(branches) + 1} horizons")
    if lines:
        flops = sum(e.flops_processed for e in plan)
        separate = sum(e.flops for e in plan)
        lines.append(f"  WSD branches: {flops:.3g} FLOPs for the plan instead of {separate:.3g} with separate runs "
                     f"({1 - flops / separate:.0%} saved)")
    return lines


def environment_record(device: DeviceInfo, corpus: Corpus) -> dict:
    return {"device": device.name, "device_name": device.description, "dtype": device.dtype,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "platform": platform.platform(), "corpus": corpus.record}


def finish_results(results: dict, out_dir: Path, n_bootstrap: int = N_BOOTSTRAP, figure: bool = True,
                   n_count: str | None = None, curves: dict | None = None) -> None:
    """Fit the points table, predict, write results.json, then draw the figures (training curves from
    `curves`, else the records under out_dir/runs/): a fit or plotting error never loses results.
    figure=False (an interrupted run) writes results.json only. N is counted as n_count, else as the
    run's config says, else DEFAULT_N_COUNT."""
    if (results.get("config") or {}).get("lr_multipliers"):
        return finish_lr_sweep(results, out_dir, figure)
    n_count = n_count or (results.get("config") or {}).get("n_count") or DEFAULT_N_COUNT
    t0 = time.time()
    results["excluded_from_fits"] = [p["run_id"] for p in results["points"] if p["status"] != "completed"]
    try:
        results.update(analyse_runs(results["points"], n_bootstrap, n_count=n_count,
                                    corpus=(results.get("environment") or {}).get("corpus")))
        results["n_count"] = n_count
        flag_rising_losses(results["fits"])
    except Exception as e:       # a bug in a fit must not lose the runs: record it and write them
        reason = f"the fit failed ({type(e).__name__}: {e})"
        results["fits"] = {k: {"available": False, "reason": reason, "n_points": 0} for k in ("params", "data", "joint")}
        results["predictions"], results["holdout"] = [], {}
        results["compute_optimal"] = {"available": False, "reason": reason}
        log(f"fits: {reason}")
    results["fit_wall_time_s"] = round(time.time() - t0, 2)
    results["n_bootstrap"] = n_bootstrap
    write_json_atomic(out_dir / "results.json", results)
    write_runs_csv(out_dir / "runs.csv", results["points"], n_count)
    if figure:
        draw_figures(results, out_dir, curves)


def log_fit_summary(results: dict) -> None:
    """The fits, hold-out checks, compute-optimal allocation and predictions, each with its interval."""
    fits = results["fits"]
    for sweep in ("params", "data"):
        fit = fits.get(sweep, {})
        if fit.get("available"):
            ci = fit.get("ci95") or {}
            law = power_term(format(fit['a'], '.4g'), 'x', fit['b'])
            log(f"  fit {sweep}: L = {floor_text(fit['c'], fit.get('c_at_bound'))} + {law}  R2 {fit['r2']:.4f}, "
                f"{fit['n_points']} points, {fit['dof']} dof; 95% CI b {_fmt_ci(ci.get('b'), '{:.4f}')}, "
                f"c {_fmt_ci(ci.get('c'), '{:.4g}')}" + (f" ({fit['note']})" if fit.get("note") else ""))
        elif fit:
            log(f"  fit {sweep}: unavailable ({fit.get('reason')})")
    joint = fits.get("joint", {})
    if joint.get("available"):
        ci = joint.get("ci95") or {}
        log(f"  joint fit: L = {floor_text(joint['E'], joint.get('E_at_bound'))} + "
            f"{power_term(format(joint['A'], '.4g'), 'N', joint['alpha'])} + "
            f"{power_term(format(joint['B'], '.4g'), 'D', joint['beta'])}  R2 {joint['r2']:.4f}, "
            f"{joint['n_points']} runs; 95% CI "
            f"E {_fmt_ci(ci.get('E'), '{:.4g}')}, alpha {_fmt_ci(ci.get('alpha'), '{:.4f}')}, "
            f"beta {_fmt_ci(ci.get('beta'), '{:.4f}')}" + (f" ({joint['note']})" if joint.get("note") else ""))
        log(f"  joint fit: N counts {'every parameter (total)' if joint.get('n_count') == 'total' else 'non-embedding parameters' if joint.get('n_count') else 'as given'}; "
            f"intervals conditional on {joint.get('conditional_on') or 'the fitted form'}")
    else:
        log(f"  joint fit: unavailable ({joint.get('reason')})")
    for name, ho in results.get("holdout", {}).items():
        if name.startswith("rollout_"):
            law = "joint law" if name == "rollout_joint" else f"{name[len('rollout_'):]} sweep"
            log(f"  {law} " + rollout_text(ho))
            continue
        var = "N" if name in ("params", "joint_largest_N") else "D"
        law = "joint law" if name.startswith("joint") else f"{name} sweep"
        log(f"  {law} " + holdout_text(ho, var).replace("\n", ", "))
    co = results.get("compute_optimal", {})
    if co.get("available"):
        log(f"  compute-optimal allocation under {co.get('constraint', 'C = 6 N D')} (C the runs' real FLOPs: "
            f"FLOPs per token x D), N counted as {co.get('n_count') or 'given'}:")
        for b in co["budgets"]:
            log(f"  compute-optimal at {b['label']}: N {format_count(b['N_opt'])} "
                f"{_fmt_ci(b['N_opt_ci95'] and [v and format_count(v) for v in b['N_opt_ci95']], '{}')}, "
                f"D {format_count(b['D_opt'])}, {b['tokens_per_parameter']:.3g} tokens/parameter "
                f"{_fmt_ci(b['tokens_per_parameter_ci95'], '{:.3g}')}, loss {b['loss']:.3f}")
        for count, row in (co.get("tokens_per_parameter_by_count") or {}).items():
            parts = [f"largest run {row['largest_run_tokens_per_parameter']:.3g}"]
            for key, where in (("at_largest_run_compute", "at its compute"), ("at_1e18_flops", "at 1e18 FLOPs")):
                if row.get(key):
                    parts.append(f"{where} {row[key]['tokens_per_parameter']:.3g} "
                                 f"{_fmt_ci(row[key]['tokens_per_parameter_ci95'], '{:.3g}')}")
            log(f"  tokens per parameter, N = {count} parameters (its own joint law, alpha {row['alpha']:.3f}): "
                + ", ".join(parts))
    else:
        log(f"  compute-optimal allocation: unavailable ({co.get('reason')})")
    log_isoflop(results.get("isoflop"))
    log_validation(results.get("validation"))
    refs = results.get("reference_models") or []
    if refs:
        corpus = f"{refs[0].get('corpus') or 'this corpus'} with {refs[0].get('tokenizer') or 'its tokenizer'}"
        log(f"  the joint law at published models' own N and D, on {corpus} (an extrapolation, not those "
            f"models' own losses):")
    for p in refs:
        log(f"  predicted loss at {p['name']}, {format_count(p['D'])} tokens: {p['predicted_loss']:.4g} "
            f"{_fmt_ci(p.get('predicted_loss_ci95'), '{:.4g}')}, one new run "
            f"{_fmt_ci(p.get('predicted_loss_pi95'), '{:.4g}')}")
    if "fit_wall_time_s" in results:
        log(f"  fits took {format_duration(results['fit_wall_time_s'])} "
            f"({results.get('n_bootstrap', N_BOOTSTRAP)} bootstrap resamples each)")


def log_isoflop(iso: dict | None) -> None:
    """The IsoFLOP exponent (Approach 2) beside the joint law's, the refused budgets, any warning."""
    if not iso:
        return
    if not iso.get("available"):
        log(f"  IsoFLOP (Approach 2): unavailable ({iso.get('reason')})")
    else:
        joint = (f", joint law beta/(alpha+beta) {iso['joint_N_opt_exponent']:.3f} "
                 f"{_fmt_ci(iso.get('joint_N_opt_exponent_ci95'))}" if iso.get("joint_N_opt_exponent") else "")
        log(f"  IsoFLOP (Approach 2, {iso['n_budgets_used']} budgets): N_opt ~ C^{iso['N_opt_exponent']:.3f} "
            f"{_fmt_ci(iso['N_opt_exponent_ci95'])}, D_opt ~ C^{iso['D_opt_exponent']:.3f} "
            f"{_fmt_ci(iso['D_opt_exponent_ci95'])}{joint}")
    for refused in iso.get("refused_budgets", []):
        log(f"  IsoFLOP budget refused: {refused}")
    if iso.get("warning"):
        log(f"  WARNING: {iso['warning']}")


def print_summary(results: dict, out_dir: Path, records: list[dict] = ()) -> None:
    """Every run's final loss (or why it has none) and time, then the fits. `records`: the runs' full
    records, for their times and divergence steps (the points table has neither)."""
    if "lr_sweep" in results:
        return print_lr_sweep_summary(results, out_dir)
    log("")
    log("summary")
    points = results["points"]
    by_id = {r.get("run_id"): r for r in records}
    several_seeds = len({p["seed"] for p in points}) > 1
    for p in points:
        rec = by_id.get(p["run_id"], {})
        status = p["status"] or "unknown"
        if p["loss"] is not None:
            loss = f"val loss {p['loss']:.4f}"
        elif status == "diverged":
            good = rec.get("last_good_loss")
            loss = (f"DIVERGED at step {rec.get('diverged_at_step')}/{rec.get('steps')} (last finite loss "
                    f"{'-' if good is None else f'{good:.4f}'})")
        else:
            loss = status.upper().replace("_", " ")
        name = p["run_id"] if several_seeds else p["name"]
        log(f"  {name:<22} N={format_count(p['N_nonembedding']):>7} D={format_count(p['D']):>7}  {loss}"
            + (f"  ({format_duration(rec['wall_time_s'])})" if rec.get("wall_time_s") is not None else ""))
    excluded = [p for p in points if p["status"] != "completed"]
    if excluded:
        log("  left out of the fits: " + ", ".join(f"{p['run_id']} ({p['status']})" for p in excluded))
    log_fit_summary(results)
    log(f"  results: {out_dir / 'results.json'}")
    log(f"  figures: {out_dir / 'scaling_laws_complete.png'}, {out_dir / 'compute_optimal.png'}")


# --- --lr-sweep: its results, log table and figure, in place of the scaling-law fits -----------------

def finish_lr_sweep(results: dict, out_dir: Path, figure: bool = True) -> None:
    """--lr-sweep's counterpart of finish_results: the per-size parabolas into results.json (first),
    then lr_sweep.png."""
    runs = [p for p in results["points"] if ROLE_LR in p["roles"]]
    fixed, lr_width = results["config"].get("lr"), PRESETS[results["mode"]].lr_width
    tokens_per_step = results["config"]["batch_size"] * results["config"]["context_length"] * \
        results["config"]["grad_accum"]
    results["lr_sweep"] = {"horizon_steps": max((p["D"] // tokens_per_step for p in runs), default=0),
                           "horizon_tokens": max((p["D"] for p in runs), default=0),
                           "multipliers": results["config"]["lr_multipliers"],
                           **analyse_lr_sweep(runs, lambda d: fixed or lr_width / d)}
    write_json_atomic(out_dir / "results.json", results)
    if figure:
        try:
            plot_lr_sweep_figure(results, out_dir / "lr_sweep.png")
        except Exception as e:   # the results are already on disk
            log(f"figure: could not draw lr_sweep.png ({type(e).__name__}: {e})")


def lr_sweep_lines(sweep: dict) -> list[str]:
    """The table: per size, the rule's LR, the loss at every multiplier, the optimum [95%] and its
    ratio to the rule; then the warnings, or the line saying the rule is within tolerance."""
    mults = sweep["multipliers"]
    lines = [f"lr sweep: final validation loss at {format_count(sweep['horizon_tokens'])} tokens "
             f"({sweep['horizon_steps']} steps) per multiple of the LR rule",
             f"  {'N':>6} {'d':>4} {'rule LR':>8} " + " ".join(f"{f'{m:g}x':>7}" for m in mults)
             + f"  {'optimum LR [95%]':<28} optimum/rule"]
    fmt_lr = lambda v, unbounded: unbounded if v is None else f"{v:.3g}"          # noqa: E731
    for sz in sweep["sizes"]:
        loss = {round(p["multiplier"], 4): p["final_val_loss"] for p in sweep["points"]
                if p["n_params_nonembedding"] == sz["n_params_nonembedding"]}
        cells = " ".join(f"{'-' if loss.get(round(m, 4)) is None else f'{loss[round(m, 4)]:.4f}':>7}" for m in mults)
        ci = sz.get("optimum_lr_ci95")
        if sz.get("optimum_lr") is not None and ci is None:          # 3 points: the parabola fits exactly
            opt, ratio = f"{sz['optimum_lr']:.3g} (no interval)", f"{sz['optimum_over_rule']:.2f}"
        elif sz.get("optimum_lr") is not None:
            opt = f"{sz['optimum_lr']:.3g} [{fmt_lr(ci[0], 'unbounded')}, {fmt_lr(ci[1], 'unbounded')}]"
            rci = sz["optimum_over_rule_ci95"]
            ratio = (f"{sz['optimum_over_rule']:.2f} [{fmt_lr(rci[0], 'unbounded')}, "
                     f"{fmt_lr(rci[1], 'unbounded')}]")
        elif sz.get("edge"):
            opt = f"open: {sz['edge']} {sz['lr_tried'][1 if sz['edge'] == 'above' else 0]:.3g}"
            bound = sz["optimum_over_rule_ci95"]
            ratio = f"> {bound[0]:.2f}" if sz["edge"] == "above" else f"< {bound[1]:.2f}"
        else:
            opt, ratio = f"unavailable ({sz.get('reason')})", "-"
        lines.append(f"  {format_count(sz['n_params_nonembedding']):>6} {sz['d_model']:>4} {sz['rule_lr']:>8.3g} "
                     f"{cells}  {opt:<28} {ratio}")
    lines.append(f"  interval: {sweep['interval']}")
    lines += [f"  {w}" for w in sweep["warnings"]] or [
        f"  the rule is within {sweep['tolerance']:g}x of the optimum at every size"]
    return lines


def print_lr_sweep_summary(results: dict, out_dir: Path) -> None:
    log("")
    for line in lr_sweep_lines(results["lr_sweep"]):
        log(line)
    log(f"  results: {out_dir / 'results.json'}")
    log(f"  figure: {out_dir / 'lr_sweep.png'}")


def refit_saved_runs(path: str, output_dir: str | None, n_bootstrap: int, n_count: str | None = None) -> dict:
    """--fit-only: recompute fits, predictions and figures from a results folder (its run records under
    runs/ and its results files) or one results.json, of this schema or schema 1 (0cf71dd)."""
    src = Path(path).expanduser()
    if src.is_dir() and any((src / "runs").glob("*.json")):
        results, records = merge_saved_runs(src)
        out_dir = Path(output_dir) if output_dir else src
        prepare_output_dir(out_dir)
        m = results["merged_from"]
        log(f"fit-only: {len(results['points'])} runs merged from {m['run_records']} records in "
            f"{m['runs_folder']}" + (f" and {', '.join(m['results_files'])}" if m["results_files"] else "")
            + f", {n_bootstrap} bootstrap resamples")
    else:
        file = src / "results.json" if src.is_dir() else src
        if not file.is_file():
            raise UserError(f"--fit-only {path}: no results.json there; give a results folder or its results.json")
        results, records = study_file_runs(read_json_file(file, "--fit-only needs a results.json of this script"),
                                           f"--fit-only {file}")
        out_dir = Path(output_dir) if output_dir else file.parent
        prepare_output_dir(out_dir)
        log(f"fit-only: {len(results['points'])} saved runs from {file}, {n_bootstrap} bootstrap resamples")
    curves = {r["run_id"]: r["curve"] for r in records if isinstance(r.get("curve"), dict)}
    finish_results(results, out_dir, n_bootstrap, n_count=n_count, curves=curves or None)
    print_summary(results, out_dir, records)
    return results


def study_file_runs(obj, where: str) -> tuple[dict, list[dict]]:
    """(results with its points table, the full run records it holds) of a results.json: this schema's
    (points, no records) or schema 1's (every run's record under `experiments`)."""
    if isinstance(obj, dict) and isinstance(obj.get("points"), list):
        return obj, []
    if not isinstance(obj, dict) or not isinstance(obj.get("experiments"), list):
        raise UserError(f"{where}: no 'points' table (nor a schema-1 'experiments' list); is it a results.json "
                        f"of this script?")
    records = [dict(e, run_id=e.get("run_id", e.get("name"))) for e in obj["experiments"]]
    results = {k: v for k, v in obj.items() if k != "experiments"}
    results["schema_version"] = SCHEMA_VERSION          # what it becomes when written again
    results["points"] = [point_row(r) for r in records]
    return results, records


def fit_table(path: str, output_dir: str | None, n_bootstrap: int) -> dict:
    """--fit-csv: joint law, hold-out checks and compute-optimal allocation of a table of runs."""
    points = read_runs_csv(Path(path).expanduser())
    out_dir = Path(output_dir or f"fit_results_{Path(path).stem}")
    prepare_output_dir(out_dir)
    log(f"fit-csv: {len(points)} runs from {path}, {n_bootstrap} bootstrap resamples")
    if point_rows(points) is None:
        log("fit-csv: no branch_of column, so every run is taken as its own seed (independent noise); add "
            "name and branch_of columns for WSD branches, which share their stable run's noise")
    else:
        log(f"fit-csv: {len({p['row'] for p in points})} rows (a stable run and the runs branched from it, "
            f"from branch_of) share their noise in the bootstrap")
    t0 = time.time()
    results = {"schema_version": SCHEMA_VERSION, "mode": "fit-csv", "source": str(path),
               "points": [{"run_id": p["name"], "name": p["name"], "seed": 0, "status": "completed",
                           "roles": [ROLE_JOINT], "branch_of": None, "N_nonembedding": p["N"], "N_total": None,
                           "D": p["D"], "flops": 6.0 * p["N"] * p["D"], "loss": p["loss"], "line": p["line"]}
                          for p in points]}
    results.update(analyse_table(points, n_bootstrap))
    flag_rising_losses(results["fits"])
    results["fit_wall_time_s"] = round(time.time() - t0, 2)
    results["n_bootstrap"] = n_bootstrap
    write_json_atomic(out_dir / "results.json", results)
    write_runs_csv(out_dir / "runs.csv", results["points"])
    try:
        plot_compute_optimal_figure(results, out_dir / "compute_optimal.png")
    except Exception as e:       # the fit is already on disk
        log(f"figure: could not draw compute_optimal.png ({type(e).__name__}: {e})")
    if results.get("rows_left_out"):
        log(f"  left out lines {results['rows_left_out']['lines']}: {'; '.join(results['rows_left_out']['why'])}")
    log_fit_summary(results)
    log(f"  results: {out_dir / 'results.json'}")
    log(f"  figure:  {out_dir / 'compute_optimal.png'}")
    return results

# --- one command's run: prepare -> train the runs (sequential, parallel or distributed) -> finish ---

@dataclass
class Session:
    """What prepare() settles before any training, shared by every way of training the runs."""
    cfg: RunConfig
    scope: RunScope
    dist: Distributed
    device: DeviceInfo
    corpus: Corpus
    plan: list[RunSpec]           # one seed's experiments
    all_runs: list[RunSpec]       # every (experiment, seed)
    runs: list[RunSpec]           # the runs this process is responsible for (--shard, --only)
    store: RunStore
    policy: CheckpointPolicy
    existing: dict | None            # the output folder's earlier results.json
    done: dict                       # run_id -> record of the runs finished earlier
    header: dict                     # what results.json (or this part's file) says before any run
    command: str                     # the command that resumes this one
    n_bootstrap: int = N_BOOTSTRAP
    tracker: Tracker = field(default_factory=NullTracker)     # --tracker: the study's writer and its runs'
    records: dict = field(default_factory=dict)     # run_id -> record of this command's runs (keep() only)
    t0: float | None = None          # when training began (start_training)
    figures: RedrawClock = field(default_factory=RedrawClock)   # when the interim figures are due

    def start_training(self) -> None:
        self.t0 = time.time()

    def keep(self, record: dict) -> None:
        """The one writer of the session's run records: a finished, interrupted or earlier run's."""
        self.records[record["run_id"]] = record

    def ordered_records(self) -> list[dict]:
        """The records in plan order (each row's branches, then its stable run), as results.json lists them."""
        order = {e.run_id: i for i, e in enumerate(self.runs)}
        return sorted(self.records.values(), key=lambda r: order.get(r["run_id"], len(order)))

    def results(self) -> dict:
        """results.json's content before the fits: the header, the elapsed time, the points table."""
        elapsed = {"wall_time_s": round(time.time() - self.t0, 2)} if self.t0 is not None else {}
        return {**self.header, **elapsed, "points": [point_row(r) for r in self.ordered_records()]}

    def n_final(self) -> int:
        return sum(1 for r in self.records.values() if r["status"] in FINAL_STATUSES)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def results_file(self) -> Path:
        return self.out_dir / self.scope.results_name()

    @property
    def todo(self) -> list[RunSpec]:
        return [e for e in self.runs if e.run_id not in self.done]


@dataclass(frozen=True)
class Invocation:
    """How this command was asked to run, besides the runs' settings (RunConfig) and its share (RunScope)."""
    resume_command: str = "the same command"  # the command that resumes this one (without --fresh)
    estimate: bool = True                   # time the plan before training
    n_bootstrap: int = N_BOOTSTRAP
    benchmark_steps: int = 0                # --benchmark: time this many steps per shape, train nothing
    fresh: bool = False                     # move earlier results aside first
    default_folder: bool = False            # no --output-dir: changed settings move earlier results aside
    dry_run: bool = False


def run(cfg: RunConfig, preset: Preset, scope: RunScope | None = None, how: Invocation = Invocation()) -> dict:
    """The training command: prepare, then train the runs one after another (under torchrun, every rank
    together), in --parallel child processes, or time them (--benchmark); then fit and draw. Rank 0 of
    a command (not a --parallel child: its parent does) holds the output folder's lock throughout."""
    scope = scope or RunScope()
    check_hub_reachable(cfg, preset)               # offline: one line, before any other work
    if how.dry_run:
        return dry_run_plan(cfg, preset, scope, how.estimate)
    dist_info = distributed_from_env()
    lock = (hold_output_lock(Path(cfg.output_dir), scope.results_name())
            if dist_info.is_main and not scope.child else None)
    try:
        return run_holding_lock(cfg, preset, scope, dist_info, how)
    finally:
        if lock is not None:
            lock.close()


def run_holding_lock(cfg: RunConfig, preset: Preset, scope: RunScope, dist_info: Distributed,
                     how: Invocation) -> dict:
    # every rank but rank 0 trains in silence, so each log line appears once
    with silenced(not dist_info.is_main), open_tracker(cfg, scope, dist_info.is_main) as tracker:
        s = prepare(cfg, preset, scope, dist_info, how)
        s.tracker = tracker
        if how.benchmark_steps:
            report = benchmark(Trainer(cfg, s.corpus, s.device), s.plan, steps=how.benchmark_steps)
            write_json_atomic(s.out_dir / "benchmark.json", report)
            log(f"benchmark: written to {s.out_dir / 'benchmark.json'}")
            return report
        k = runs_at_once(scope, dist_info.enabled, s.todo, cfg, s.device.name)
        if k > 1 and not scope.child and len(s.todo) > 1:
            if not scope.parallel and s.device.name == "cpu":
                log(f"parallel: small models on {cpu_cores()} CPU cores train {k} at a time, one thread each "
                    f"(faster than one run on every core: docs/speed.md); --parallel 1 trains one at a time")
            return validate_fits(s, preset, train_parallel(s, min(k, len(s.todo))))
        return validate_fits(s, preset, train_sequential(s, how.estimate))


def start_device(cfg: RunConfig, scope: RunScope, dist_info: Distributed,
                 benchmark: bool) -> tuple[Distributed, DeviceInfo]:
    """Under torchrun: bind this rank's GPU and join the process group first, so that rank 0 alone
    touches the folder and the others wait. Then the device and dtype."""
    if dist_info.enabled and (scope.parallel or 0) > 1:
        raise UserError("--parallel runs several single-process runs at once; under torchrun every run "
                        "already uses all the processes: drop --parallel")
    if dist_info.enabled and benchmark:
        raise UserError("--benchmark times one process: run it without torchrun")
    claim_local_gpu(dist_info, cfg.device)
    device = setup_device(cfg.device, cfg.dtype)
    dist_info = init_distributed(dist_info, device.name)
    if dist_info.enabled:
        check_batch_split(cfg.batch_size, dist_info.world_size)
    if scope.child and device.name == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0 / scope.child)
    log(f"device: {device.name} ({device.description}), dtype {device.dtype}, torch {torch.__version__}, "
        f"python {platform.python_version()}"
        + (f"; {dist_info.world_size} processes (torchrun), {cfg.batch_size // dist_info.world_size} of every "
           f"{cfg.batch_size} sequences per process" if dist_info.enabled else ""))
    return dist_info, device


def prepare(cfg: RunConfig, preset: Preset, scope: RunScope, dist_info: Distributed, how: Invocation) -> Session:
    """Every check that can fail before training (each a one-line UserError), the corpus (tokenized by
    rank 0 while the others wait), and the runs that finished earlier."""
    archive_on_change = how.default_folder and not scope.partial and not scope.child
    dist_info, device = start_device(cfg, scope, dist_info, bool(how.benchmark_steps))
    out_dir = Path(cfg.output_dir)
    prepare_output_dir(out_dir)
    if how.fresh and dist_info.is_main and not scope.child:
        archive_previous(out_dir)
    dist_info.barrier()
    try:
        existing = read_results(out_dir)
    except OtherSchema as e:        # an earlier version's study: in the default folder, moved aside
        if not archive_on_change:
            raise
        if dist_info.is_main:
            archive_previous(out_dir, why=f"an earlier version's results in the default output folder "
                                          f"({str(e).split(';')[0]})")
        dist_info.barrier()
        existing = None
    plan = build_plan(cfg, preset)
    all_runs = expand_seeds(plan, cfg.seeds)
    runs = select_runs(all_runs, scope)
    if not scope.child:        # a --parallel child's share of the device was checked by its parent
        log(check_run_memory(runs, cfg, device.name, available_memory_bytes(device.name)) or "")
    check_free_space(out_dir, all_runs, cfg.keep_checkpoints)
    every_s, every_steps = parse_checkpoint_every(cfg.checkpoint_every)
    policy = CheckpointPolicy(out_dir / "checkpoints", every_s, every_steps, cfg.keep_checkpoints)
    store = RunStore(out_dir)
    # settings first without the corpus (a refusal should not wait for minutes of tokenizing), then with it
    existing = settle_changed_settings(existing, cfg, runs, store, policy, None,
                                       archive_on_change=archive_on_change, dist_info=dist_info)
    corpus = load_corpus_on_rank0_first(cfg, preset, dist_info)
    shortest = min(len(corpus.train), len(corpus.val))
    if shortest <= cfg.context_length + 1:
        raise UserError(f"--context-length {cfg.context_length} is longer than this corpus's "
                        f"{'validation' if len(corpus.val) == shortest else 'training'} split ({shortest:,} tokens): "
                        f"use a shorter context or a larger corpus")
    data_budget = check_data_budget(plan, len(corpus.train), cfg.no_repeat)    # refuses under --no-repeat
    existing = settle_changed_settings(existing, cfg, runs, store, policy, corpus.record,
                                       archive_on_change=archive_on_change, dist_info=dist_info)
    if dist_info.is_main:
        remove_stale_temporaries(policy.folder)
        remove_stale_temporaries(store.folder)
    done = {}
    for exp in runs:
        if (rec := finished_earlier(store, exp, corpus.record)) is not None:
            done[exp.run_id] = {**rec, "roles": list(exp.roles)}      # what it feeds in this plan
    for exp in runs:    # a stable run counts as finished only with its branches: they need its states
        if exp.branch_points and any(b.branch_of == exp.name and b.seed == exp.seed and b.run_id not in done
                                     for b in runs):
            done.pop(exp.run_id, None)
    dist_info.agree(sorted(done), "which runs finished earlier")
    header = {"schema_version": SCHEMA_VERSION, "mode": cfg.mode, "config": dataclasses.asdict(cfg),
              "environment": {**environment_record(device, corpus), "processes": dist_info.world_size},
              "data_budget": data_budget}
    if scope.partial:
        header["scope"] = scope.record(runs)
    s = Session(cfg, scope, dist_info, device, corpus, plan, all_runs, runs, store, policy, existing, done,
                header, how.resume_command, how.n_bootstrap)
    for rec in done.values():
        s.keep(rec)
    if scope.partial and dist_info.is_main:  # written before training, so parts started together see each other
        write_json_atomic(s.results_file, s.results())
        refuse_other_results_files(out_dir, cfg, store, policy, corpus.record)
    return s


def dry_run_plan(cfg: RunConfig, preset: Preset, scope: RunScope, estimate: bool) -> dict:
    """--dry-run: the plan table, the data budget, the memory check and the time per run and in total,
    then nothing else: no output folder, no training. The time estimate times a few steps per shape on
    random tokens (what they are does not change a step's time), so no data is prepared either."""
    plan = build_plan(cfg, preset)
    runs = select_runs(expand_seeds(plan, cfg.seeds), scope)
    device = setup_device(cfg.device, cfg.dtype)
    memory_line = check_run_memory(runs, cfg, device.name, available_memory_bytes(device.name))
    n_train, how = known_train_tokens(cfg, preset)
    estimates = None
    if estimate:
        estimates = estimate_wall_time(Trainer(cfg, random_corpus(cfg), device), plan)
    print_plan(plan, cfg, estimates)
    budget = None
    if n_train is None:
        log(f"data: the size of {cfg.data} is unknown until it is prepared ({how}); the largest run reads "
            f"{format_count(max(e.tokens for e in plan))} tokens")
    else:
        budget = check_data_budget(plan, n_train, cfg.no_repeat)
        log(f"data: {format_count(n_train)} training tokens ({how})")
        for line in data_budget_lines(budget):
            log(line)
    if memory_line:
        log(memory_line)
    log(f"dry run: nothing prepared, trained or written; drop --dry-run to run this plan into {cfg.output_dir}")
    return {"plan": [dataclasses.asdict(e) for e in plan], "data_budget": budget, "estimates_s": estimates}


def known_train_tokens(cfg: RunConfig, preset: Preset) -> tuple[int | None, str]:
    """The corpus's training tokens without preparing it, and how they are known: a token file's length,
    a finished cache of this corpus and vocabulary, or (the built-in corpus, not yet tokenized) an
    estimate from its characters (builtin_epochs); (None, why) otherwise."""
    path = Path(cfg.data).expanduser()
    if cfg.data.endswith(".bin") and path.is_file():
        return len(load_token_file(path, cfg.vocab_size).train), "the token file"
    if cfg.data != "builtin" and (cfg.data.startswith("hf:") or dataset_files_kind(path)):
        return None, "a dataset is counted while it is tokenized"
    cap = preparation_cap(cfg, preset)
    source = text_file_source(cfg.data)
    entry = cache_entry(source, cfg.vocab_size, Path(cfg.cache_dir),
                        cfg.bpe_sample_chars or BPE_SAMPLE_CHARS, cap is not None)
    meta = read_cache_meta(entry)
    if meta is not None and cache_covers(meta, cap):
        return min(int(meta["n_train_tokens"]), cap or meta["n_train_tokens"]), f"cached in {entry}"
    if cfg.data == "builtin":
        probe = 10**9
        return round(probe / builtin_epochs(probe, cfg.vocab_size)), (
            f"estimated from its {source.n_chars / 1e6:.1f}M characters at "
            f"{builtin_chars_per_token(cfg.vocab_size):g} per token; not tokenized yet")
    return None, "not tokenized yet"


def random_corpus(cfg: RunConfig) -> Corpus:
    """Random tokens in the corpus's shape, enough for timed steps and one evaluation's windows."""
    n = 4 * cfg.context_length * cfg.batch_size * max(cfg.eval_batches, 1) + 1
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, n).astype(token_dtype(cfg.vocab_size))
    return Corpus(tokens, tokens, cfg.vocab_size, {})


def load_corpus_on_rank0_first(cfg: RunConfig, preset: Preset, dist_info: Distributed) -> Corpus:
    """Rank 0 prepares (tokenizes) the corpus while the other ranks wait; then they read its cache."""
    corpus = prepare_corpus(cfg, preset) if dist_info.is_main else None
    dist_info.barrier()
    corpus = corpus or prepare_corpus(cfg, preset)
    dist_info.agree(corpus.record.get("fingerprint") or corpus.record.get("sha256"), "the corpus's tokens")
    return corpus


def announce_plan(s: Session, estimates: dict[str, float] | None) -> None:
    """The plan table, which runs this process trains, repeated data, and what is resumed."""
    if s.scope.child:
        log(f"parallel {s.scope.child}: this process trains {', '.join(e.run_id for e in s.runs)}")
    else:
        print_plan(s.plan, s.cfg, estimates)
    if s.scope.partial and not s.scope.child:
        log(f"this process trains {len(s.runs)} of the plan's {len(s.all_runs)} runs ({s.scope.describe()}): "
            f"{', '.join(e.run_id for e in s.runs) or 'none'}")
    if len(s.cfg.seeds) > 1:
        log(f"  every experiment runs once per seed: seeds {', '.join(map(str, s.cfg.seeds))} "
            f"({len(s.all_runs)} runs)")
    for line in data_budget_lines(s.header["data_budget"]):
        log(line)
    if s.device.name == "cpu" and s.cfg.mode != "tiny" and estimates:
        log(f"note: mode '{s.cfg.mode}' would take about {sum(estimates.values()) / 3600:.1f} hours on this CPU; "
            f"--mode tiny is sized for a CPU. Continuing as asked.")
    resumable = [e.run_id for e in s.todo if s.policy.path(e.run_id).exists()]
    if s.done or resumable:
        log(f"resume: {len(s.done)} of {len(s.runs)} runs finished earlier (kept, not retrained)"
            + (f"; continuing {', '.join(resumable)} from checkpoints" if resumable else ""))
    if s.existing is not None:
        others = {p["run_id"] for p in s.existing["points"]} - {e.run_id for e in s.all_runs}
        if others:
            log(f"note: {len(others)} earlier runs are not in this plan; their records stay in {s.store.folder} "
                f"and are left out of results.json")


def train_sequential(s: Session, estimate: bool) -> dict:
    """Train this process's runs one after another (under torchrun, all ranks each run together),
    saving each run's record as it finishes; a signal checkpoints the current run and stops."""
    stop = StopRequest()
    trainer = Trainer(s.cfg, s.corpus, s.device, checkpoints=s.policy, stop=stop, dist=s.dist,
                      progress_bar=sys.stderr.isatty() and s.dist.is_main and not s.scope.child)
    trainer.tracker = s.tracker
    estimates = None
    if estimate and s.todo and s.dist.is_main:
        try:
            estimates = estimate_wall_time(trainer, s.plan)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            log("plan: the time estimate ran out of device memory; skipping it (training retries with "
                "smaller micro-batches)")
    announce_plan(s, estimates)
    s.start_training()
    trained: set[str] = set()            # run ids trained by this process (the measured speed's runs)

    def branch_done(branch, record):
        save_record(s, trainer, branch, record, trained, estimates)
    # under torchrun a signal ends every rank at once (see docs/distributed.md); one process checkpoints
    with stop_on_signals(stop) if not s.dist.enabled else contextlib.nullcontext():
        for i, exp in enumerate(s.runs):
            if exp.run_id in s.done or exp.branch_of:    # a branch trains inside its stable run, after it
                continue
            branches = [b for b in s.todo if b.branch_of == exp.name and b.seed == exp.seed]
            log(f"experiment {i + 1}/{len(s.runs)}: {exp.run_id}"
                + (f" (with {len(branches)} cooldown branches)" if branches else ""))
            try:
                if stop.signum is not None:      # a signal between two runs: nothing of this one to save
                    raise TrainingInterrupted(stop.signum, None)
                record = trainer.train(exp, branches, branch_done)
            except TrainingInterrupted as e:
                raise interrupted(s, e) from None
            save_record(s, trainer, exp, record, trained, estimates)
    return finish(s)


def save_record(s: Session, trainer: Trainer, exp: RunSpec, record: dict, trained: set[str],
                estimates: dict[str, float] | None) -> None:
    """A finished run (or branch): its record under runs/ first, then its checkpoint may go, then the
    results file with it, the interim figures and the plan's progress."""
    if s.dist.is_main:
        s.store.save(record)
    trainer.remove_checkpoint(exp)
    s.keep(record)
    trained.add(exp.run_id)
    if s.dist.is_main:
        results = s.results()
        write_json_atomic(s.results_file, results)
        if not s.scope.partial:             # a part's runs are tabled once merged (--fit-only)
            write_runs_csv(s.out_dir / "runs.csv", results["points"], s.cfg.n_count or DEFAULT_N_COUNT)
        after_run(s, results, trained, estimates, redraw=not exp.branch_of)


def after_run(s: Session, results: dict, trained: set[str], estimates: dict[str, float] | None,
              redraw: bool = True) -> None:
    """Between two runs: redraw the figures from the runs so far (a whole plan only: a part's runs are
    fitted once merged, and the last run's figure is the final one; not after a cooldown branch, whose
    stable run finishes soon after it: a redraw costs about 2 s, a tiny branch 1-17 s; and only when the
    session's RedrawClock says one is due), then the plan's progress."""
    done_ids = {p["run_id"] for p in results["points"] if p["status"] in FINAL_STATUSES}
    if redraw and not s.scope.partial and any(e.run_id not in done_ids for e in s.runs):
        draw_interim_figures(results, s.out_dir, len(s.runs), s.figures)
        s.tracker.study(results, s.out_dir)
    if not s.scope.child:                # a --parallel child's parent reports the whole plan's progress
        log(progress_line(plan_progress(s.runs, done_ids, trained, time.time() - s.t0, estimates)))


def save_partial_results(s: Session) -> None:
    """After a stop: a part writes its own file; a whole plan writes results.json with fits, no figure."""
    if s.scope.partial:
        write_json_atomic(s.results_file, s.results())
    else:
        finish_results(s.results(), s.out_dir, s.n_bootstrap, figure=False)


def interrupted(s: Session, e: TrainingInterrupted) -> RunInterrupted:
    """Save what a stop leaves (the current run's point, every finished run) and say how to resume."""
    if e.record is not None:
        s.keep(e.record)
    save_partial_results(s)
    n_final = s.n_final()
    where = (f" in {e.record['run_id']} at step {e.record['steps_done']}/{e.record['steps']} (checkpoint saved)"
             if e.record is not None else "")
    return RunInterrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name}{where}; "
                          f"{s.results_file.name} holds {n_final} finished run{'' if n_final == 1 else 's'}. "
                          f"Resume with the same command: {s.command}")


def finish(s: Session, how: str = "") -> dict:
    """Rank 0 fits and writes everything; a part of a sweep only says how to merge it."""
    results = s.results()
    if not s.dist.is_main:
        return results
    if s.scope.partial:
        write_json_atomic(s.results_file, results)
        n = len(results["points"])
        log(f"done in {format_duration(time.time() - s.t0)}: {n} run{'' if n == 1 else 's'} recorded in "
            f"{s.store.folder} and {s.results_file}" + ("" if s.scope.child else
            f"; when every part has finished, merge and fit them with: python {Path(__file__).name} "
            f"--fit-only {s.out_dir}"))
        return results
    finish_results(results, s.out_dir, s.n_bootstrap)
    s.tracker.study(results, s.out_dir)
    print_summary(results, s.out_dir, s.ordered_records())
    log(f"done in {format_duration(time.time() - s.t0)}{how}")
    return results


# --- --validate: after the fits, train the model they call compute-optimal at a larger budget ------

def validate_fits(s: Session, preset: Preset, results: dict) -> dict:
    """--validate: predict the joint law's compute-optimal model at FACTOR x the largest run's compute,
    write the prediction to results.json, train that model as one more resumable run (never fitted),
    then record measured against predicted in results['validation'], the log and the figures."""
    if s.cfg.validate is None or s.scope.child or not s.dist.is_main:
        return results
    if s.dist.enabled or s.scope.partial:
        log("validate: skipped: it runs after the fits of a whole plan in one process (not under torchrun, "
            "--shard or --only)")
        return results
    exp = plan_validation(s, preset, results)
    if exp is None:
        return results
    record = train_validation(s, exp)
    v = results["validation"]
    v.update(status=record.get("status"), wall_time_s=record.get("wall_time_s"),
             **score_validation(v, record.get("final_val_loss")))
    write_json_atomic(s.results_file, results)
    draw_figures(results, s.out_dir)
    s.tracker.study(results, s.out_dir)
    log_validation(v, prediction=False)
    return results


def plan_validation(s: Session, preset: Preset, results: dict) -> RunSpec | None:
    """The validation run and its prediction, written to results.json before it trains; None (said in
    one line, and recorded) when the joint law cannot place it."""
    # non-embedding N: the shape rule builds a model from a non-embedding target (choose_shape)
    points = runs_as_points(results["points"], "non-embedding")
    joint = fit_joint_law([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                          s.n_bootstrap, rows=point_rows(points))
    target = validation_target(joint, [6 * p["N"] * p["D"] for p in points] or [0.0], s.cfg.validate)
    exp = None
    if target["available"]:
        try:
            exp = validation_experiment(s.cfg, preset, target["N_opt"], target["D_opt"])
        except UserError as e:
            target = _unavailable(f"no model shape for N_opt {format_count(target['N_opt'])}: {e}", len(points))
    if exp is None:
        results["validation"] = {**target, "factor": s.cfg.validate}
        log(f"validate: skipped, no run trained: {target['reason']}")
    else:
        results["validation"] = {**target, "run_id": exp.run_id, "name": exp.name,
                                 "N": exp.n_params_nonembedding, "D": exp.tokens, "flops": exp.flops,
                                 "n_layer": exp.n_layer, "d_model": exp.d_model, "steps": exp.steps,
                                 **predict_validation(joint, exp.n_params_nonembedding, exp.tokens),
                                 "status": "predicted"}
        log_validation(results["validation"])
    write_json_atomic(s.results_file, results)
    return exp


def validation_experiment(cfg: RunConfig, preset: Preset, n_target: float, d_target: float) -> RunSpec:
    """The model the shape rule builds nearest N_opt, trained on D_opt tokens rounded to whole steps."""
    n_layer, d_model, n_head = choose_shape(max(1, round(n_target)), preset)
    steps = max(1, round(d_target / cfg.tokens_per_step))
    n = n_params_nonembedding(n_layer, d_model, cfg.arch)
    return RunSpec(name=f"{VALIDATE_NAME}-N{format_count(n)}-D{format_count(steps * cfg.tokens_per_step)}",
                   n_layer=n_layer, d_model=d_model, n_head=n_head, steps=steps,
                   peak_lr=cfg.lr if cfg.lr is not None else default_peak_lr(d_model, preset.lr_width, preset.lr_cap),
                   seed=cfg.seeds[0], warmup_steps=plan_warmup_steps(cfg), roles=(ROLE_VALIDATION,),
                   target=int(round(n_target)), **config_settings(cfg))


def train_validation(s: Session, exp: RunSpec) -> dict:
    """Train the validation run like any other (record under runs/, checkpoints, resumable); a record
    of it with the same definition from an earlier command is kept, not retrained."""
    if (rec := finished_earlier(s.store, exp, s.corpus.record)) is not None:
        log(f"validate: {exp.run_id} finished earlier (kept, not retrained)")
        return rec
    stop = StopRequest()
    trainer = Trainer(s.cfg, s.corpus, s.device, checkpoints=s.policy, stop=stop,
                      progress_bar=sys.stderr.isatty())
    trainer.tracker = s.tracker
    log(f"validate: training {exp.run_id} ({exp.steps} steps)")
    with stop_on_signals(stop):
        try:
            record = trainer.train(exp)
        except TrainingInterrupted as e:
            raise RunInterrupted(e.signum, f"interrupted by {signal.Signals(e.signum).name} in the validation "
                                 f"run {exp.run_id}; {s.results_file.name} holds the fits and the prediction. "
                                 f"Resume with the same command: {s.command}") from None
    s.store.save(record)                     # the record first, then the checkpoint may go
    trainer.remove_checkpoint(exp)
    return record


def log_validation(v: dict | None, prediction: bool = True) -> None:
    """The --validate prediction (before training), or the measured loss against it (after)."""
    if not v:
        return
    if not v.get("available"):
        log(f"  validate: unavailable ({v.get('reason')})")
        return
    if prediction:
        log(f"  validate: compute-optimal at {v['factor']:g} x the largest run's compute ({v['target_flops']:.3g} "
            f"FLOPs): N_opt {format_count(v['N_opt'])}, D_opt {format_count(v['D_opt'])}; as {v['name']} "
            f"({v['flops']:.3g} FLOPs) the joint law predicts {v['predicted_loss']:.4f} "
            f"{_fmt_ci(v.get('predicted_loss_ci95'), '{:.4f}')}, one new run "
            f"{_fmt_ci(v.get('predicted_loss_pi95'), '{:.4f}')}")
    if v.get("measured_loss") is not None:
        yes = {True: "inside", False: "outside", None: "no"}
        log(f"  validate: {v['name']} measured {v['measured_loss']:.4f}, predicted {v['predicted_loss']:.4f}: "
            f"error {100 * v['relative_error']:+.1f}% (new run {_fmt_pct(v.get('relative_error_pi95'))}); "
            f"{yes[v.get('within_pi95')]} the 95% prediction interval, {yes[v.get('within_ci95')]} the 95% "
            f"confidence interval")
    elif v.get("status") not in (None, "predicted"):
        log(f"  validate: {v['name']} ended {v['status']}: no measured loss to compare")


def check_installed(**modules) -> None:
    """A package of requirements.txt that did not import: one line saying how to install it."""
    missing = [name for name, module in modules.items() if module is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: pip install -r requirements.txt")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    # the command that resumes this run: the same one, without --fresh (which would start over)
    command = "python " + shlex.join([sys.argv[0] if argv is None else Path(__file__).name,
                                      *(str(a) for a in given if a != "--fresh")])
    dist_env = distributed_from_env()
    who = f" (rank {dist_env.rank})" if dist_env.enabled else ""
    try:
        check_installed(matplotlib=matplotlib, scipy=minimize)
        if args.fit_only and args.fit_csv:
            raise UserError("give --fit-only or --fit-csv, not both")
        if args.fit_only:
            refit_saved_runs(args.fit_only, args.output_dir, args.bootstrap, args.n_count)
            return 0
        if args.fit_csv:
            fit_table(args.fit_csv, args.output_dir, args.bootstrap)
            return 0
        if torch is None:
            raise UserError("training needs PyTorch: pip install -r requirements.txt (--fit-only and --fit-csv "
                            "work without it)")
        check_installed(tokenizers=tokenizers, tqdm=tqdm)
        cfg, preset = config_from_args(args)
        scope = scope_from_args(args, [str(a) for a in given])
        run(cfg, preset, scope, Invocation(
            resume_command=command, estimate=not args.no_estimate, n_bootstrap=args.bootstrap,
            benchmark_steps=args.benchmark_steps if args.benchmark else 0, fresh=args.fresh and not scope.child,
            default_folder=args.output_dir is None, dry_run=args.dry_run))
    except UserError as e:
        print(f"error{who}: {e}", file=sys.stderr, flush=True)
        return leave_process_group(2)
    except ParallelFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except RunInterrupted as e:
        if not stdout_is_stderr():      # under `> log 2>&1` or in a terminal, say it once
            log(str(e))
        print(str(e), file=sys.stderr, flush=True)
        return leave_process_group(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted; results.json holds every finished experiment; rerun the same command to resume "
              "from the latest checkpoint", file=sys.stderr, flush=True)
        return leave_process_group(130)
    except Exception as e:
        if not who:
            raise
        # one rank failed: say why, leave torchrun's error file for its summary, and exit non-zero at once
        traceback.print_exc()
        print(f"error{who}: {type(e).__name__}: {e}; torchrun stops the other ranks", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            leave_torchrun_error_file(e)
        return leave_process_group(1)
    return leave_process_group(0)


def leave_torchrun_error_file(e: BaseException) -> None:
    """The error file torchrun's summary reads (TORCHELASTIC_ERROR_FILE; torch's ErrorHandler format),
    written whole and renamed: torchrun also reads the file of a rank it has just stopped, and a rank
    stopped while writing it (torch's own writer truncates first) left it empty, so torchrun itself
    died on the JSON instead of naming the failing rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        write_json_atomic(Path(path), {"message": {"message": f"{type(e).__name__}: {e}", "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}})


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Everything a first session on a GPU needs to know, in one call that finishes in under 9 minutes.

    python scripts/gpu_check.py                  # CUDA (or MPS): about 7-8 minutes
    python scripts/gpu_check.py --device cpu     # the same checks at seconds-sized settings (a dry run)

Writes its evidence to $OUT (else --out, default ./gpu_check_out): summary.txt (one line per check) and
summary.json, and per check its log. The checks, in order:

  versions     torch, CUDA, cuDNN, the device, its compute capability, native bf16, free memory
  smoke        torch.compile, flash SDPA in bf16, RNG state restored from a CPU-loaded checkpoint,
               a pinned asynchronous batch copy equal to the host's
  benchmark    --benchmark compiled and eager, on a token file of random tokens made on the spot
  resume       a run interrupted with SIGINT after its first checkpoint, then the same command
  parallel     the same plan with --parallel 2 on this one device
  profile      the kernels one training step launches, for the smallest model

Each check runs in its own process with a time limit; a failed check is recorded and the rest still run.
Exit status: 0 when every check passed, 1 otherwise. Needs no network.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "run_scaling_experiments_enhanced.py"
sys.path.insert(0, str(ROOT))

# The ladder each check trains: quick's two smaller sizes for a few hundred steps on a GPU; tiny's
# smallest for a few dozen on a CPU. (vocabulary, runner arguments, benchmark steps)
SETTINGS = {
    "gpu": (10_000, ["--mode", "quick", "--param-sizes", "5M,20M", "--data-sizes", "2M", "--data-model-size", "5M",
                     "--max-steps", "300", "--eval-interval", "100", "--log-interval", "50"], 20),
    "cpu": (512, ["--mode", "tiny", "--param-sizes", "25K", "--data-sizes", "16K", "--data-model-size", "25K",
                  "--max-steps", "30", "--batch-size", "8", "--context-length", "64", "--eval-interval", "10",
                  "--eval-batches", "2", "--log-interval", "10", "--bootstrap", "20"], 5),
}
# seconds each check may take on a GPU (the sum stays under 9 minutes); a CPU's dry run, on a machine
# that may be shared, gets CPU_SLACK times as long
CPU_SLACK = 10
LIMITS_S = {"versions": 20, "smoke": 60, "benchmark_compiled": 140, "benchmark_eager": 50, "resume": 120,
            "parallel": 80, "profile": 40}


def write_token_file(path: Path, vocab: int, n_tokens: int) -> None:
    """Random uint16 tokens: a step's time does not depend on what the tokens are."""
    np.random.default_rng(0).integers(0, vocab, n_tokens, dtype=np.uint16).tofile(path)


def run_logged(cmd: list[str], log_path: Path, limit_s: float, env=None) -> tuple[int, str]:
    with open(log_path, "w") as log:
        try:
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=limit_s, env=env,
                               cwd=log_path.parent)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, log_path.read_text()


# --- the checks that run inside this script (in a child process of it: --inner NAME) -----------------

def inner_versions(device: str) -> dict:
    import platform
    import torch
    import run_scaling_experiments_enhanced as rse
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": device}
    if device == "cuda":
        cap = torch.cuda.get_device_capability()
        free, total = torch.cuda.mem_get_info()
        info.update(name=torch.cuda.get_device_name(0), capability=list(cap), gpus=torch.cuda.device_count(),
                    native_bf16=rse.cuda_native_bf16(cap), bf16_supported_incl_emulation=torch.cuda.is_bf16_supported(),
                    free_gb=round(free / 1e9, 1), total_gb=round(total / 1e9, 1),
                    data_sheet_peak_bf16=rse.gpu_peak_flops(torch.cuda.get_device_name(0), "bf16"))
        with open("nvidia-smi.txt", "w") as f:
            subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, check=False)
    elif device == "mps":
        info.update(recommended_max_gb=round(torch.mps.recommended_max_memory() / 1e9, 1)
                    if hasattr(torch.mps, "recommended_max_memory") else None)
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def inner_smoke(device: str) -> dict:
    import torch
    import torch.nn.functional as F
    import run_scaling_experiments_enhanced as rse
    out = {}
    # torch.compile: compiled equals eager
    t0 = time.perf_counter()
    x = torch.randn(64, 256, device=device)
    compiled = torch.compile(lambda t: F.gelu(t) * 2 + 1)
    out["compile_ok"] = bool(torch.allclose(compiled(x), F.gelu(x) * 2 + 1, atol=1e-5))
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    # flash attention in bf16 (the kernel the model's SDPA uses), against the math kernel in fp32
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(2, 4, 256, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    out["flash_sdpa_bf16_max_abs_err"] = float((flash.float() - ref).abs().max())
    out["flash_sdpa_bf16_ok"] = out["flash_sdpa_bf16_max_abs_err"] < 2e-2
    # RNG states through a checkpoint loaded to the CPU, as the runner resumes
    state = rse.rng_state(device)
    path = Path("rng.pt")
    torch.save(state, path)
    draw = torch.rand(4, device=device).tolist(), torch.rand(4).tolist()
    rse.set_rng_state(torch.load(path, map_location="cpu", weights_only=True), device)
    out["rng_restore_ok"] = (torch.rand(4, device=device).tolist(), torch.rand(4).tolist()) == draw
    # batches: pinned and asynchronous on CUDA, equal to the host's windows
    tokens = np.random.default_rng(1).integers(0, 10_000, 100_000, dtype=np.uint16)
    same = True
    for i in range(50):
        offs = rse.batch_offsets(len(tokens), 256, 32, 0, 0, i, 0)
        x, y = rse.get_batch(tokens, offs, 256, device)
        hx, hy = rse.get_batch(tokens, offs, 256)
        rse.sync_device(device)
        same &= torch.equal(x.cpu(), hx) and torch.equal(y.cpu(), hy)
    out["pinned_copy_ok"] = bool(same)
    out["ok"] = all(v for k, v in out.items() if k.endswith("_ok"))
    return out


def inner_profile(device: str, vocab: int, args: list[str]) -> dict:
    """Kernels (device events) per training step of the plan's smallest model, and the top ones."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    import run_scaling_experiments_enhanced as rse
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args([*args, "--vocab-size", str(vocab),
                                                                      "--device", device]))
    trainer = rse.Trainer(cfg, rse.random_corpus(cfg), rse.setup_device(device))
    shape = rse.plan_shapes(rse.build_plan(cfg, preset))[0]
    exp = rse.probe_experiment(*shape)
    rm = trainer.new_model(exp, 0)
    for step in range(3):                                   # warm-up (and compile)
        trainer.train_step(rm, exp, step)
    rse.sync_device(device)
    steps = 5
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(3, 3 + steps):
            trainer.train_step(rm, exp, step)
        rse.sync_device(device)
    events = prof.events()
    kernels = [e for e in events if device == "cuda" and e.device_type.name == "CUDA"]
    ops = [e for e in events if e.device_type.name == "CPU" and e.name.startswith("aten::")]
    sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    Path("profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
    return {"shape": shape, "compiled": trainer.compile, "kernels_per_step": len(kernels) / steps,
            "aten_ops_per_step": len(ops) / steps, "ok": True}


# --- the checks that run the CLI ----------------------------------------------------------------------

def check_benchmark(out: Path, device: str, data: Path, vocab: int, args: list[str], steps: int, compiled: bool,
                    limit_s: float) -> dict:
    name = f"benchmark_{'compiled' if compiled else 'eager'}"
    folder = out / name
    cmd = [sys.executable, str(RUNNER), *args, "--data", str(data), "--vocab-size", str(vocab), "--device", device,
           "--benchmark", "--benchmark-steps", str(steps), "--compile" if compiled else "--no-compile",
           "--output-dir", str(folder)]
    rc, text = run_logged(cmd, out / f"{name}.log", limit_s)
    result = {"ok": rc == 0, "rc": rc}
    if rc == 0:
        report = json.loads((folder / "benchmark.json").read_text())
        result.update(compile=report["compile"], dtype=report["dtype"],
                      sizes=[{k: r[k] for k in ("n_params_nonembedding", "tokens_per_s", "mfu", "peak_memory_mb")}
                             for r in report["sizes"]])
    return result


def check_resume(out: Path, device: str, data: Path, vocab: int, args: list[str], limit_s: float) -> dict:
    """SIGINT right after the first checkpoint, then the same command: it must resume and finish."""
    folder = out / "resume_run"
    cmd = [sys.executable, str(RUNNER), *args, "--data", str(data), "--vocab-size", str(vocab), "--device", device,
           "--checkpoint-every", "20steps", "--no-estimate", "--output-dir", str(folder)]
    t_end = time.time() + limit_s
    with open(out / "resume_first.log", "w") as log:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
        for line in p.stdout:
            log.write(line)
            if "] checkpoint at step" in line:
                p.send_signal(signal.SIGINT)
                break
        try:
            rest, _ = p.communicate(timeout=max(1.0, t_end - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            rest, _ = p.communicate()
        log.write(rest or "")
    first_rc = p.returncode
    rc, text = run_logged(cmd, out / "resume_second.log", max(1.0, t_end - time.time()))
    result = {"first_rc": first_rc, "rc": rc, "resumed": "resuming from its checkpoint" in text}
    if rc == 0:
        result["runs"] = {e["run_id"]: {"final_val_loss": e["final_val_loss"], "resumed_at_steps": e["resumed_at_steps"],
                                        "compile_s": e.get("compile_s"), "tokens_per_s": e["tokens_per_s"],
                                        "mfu": e["mfu"]} for e in run_records(folder)}
    result["ok"] = first_rc == 128 + signal.SIGINT and rc == 0 and result["resumed"]
    return result


def run_records(folder: Path) -> list[dict]:
    """A study's run records (runs/<run_id>.json), in its results.json's points order."""
    points = json.loads((folder / "results.json").read_text())["points"]
    return [json.loads((folder / "runs" / f"{p['run_id']}.json").read_text()) for p in points]


def check_parallel(out: Path, device: str, data: Path, vocab: int, args: list[str], limit_s: float) -> dict:
    folder = out / "parallel_run"
    cmd = [sys.executable, str(RUNNER), *args, "--data", str(data), "--vocab-size", str(vocab), "--device", device,
           "--parallel", "2", "--no-estimate", "--output-dir", str(folder)]
    t0 = time.time()
    rc, text = run_logged(cmd, out / "parallel.log", limit_s)
    result = {"ok": rc == 0, "rc": rc, "wall_s": round(time.time() - t0, 1)}
    resumed = out / "resume_run" / "results.json"
    if rc == 0 and resumed.exists():      # the same plan, one process after another (with an interruption)
        one = {p["run_id"]: p["loss"] for p in json.loads(resumed.read_text())["points"]}
        two = {p["run_id"]: p["loss"] for p in json.loads((folder / "results.json").read_text())["points"]}
        result["max_loss_difference_vs_resume_run"] = max(abs(two[k] - one[k]) for k in one if k in two)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    p.add_argument("--out", help="evidence folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--inner", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = a.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    vocab, args, bench_steps = SETTINGS["cpu" if device == "cpu" else "gpu"]
    if a.inner:                                            # a check run in a process of its own
        fn = {"versions": lambda: inner_versions(device), "smoke": lambda: inner_smoke(device),
              "profile": lambda: inner_profile(device, vocab, args)}[a.inner]
        print("RESULT " + json.dumps(fn()))
        return 0
    out = Path(a.out or os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "random_tokens.bin"
    write_token_file(data, vocab, 20_000_000 if device != "cpu" else 200_000)
    summary, t_start = [], time.time()
    limits = {k: v * (CPU_SLACK if device == "cpu" else 1) for k, v in LIMITS_S.items()}

    def record(name: str, t0: float, result: dict) -> None:
        result = {"check": name, "seconds": round(time.time() - t0, 1), **result}
        summary.append(result)
        line = f"{'ok  ' if result.get('ok') else 'FAIL'} {name:<20} {result['seconds']:>6.1f}s  " + json.dumps(
            {k: v for k, v in result.items() if k not in ("check", "seconds", "ok")})
        print(line, flush=True)
        with open(out / "summary.txt", "a") as f:
            f.write(line + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    (out / "summary.txt").write_text(f"gpu_check on {device}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    for name in ("versions", "smoke"):
        t0 = time.time()
        rc, text = run_logged([sys.executable, str(Path(__file__).resolve()), "--device", device, "--inner", name],
                              out / f"{name}.log", limits[name])
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"ok": False}
        record(name, t0, {**result, "rc": rc, "ok": rc == 0 and result.get("ok", True)})
    for compiled in (True, False):
        t0 = time.time()
        name = f"benchmark_{'compiled' if compiled else 'eager'}"
        record(name, t0, check_benchmark(out, device, data, vocab, args, bench_steps, compiled, limits[name]))
    t0 = time.time()
    record("resume", t0, check_resume(out, device, data, vocab, args, limits["resume"]))
    t0 = time.time()
    record("parallel", t0, check_parallel(out, device, data, vocab, args, limits["parallel"]))
    t0 = time.time()
    rc, text = run_logged([sys.executable, str(Path(__file__).resolve()), "--device", device, "--inner", "profile"],
                          out / "profile.log", limits["profile"])
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    record("profile", t0, json.loads(lines[-1][7:]) if lines else {"ok": False, "rc": rc})
    failed = [r["check"] for r in summary if not r.get("ok")]
    end = f"done in {time.time() - t_start:.0f}s: {len(summary) - len(failed)}/{len(summary)} checks passed" + (
        f"; failed: {', '.join(failed)}" if failed else "") + f"; evidence in {out}"
    print(end)
    with open(out / "summary.txt", "a") as f:
        f.write(end + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed accounting (issue 6): FLOPs per token, the MFU denominator, per-run speed fields, --benchmark."""
import json

import pytest

import run_scaling_experiments_enhanced as rse
from conftest import SECONDS_SIZED, run_cli, run_records


def test_flops_per_token_closed_form():
    # GPT-2 small: 12 layers, d 768, vocabulary 50257, context 1024
    n_matmul = 12 * 12 * 768**2 + 50257 * 768
    assert rse.flops_per_token(12, 768, 50257, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    assert rse.flops_per_token(12, 768, 50257, 1024) == 854_438_400   # ~0.85 GFLOP per token


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "bf16", 989.0), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 156.0), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA L40S", "bf16", 362.0), ("NVIDIA L4", "bf16", 121.0),
])
def test_gpu_peak_table(name, dtype, tflops):
    assert rse.gpu_peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_device_uses_override_or_measurement():
    dev = rse.DeviceInfo("cuda", "Some Future GPU", "bf16")
    assert rse.gpu_peak_flops(dev.description, "bf16") is None
    assert rse.device_peak_flops(dev, 123.0) == (123.0e12, "--peak-tflops")
    cpu = rse.DeviceInfo("cpu", "x", "fp32")
    peak, source = rse.device_peak_flops(cpu)
    assert source == "measured fp32 matmul peak" and 1e8 < peak < 1e14


def test_runs_record_speed_and_benchmark_writes_json(tmp_path, corpus_file, cache_dir):
    out = tmp_path / "out"
    common = [*SECONDS_SIZED, "--data", corpus_file, "--cache-dir", cache_dir, "--output-dir", out,
              "--peak-tflops", "0.5"]
    r = run_cli(common, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for e in run_records(out):
        fpt = rse.flops_per_token(e["n_layer"], e["d_model"], 512, 64)
        assert e["flops_per_token"] == fpt
        assert e["peak_flops"] == 0.5e12 and e["peak_flops_source"] == "--peak-tflops"
        assert e["mfu"] == pytest.approx(e["tokens_per_s"] * fpt / 0.5e12, rel=1e-3, abs=1e-5)  # stored to 5 places
        assert e["peak_memory_mb"] > 10 and e["dtype"] == "fp32" and e["compiled"] is False
    assert " MFU " in r.stdout

    bench = tmp_path / "bench"
    r = run_cli([*common[:-4], "--output-dir", bench, "--benchmark", "--benchmark-steps", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((bench / "benchmark.json").read_text())
    assert [s["d_model"] for s in report["sizes"]] == [16, 32, 64]    # every distinct shape: 6.6K (data sweep)
    for s in report["sizes"]:
        assert s["tokens_per_s"] > 0 and s["plain_eager_fp32_tokens_per_s"] > 0
        assert s["mfu"] == pytest.approx(s["tokens_per_s"] * s["flops_per_token"] / report["peak_flops"], rel=1e-4)
    assert report["projected_wall_time_s"] > 0 and report["timed_steps"] == 5     # one block of 5
    assert not (bench / "results.json").exists()                          # a benchmark trains nothing
    assert "projected wall time of mode 'tiny'" in r.stdout

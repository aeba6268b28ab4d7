"""The main command where its users run it (issue 23), checked on a CPU: checkpoints that load on any
device, host-to-device copies, the torch.compile fallback, and the device facts (bf16, the peak table,
MFU under torchrun, --parallel on several GPUs, free and Metal memory). CUDA and MPS are patched in;
nothing here needs a GPU."""
import dataclasses

import numpy as np
import pytest

import run_scaling_experiments_enhanced as rse
from conftest import run_records
from test_resume import main_in_process, small_args

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.filterwarnings("ignore::scipy.optimize.OptimizeWarning")


def tiny_trainer(tmp_path, device="cpu"):
    cfg, _ = rse.config_from_args(rse.build_parser().parse_args(
        ["--mode", "tiny", "--vocab-size", "512", "--batch-size", "4", "--context-length", "16",
         "--eval-batches", "1", "--device", "cpu", "--no-compile", "--peak-tflops", "1"]))
    trainer = rse.Trainer(cfg, rse.random_corpus(cfg), rse.DeviceInfo(device, "test", "fp32"),
                          checkpoints=rse.CheckpointPolicy(tmp_path / "checkpoints", None, 10))
    return trainer, rse.probe_experiment(1, 16, 2)


# --- checkpoints load to the CPU (issue 23, item 2) --------------------------------------------------

def test_a_checkpoint_written_and_resumed_on_cuda_restores_rng_from_cpu_byte_tensors(tmp_path, monkeypatch):
    """At 0cf71dd torch.load(map_location="cuda") made the saved RNG states CUDA tensors, and
    torch.set_rng_state raised "RNG state must be a torch.ByteTensor" on every resume on a GPU (here, on
    a CPU-only torch, the load itself raised)."""
    trainer, exp = tiny_trainer(tmp_path)
    rm = trainer.new_model(exp, 0)
    for step in range(10):
        trainer.train_step(rm, exp, step)
    again = trainer.new_model(exp, 1)                   # other weights, to be overwritten by the checkpoint's
    cuda_rng = [torch.arange(16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: cuda_rng)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    seen = []
    real_set = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda s: (seen.append(s), real_set(s)))
    trainer.device = rse.DeviceInfo("cuda", "patched", "fp32")
    trainer.save_checkpoint(exp, rm, rse.TrainState(step=10, lr=1e-4))
    saved = torch.get_rng_state()
    torch.manual_seed(123)                              # resuming must undo this
    state = trainer.start_or_resume(exp, again, 1, [])
    assert state.step == 10 and state.resumed_at_steps == [10]
    assert len(seen) == 1 and seen[0].device.type == "cpu" and seen[0].dtype == torch.uint8
    assert torch.equal(torch.get_rng_state(), saved)
    assert len(restored) == 1 and restored[0][0].device.type == "cpu" and torch.equal(restored[0][0], cuda_rng[0])
    for a, b in zip(rm.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert again.opt.state_dict()["state"][0]["step"] == 10


# --- host-to-device copies (item 3) ------------------------------------------------------------------

class FakeHostTensor:
    """Records what to_device does to a host tensor."""

    def __init__(self, calls, contiguous=False, pinned=False):
        self.calls, self.contiguous_, self.pinned = calls, contiguous, pinned

    def contiguous(self):
        self.calls.append("contiguous")
        return FakeHostTensor(self.calls, True, self.pinned)

    def pin_memory(self):
        assert self.contiguous_, "pinning a strided view copies it through pageable memory"
        self.calls.append("pin")
        return FakeHostTensor(self.calls, True, True)

    def to(self, device, non_blocking=False):
        self.calls.append(("to", device, non_blocking, self.pinned))
        return self


@pytest.mark.parametrize("device,copy", [("cuda", ("to", "cuda", True, True)), ("mps", ("to", "mps", False, False)),
                                         ("cpu", ("to", "cpu", False, False))])
def test_copies_are_asynchronous_only_from_pinned_memory_on_cuda(device, copy):
    """At 0cf71dd MPS got non_blocking copies of pageable memory, and CUDA pinned x and y, strided views."""
    calls = []
    rse.to_device(FakeHostTensor(calls), device)
    assert calls[-1] == copy and calls.count("pin") == (device == "cuda")
    tokens = np.arange(100, dtype=np.uint16)
    x, y = rse.get_batch(tokens, np.array([3, 50]), 8, "cpu")
    assert x.tolist() == [list(range(3, 11)), list(range(50, 58))] and torch.equal(y, x + 1)
    assert x.dtype == torch.int64 and x.data_ptr() + 8 == y.data_ptr()        # views of one (B, T+1) block


# --- torch.compile: a one-step check, an eager fallback, compile_s (item 4) ---------------------------

def test_a_failing_torch_compile_falls_back_to_eager_and_the_run_finishes(tmp_path, byte_tokens, monkeypatch):
    """At 0cf71dd the first step raised out of the compiled model and the command died."""
    def broken(model, **kw):
        def step(*a, **k):
            raise RuntimeError("triton: no working C compiler\nsecond line")
        return step
    monkeypatch.setattr(rse.torch, "compile", broken)
    out = tmp_path / "out"
    rc, said, err = main_in_process(small_args(byte_tokens, out, "--device", "cpu", "--compile",
                                               "--param-sizes", "25K", "--data-sizes", "1K"))
    assert rc == 0, err[-2000:]
    assert said.count("compile: torch.compile failed (RuntimeError: triton: no working C compiler); "
                      "training eager instead") == 1                  # once: later models do not retry
    exps = run_records(out)
    assert [e["status"] for e in exps] == ["completed", "completed"]
    assert all(e["compiled"] is False and e["compile_s"] == 0.0 for e in exps)


def test_a_working_compile_is_timed_apart_from_training(tmp_path, monkeypatch):
    """The compile check's forward and backward pass leaves no gradient behind, reports its seconds, and
    the timed steps start after it (so tokens/s and MFU exclude it)."""
    calls = []

    def fake_compile(model, **kw):
        calls.append(model)
        return model
    monkeypatch.setattr(rse.torch, "compile", fake_compile)
    trainer, exp = tiny_trainer(tmp_path)
    trainer.compile = True
    rm = trainer.new_model(exp, 0)
    assert len(calls) == 1 and rm.compile_s > 0 and trainer.compile
    assert all(p.grad is None for p in rm.model.parameters())
    eager = rse.Trainer(dataclasses.replace(trainer.cfg, compile=False), trainer.corpus, trainer.device)
    ref = eager.new_model(exp, 0)
    for step in range(3):       # the check changed no weight and no optimizer state
        assert float(trainer.train_step(rm, exp, step)[0]) == float(eager.train_step(ref, exp, step)[0])


def test_the_time_estimate_runs_eager_on_one_process(tmp_path, monkeypatch):
    """Under torchrun only rank 0 estimates: its probes must not be DDP models (whose collectives the other
    ranks never join) nor compiled (a compile would be timed as training)."""
    trainer, exp = tiny_trainer(tmp_path)
    trainer.compile = True
    trainer.dist = rse.Distributed(rank=0, world_size=2)        # never initialised: a collective would raise
    built = []
    real_new_model = rse.Trainer.new_model
    monkeypatch.setattr(rse.Trainer, "new_model",
                        lambda self, *a, **k: (built.append((self.compile, self.dist.enabled,
                                                             self.cfg.batch_size)), real_new_model(self, *a, **k))[1])
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(
        ["--mode", "tiny", "--param-sizes", "25K", "--data-sizes", "16K", "--vocab-size", "512"]))
    estimates = rse.estimate_wall_time(trainer, rse.build_plan(cfg, preset))
    assert estimates and all(v > 0 for v in estimates.values())
    assert built and all(b == (False, False, 2) for b in built)            # eager, alone, half the batch


# --- device facts (item 5) ---------------------------------------------------------------------------

def fake_cuda(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0), count=1, free=10 * 2**30):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)    # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free, 80 * 2**30))


@pytest.mark.parametrize("name,capability,dtype", [
    ("Tesla V100-SXM2-16GB", (7, 0), "fp32"), ("Tesla T4", (7, 5), "fp32"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"), ("NVIDIA H100 80GB HBM3", (9, 0), "bf16")])
def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch, name, capability, dtype):
    fake_cuda(monkeypatch, name, capability)
    assert rse.setup_device("cuda").dtype == dtype
    if dtype == "fp32":
        with pytest.raises(rse.UserError, match="no native bf16"):
            rse.setup_device("cuda", "bf16")


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA L4", 121.0), ("NVIDIA L40", None), ("NVIDIA L40S", 362.0), ("NVIDIA A10", 125.0),
    ("NVIDIA A10G", 70.0), ("NVIDIA H100 NVL", 835.5), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", None), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("Tesla V100-SXM2-16GB", 125.0)])
def test_peak_table_matches_whole_words_and_leaves_mig_to_measurement(name, tflops):
    """At 0cf71dd "L4" matched inside "L40", and NVL and MIG got the SXM part's peak."""
    peak = rse.gpu_peak_flops(name, "bf16")
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_mfu_under_torchrun_equals_one_process_at_the_same_global_batch(tmp_path):
    """Two ranks at twice one process's tokens/s (the same global batch, each rank half of it) use their
    GPUs as fully: at 0cf71dd the global rate was divided by one GPU's peak (MFU 2x too high)."""
    one, exp = tiny_trainer(tmp_path)
    two, _ = tiny_trainer(tmp_path)
    two.dist = rse.Distributed(rank=0, world_size=2)
    assert one.mfu(exp, 1e5) > 0
    assert two.mfu(exp, 2e5) == pytest.approx(one.mfu(exp, 1e5), rel=1e-12)


def test_parallel_children_get_their_own_gpus_on_a_host_with_several(monkeypatch):
    """At 0cf71dd every --parallel child opened GPU 0."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_cuda(monkeypatch, count=4)
    assert rse.child_gpus(4) == ["0", "1", "2", "3"]
    assert rse.child_gpus(6) == ["0", "1", "2", "3", "0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rse.child_gpus(3) == ["2", "5", "2"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rse.child_gpus(3) == [None, None, None]                  # one GPU: they share it


def test_default_parallel_count_and_memory_check_use_free_memory(monkeypatch):
    """A GPU with 80 GB of which another process holds 70: the plan sees 10 GB."""
    fake_cuda(monkeypatch, free=10 * 2**30)
    assert rse.gpu_memory_bytes("cuda") == 10 * 2**30
    assert rse.available_memory_bytes("cuda") == (10 * 2**30, "the GPU's free memory")
    quick = rse.PRESETS["quick"]
    cfg = rse.RunConfig(mode="quick", param_sizes=list(quick.param_sizes), data_sizes=list(quick.data_sizes),
                        data_model_size=quick.data_model_size, steps=quick.steps, batch_size=quick.batch_size,
                        grad_accum=1, context_length=quick.context_length, vocab_size=quick.vocab_size, lr=None)
    runs = rse.build_plan(cfg, quick)
    assert rse.runs_at_once(rse.RunScope(), False, runs, cfg, "cuda") == 2      # 4 with the 80 GB total


def test_mps_memory_check_uses_metals_recommended_maximum(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * 2**30, raising=False)
    assert rse.available_memory_bytes("mps") == (21 * 2**30, "Metal's recommended maximum for this GPU")

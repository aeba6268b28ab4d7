"""Failures injected by patching the Trainer, never by the product itself: used in-process through
`patch_failures` (with pytest's monkeypatch) and, for tests that need processes of their own (torchrun),
as a wrapper script that patches and then calls the CLI's main():

    python tests/inject.py --crash RANK:STEP [runner arguments...]   # that rank raises before that step
    python tests/inject.py --nan RUN_ID:STEP [runner arguments...]   # that run's weights become NaN
    python tests/inject.py --kill RUN_ID:STEP [runner arguments...]  # SIGKILL once that checkpoint is written
Steps are 1-based, as in the log."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_scaling_experiments_enhanced as rse  # noqa: E402


def parse_spec(text: str) -> tuple[str, int]:
    who, _, step = text.rpartition(":")
    return who, int(step)


def patch_failures(setattr_, crash: str | None = None, nan: str | None = None) -> None:
    """Wrap Trainer.train_step: before the given 1-based step, raise on a rank (crash='1:10') or poison
    the weights of a run (nan='params-N100K-seed1:5', by run id or experiment name), as a real fault would."""
    real_step = rse.Trainer.train_step
    crash_at = parse_spec(crash) if crash else None
    nan_at = parse_spec(nan) if nan else None

    def train_step(self, rm, exp, step, micro_split=1):
        if crash_at and int(crash_at[0]) == self.dist.rank and step + 1 == crash_at[1]:
            raise RuntimeError(f"injected failure on rank {self.dist.rank} at step {step + 1}")
        if nan_at and nan_at[0] in (exp.name, exp.run_id) and step + 1 == nan_at[1]:
            with rse.torch.no_grad():
                next(rm.model.parameters()).fill_(float("nan"))
        return real_step(self, rm, exp, step, micro_split)
    setattr_(rse.Trainer, "train_step", train_step)


def patch_kill(setattr_, kill: str) -> None:
    """Wrap Trainer.save_checkpoint: the process kills itself with SIGKILL right after writing the given
    run's checkpoint at the given step (kill='params-N25K@15.4K-seed0:21'), as a kill at a chosen moment
    would; the checkpoint it resumes from is then known, not a race with the log."""
    real_save = rse.Trainer.save_checkpoint
    who, step = parse_spec(kill)

    def save_checkpoint(self, exp, rm, state):
        real_save(self, exp, rm, state)
        if exp.run_id == who and state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    setattr_(rse.Trainer, "save_checkpoint", save_checkpoint)


if __name__ == "__main__":
    args = sys.argv[1:]
    kinds = {}
    while args and args[0] in ("--crash", "--nan", "--kill"):
        kinds[args[0][2:]] = args[1]
        args = args[2:]
    if "kill" in kinds:
        patch_kill(setattr, kinds.pop("kill"))
    patch_failures(setattr, **kinds)
    sys.exit(rse.main(args))

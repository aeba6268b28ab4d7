#!/usr/bin/env python3
"""Measure how WSD cooldown branches compare with separate runs of the same length.

    python scripts/wsd_agreement.py --mode tiny --param-sizes 25K --steps 100,200,400,800

One WSD run to the longest horizon branches a cooldown at every shorter one (as --horizons does); then
separate runs of every length are trained: WSD and cosine, each with the plan's fixed warmup and with a
warmup of 10% of each run (the rule before this round). Prints the final validation losses, the branch's
difference from each, and the tokens processed. Any other runner option (--data, --lr, --cooldown-frac,
--warmup-steps, ...) is passed through. Trains on the CPU unless --device says otherwise.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_scaling_experiments_enhanced as rse  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="100,200,400,800", help="horizons in steps, comma-separated")
    args, runner_argv = p.parse_known_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    cfg, preset = rse.config_from_args(rse.build_parser().parse_args(
        ["--device", "cpu", *runner_argv, "--max-steps", str(steps[-1]), "--schedule", "wsd"]))
    # the runner's own plan with these horizons: its first size's stable run and its cooldown branches
    cfg = dataclasses.replace(cfg, horizons=",".join(str(s * cfg.tokens_per_step) for s in steps), row_steps=None)
    plan = rse.build_plan(cfg, preset)
    main_run = next(e for e in plan if e.branch_points or not e.branch_of)
    branches = [e for e in plan if e.branch_of == main_run.name]
    device = rse.setup_device(cfg.device, cfg.dtype)
    corpus = rse.prepare_corpus(cfg, preset)
    trainer = rse.Trainer(cfg, corpus, device)
    warmup = rse.plan_warmup_steps(cfg)
    branched = {}
    branched[steps[-1]] = trainer.train(main_run, branches, lambda b, rec: branched.__setitem__(
        b.steps, rec["final_val_loss"]))["final_val_loss"]
    processed = main_run.steps + sum(b.trained_steps for b in branches)
    rows = {}
    for kind in ("wsd", "cosine"):
        for rule in ("fixed", "10%"):
            cfg_k = dataclasses.replace(cfg, schedule=kind, warmup_steps=warmup if rule == "fixed" else None)
            t = rse.Trainer(cfg_k, corpus, device)
            for s in steps:
                w = warmup if rule == "fixed" else max(1, round(0.1 * s))
                run = dataclasses.replace(main_run, steps=s, warmup_steps=w, branch_points=(), schedule=kind)
                rows[(kind, rule, s)] = t.train(run)["final_val_loss"]
    print(f"\nmodel {rse.format_count(main_run.n_params_nonembedding)}, peak lr {main_run.peak_lr:.2e}, fixed "
          f"warmup {warmup} steps, cooldown {cfg.cooldown_frac:.0%} {cfg.cooldown_shape}; corpus {cfg.data}")
    print(f"{'steps':>6} {'branch':>8} " + " ".join(f"{k + ' ' + r:>13}" for k in ("wsd", "cosine")
                                                   for r in ("fixed", "10%")) + "   branch vs each")
    for s in steps:
        b = branched[s]
        others = [rows[(k, r, s)] for k in ("wsd", "cosine") for r in ("fixed", "10%")]
        print(f"{s:>6} {b:>8.4f} " + " ".join(f"{o:>13.4f}" for o in others) + "   "
              + " ".join(f"{100 * (b / o - 1):+6.2f}%" for o in others))
    print(f"tokens processed: {processed} steps for the branched run against {sum(steps)} for separate runs "
          f"({processed / sum(steps):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

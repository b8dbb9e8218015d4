"""Why few steps do not refine: the clean estimate along the sampler's own path, and trajectory averaging (issue #9).

For a trained ``x1`` model (bench_value's cached fold-0 models, the same held-out test cases, TTA off) this scores,
per seed, sampler variants that ``mfs_predict`` does not offer — diagnostics, not product features:

* ``at T``: one evaluation at time T on the sampler's own path, x_T = (1 − T)·x0 + T·x̂1(0) (x̂1(0) the one-step
  estimate), returning its clean estimate x̂1(T) = x_T + (1 − T)·v. ``at 0.5`` is exactly Euler N = 2.
* ``Euler N avg``: N Euler steps, returning the mean of the N clean estimates x_i + (1 − t_i)·v_i met on the way
  (for the linear path every velocity implies such an endpoint; x̂1 = 2p − 1, so this averages probabilities)
  instead of the last one.
* ``1 step`` and ``Euler N`` as ``mfs_predict`` runs them, for reference.

The variants replace the sampler module's ``integrate`` (what ``FlowSegmenter`` calls for N > 1 steps) inside this
process only. Scores: mean foreground Dice and the ROI calibration of ``value_report.RunScores``.

    python benchmarks/bench_own_path.py -c 2d --epochs 5 --iterations_per_epoch 100 --batch_size 32 --threads 1 \
        --work /work/bench_work --ours_trainer MedFlowSegTrainer_timeScaledInput --seeds 0 1
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_value as BV  # noqa: E402
import common as C  # noqa: E402
from value_models import prepare, read_case, train_or_load  # noqa: E402
from value_report import RunScores  # noqa: E402

logger = logging.getLogger("benchmarks.own_path")


@dataclass(frozen=True)
class Variant:
    """``steps`` Euler steps; ``average``: mean of the clean estimates on the way; ``at``: one evaluation at that
    time on the own path instead (``steps`` must then be 2, so that the sampler takes the multi-step branch)."""

    name: str
    steps: int
    average: bool = False
    at: Optional[float] = None


VARIANTS = {v.name: v for v in [
    Variant("1 step", 1), Variant("Euler N=2", 2), Variant("Euler N=4", 4),
    Variant("Euler N=2 avg", 2, average=True), Variant("Euler N=4 avg", 4, average=True),
    *[Variant(f"at {t}", 2, at=t) for t in (0.25, 0.5, 0.75, 0.9)]]}


def make_integrate(variant: Variant, plain_integrate):
    """An ``integrate(velocity, x0, config)`` with the sampler's signature that runs ``variant``."""
    import torch
    from medflowseg_nn.flow.solver import time_grid

    def integrate(velocity, x0, config):
        batch = x0.shape[0]
        if variant.at is not None:
            x1_0 = x0 + velocity(x0, torch.zeros(batch, device=x0.device, dtype=x0.dtype))
            x_t = (1 - variant.at) * x0 + variant.at * x1_0
            t = torch.full((batch,), variant.at, device=x0.device, dtype=x0.dtype)
            return x_t + (1 - variant.at) * velocity(x_t, t)
        if not variant.average:
            return plain_integrate(velocity, x0, config)
        grid = time_grid(config.steps, config.grid, device=x0.device)
        x, estimates = x0, []
        for i in range(config.steps):
            v = velocity(x, grid[i].expand(batch))
            estimates.append(x + (1 - grid[i]) * v)
            x = x + (grid[i + 1] - grid[i]) * v
        return torch.stack(estimates).mean(0)

    return integrate


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = BV.build_parser()
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                   help=f"any of {list(VARIANTS)}")
    args = p.parse_args(argv)
    bench = prepare(args)
    import medflowseg_nn.inference.sampler as sampler
    name, plans, dataset_json, test = bench.name, bench.plans, bench.dataset_json, bench.test
    plain_integrate, rows, per_run = sampler.integrate, [], {}
    trainers = {seed: train_or_load("ours", 0, seed, args, plans, dataset_json)[0] for seed in args.seeds}
    first = trainers[args.seeds[0]]  # the seeds share the plans: each test case is preprocessed once
    cases = {case: read_case(bench, first, case)[:4] for case in test}
    for seed, trainer in trainers.items():
        for vname in args.variants:
            variant = VARIANTS[vname]
            sampler.integrate = make_integrate(variant, plain_integrate)
            try:
                predictor = BV.make_predictor(trainer, "ours", args, "euler", variant.steps, 1)
                scores = RunScores(trainer.label_manager.foreground_labels, args.roi_dilation)
                t0 = time.perf_counter()
                for case, (data, props, ref, spacing) in cases.items():
                    probs, sec = BV.probabilities(predictor, data, props, args.threads)
                    scores.add(case, probs, ref, spacing, sec, None)
            finally:
                sampler.integrate = plain_integrate
            s = scores.summary()
            per_run[f"{vname} s{seed}"] = s
            rho = s["spearman_roi"]["rho"]  # None with fewer than 3 cases (undefined)
            rows.append({"seed": seed, "variant": vname, "Dice": round(s["dice_fg"], 4),
                         "ROI ECE": round(s["roi"]["ece"], 4), "ROI NLL": round(s["roi"]["nll"], 4),
                         "ROI AURC": round(s["roi"]["aurc"], 4), "rho roi": None if rho is None else round(rho, 2),
                         "s/case": round(s["s_per_case"], 3)})
            logger.info("seed %d %s: Dice %.4f (%.0f s)", seed, vname, s["dice_fg"], time.perf_counter() - t0)
    table = C.markdown_table(rows, list(rows[0]))
    print(f"\n{name} {args.configuration}, {len(test)} held-out test cases, {args.ours_trainer} "
          f"({args.budget_tag}), TTA off\n{table}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    C.write_json(args.out_dir / f"bench_own_path_{args.budget_tag}.json",
                 {"benchmark": "own_path", "machine": C.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                  "test_cases": test, "rows": rows, "results": per_run, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""K samples of one tile: the cost curve K = 1, 2, 4, 8 of the product's sampler (issue #14), one Euler step or
``--steps N``.

Times :class:`medflowseg_nn.inference.sampler.FlowSegmenter` with ``num_samples = K`` on one sliding-window tile
(batch 1) of a plan's patch, freshly initialised weights (time does not depend on their values), under
``torch.inference_mode``: the K seeded priors as one network batch (``samples_per_call=K``, what ``mfs_predict
--num_samples K`` does per tile on a GPU), the image-only work (conditioning encoder, image part of the first
convolution) once for all K (``shares_image_across_samples``), the priors' part of the first convolution cached
per shape. Beside it: the same K samples with the image repeated K times through the field (what the sampler did
before the sharing); the sampler's CPU default, one sample per network call (``samples_per_call=1``, measured: K
calls that each redo the image-only work); and ``K x`` one sample (K times the K = 1 median). Medians over
``--iterations`` after ``--warmup``, per torch thread count; plans from ``benchmarks/gpu_plans.json`` (no nnU-Net
needed) or ``--tiny``. The fields have the default time-scaled input, so their t = 0 evaluation, where every
solver starts, is computed once for all K (one step: K samples are one evaluation; ``--steps N``: ``1 + K·(N − 1)``
evaluations); the repeated-image reference is one step's and is left out for ``--steps`` > 1.

    python benchmarks/bench_samples.py --plans_filter Hippocampus --threads 1 2
    python benchmarks/bench_samples.py --plans_filter Hippocampus --threads 1 --steps 2
    python benchmarks/bench_samples.py --tiny --ks 1 2 --warmup 0 --iterations 1       # what the test runs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import gpu_check  # noqa: E402

logger = logging.getLogger("benchmarks.samples")
COLUMNS = ("plan", "threads", "steps", "K", "shared ms", "shared per sample ms", "shared / (K x one)",
           "repeated-image ms", "repeated / (K x one)", "one per call ms", "one per call / (K x one)", "K x one ms")


def curve(name: str, plan: dict, ks: Sequence[int], threads: int, args: argparse.Namespace) -> list[dict]:
    """Rows of one plan at one thread count: per K the shared-image batch, the repeated-image batch, one sample per
    call, and K x one."""
    from medflowseg_nn.flow.solver import SolverConfig
    from medflowseg_nn.inference.sampler import FlowSegmenter
    torch.set_num_threads(threads)
    solver = SolverConfig(args.steps, "euler")
    device = torch.device(args.device)
    field = gpu_check.build(plan, {}).to(device).eval()
    classes, patch = plan["num_classes"], plan["patch_size"]
    image = torch.randn(1, plan["num_input_channels"], *patch, generator=torch.Generator().manual_seed(0)).to(device)
    one_ms = None
    rows = []
    for k in ks:
        segmenter = FlowSegmenter(field, classes, "x1", solver, num_samples=k, samples_per_call=k)
        one_per_call = FlowSegmenter(field, classes, "x1", solver, num_samples=k, samples_per_call=1)

        def shared() -> None:
            with torch.inference_mode():
                segmenter(image)

        def chunked() -> None:
            with torch.inference_mode():
                one_per_call(image)

        def repeated() -> None:
            with torch.inference_mode():
                x0 = segmenter.prior(1, tuple(patch), device, image.dtype)
                field(image.repeat(k, *([1] * (image.ndim - 1))), x0, torch.zeros(k, device=device))

        shared_ms = gpu_check.timed(shared, device, args.warmup, args.iterations)
        one_ms = shared_ms if k == 1 else one_ms
        repeated_ms = gpu_check.timed(repeated, device, args.warmup, args.iterations) if args.steps == 1 else None
        chunked_ms = gpu_check.timed(chunked, device, args.warmup, args.iterations)
        row = {"plan": name, "threads": threads, "steps": args.steps, "K": k, "shared ms": round(shared_ms, 1),
               "shared per sample ms": round(shared_ms / k, 1), "one per call ms": round(chunked_ms, 1)}
        if one_ms is not None:
            row |= {"K x one ms": round(k * one_ms, 1), "shared / (K x one)": round(shared_ms / (k * one_ms), 3),
                    "one per call / (K x one)": round(chunked_ms / (k * one_ms), 3)}
        if repeated_ms is not None:
            row["repeated-image ms"] = round(repeated_ms, 1)
            if one_ms is not None:
                row["repeated / (K x one)"] = round(repeated_ms / (k * one_ms), 3)
        rows.append(row)
        logger.info("%s, %d thread(s), K=%d: %s", name, threads, k, row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plans", type=Path, default=gpu_check.PLANS_FILE)
    p.add_argument("--plans_filter", nargs="+", default=None, help="only plans whose name contains one of these")
    p.add_argument("--tiny", action="store_true", help="gpu_check's tiny built-in plans (CPU test)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="sample counts; the first must be 1")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="Euler steps per sample")
    C.add_output_args(p, "bench_samples.json", work=False, verbose=False)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging()
    if args.ks[0] != 1:
        raise SystemExit("--ks must start with 1 (the ratios are to one sample)")
    plans = gpu_check.tiny_plans() if args.tiny else json.loads(args.plans.read_text())
    if args.plans_filter:
        plans = {n: p for n, p in plans.items() if any(f in n for f in args.plans_filter)}
    if not plans:
        raise SystemExit("no plan left after --plans_filter")
    t0 = time.perf_counter()
    rows = [row for name, plan in plans.items() for threads in args.threads
            for row in curve(name, plan, args.ks, threads, args)]
    table = C.markdown_table(rows, COLUMNS)
    print(f"\n{args.device}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n\n{table}")
    C.write_json(args.out, {"benchmark": "samples", "machine": C.machine_info(),
                            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

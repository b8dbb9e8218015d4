"""Network forward + backward over a training batch in k micro-batches (gradients accumulated), k = 1, 2, 3, …:
VectorFieldUNet vs nnU-Net's PlainConvUNet on the same plans — the measurement behind the CPU micro-batches of
``MedFlowSegTrainer.train_step`` (``medflowseg_nn.trainers.micro_batches``).

Both networks are built by their trainers from the MedFlowSegPlans (``common.trainer_for``), fed random inputs of
the planned batch and patch (ours: image, x_t, half the rows at t = 0), and timed over ``--reps`` rounds after one
warm-up round; in each round every (network, k) runs once, in the same order. The loss is the mean square of every
output (deep-supervision heads included), weighted by the chunk's share of the rows; no optimiser step. Data
loading, augmentation and ours's own-estimate pass are not included (``bench_training.py`` times whole steps).

    python benchmarks/bench_micro_batches.py -c 2d --chunks 1 2 3 4 6 --reps 3 --tune_malloc
    python benchmarks/bench_micro_batches.py -c 3d_fullres --chunks 1 2 4 7 --reps 3 --tune_malloc
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.micro_batches")
METHODS = ("ours", "nnunet")


def fwd_bwd(network, method: str, inputs: tuple, chunks: int) -> float:
    """Seconds of one forward + backward of the whole batch in ``chunks`` micro-batches, through the trainer's
    :func:`~medflowseg_nn.trainers.micro_batches.accumulate_gradients`."""
    from medflowseg_nn.trainers.micro_batches import accumulate_gradients
    image, x_t, t = inputs
    batch = image.shape[0]

    def loss_of(rows: slice):
        out = network(image[rows], x_t[rows], t[rows]) if method == "ours" else network(image[rows])
        return sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
    network.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    accumulate_gradients(batch, -(-batch // chunks), loss_of)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    import torch
    if args.tune_malloc:
        from medflowseg_nn.cpu_allocator import tune_cpu_allocator
        logger.info("glibc malloc thresholds raised: %s", tune_cpu_allocator())
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    name = C.resolve_dataset_name(args.d)
    plans, dataset_json = C.load_plans(name)
    networks = {}
    for m in METHODS:
        trainer = C.trainer_for(m, plans, dataset_json, args.configuration, 0, torch.device("cpu"))
        trainer.initialize()
        networks[m] = trainer.network
    batch, patch = trainer.batch_size, trainer.configuration_manager.patch_size
    classes = trainer.label_manager.num_segmentation_heads
    torch.manual_seed(0)
    inputs = (torch.randn(batch, 1, *patch), torch.randn(batch, classes, *patch),
              torch.cat([torch.zeros(batch // 2), torch.rand(batch - batch // 2)]))
    times: dict[str, list[float]] = {f"{m}_{k}": [] for m in METHODS for k in args.chunks}
    for r in range(args.reps + 1):
        for m in METHODS:
            for k in args.chunks:
                s = fwd_bwd(networks[m], m, inputs, k)
                logger.info("%s %d chunk(s)%s: %.2f s", m, k, " (warm-up)" if r == 0 else "", s)
                if r:
                    times[f"{m}_{k}"].append(s)
    rows = [{"chunks": k, "rows_per_chunk": -(-batch // k),
             **{f"{m}_s": statistics.median(times[f"{m}_{k}"]) for m in METHODS}} for k in args.chunks]
    for row in rows:
        row["ours_vs_nnunet_1_chunk"] = row["ours_s"] / rows[0]["nnunet_s"]
    return {"batch": batch, "patch": patch, "times": times, "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4", help="dataset id or name (default 4 = Dataset004_Hippocampus)")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--reps", type=int, default=3, help="timed rounds after one warm-up round (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0 = all cores)")
    p.add_argument("--tune_malloc", action="store_true", help="raise glibc's malloc thresholds first, as the "
                   "mfs_* commands do (medflowseg_nn.cpu_allocator)")
    C.add_output_args(p, "bench_micro_batches.json")
    args = p.parse_args(argv)
    C.setup_logging(args.verbose)
    C.setup_env(args.work)
    name = C.resolve_dataset_name(args.d)
    C.ensure_planned(name, [args.configuration], preprocess=False)
    res = run(args)
    print(f"{name} {args.configuration}, batch {res['batch']}, patch {res['patch']}, median of {args.reps}")
    print(C.markdown_table(res["rows"], ["chunks", "rows_per_chunk", "ours_s", "nnunet_s", "ours_vs_nnunet_1_chunk"]))
    C.write_json(args.out, {"machine": C.machine_info(), "args": {k: str(v) for k, v in vars(args).items()}, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())

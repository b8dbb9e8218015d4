"""Seconds per training step on the CPU: 1 process vs ``--world`` gloo ranks on the same global batch.

Each step is what ``MedFlowSegTrainer.train_step`` does on the network level: forward of the vector field on
image ⊕ x_t, the flow loss (global batch Dice under DDP), backward (DDP's gradient all-reduce), SGD step. The
network is built from a Hippocampus-like 3d_fullres architecture (``--features``, patch ``--patch``). On a
machine with fewer cores than ranks × threads this measures the overhead of DDP, not a speed-up: say so when
reporting.

    python benchmarks/bench_ddp.py --world 2 --global_batch 4 --steps 12
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402


def build(args: argparse.Namespace):
    import torch
    from torch import nn
    from medflowseg_nn.networks.vector_field_unet import VectorFieldUNet
    torch.manual_seed(0)
    n = len(args.features)
    return VectorFieldUNet(1, 3, n_stages=n, features_per_stage=args.features, conv_op=nn.Conv3d,
                           kernel_sizes=[[3] * 3] * n, strides=[[1] * 3] + [[2] * 3] * (n - 1),
                           n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
                           norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                           nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def run_steps(net, rank: int, world: int, args: argparse.Namespace, ddp: bool) -> list[float]:
    import torch
    from medflowseg_nn.flow.label_space import segmentation_to_target
    from medflowseg_nn.flow.loss import FlowMatchingLoss
    from medflowseg_nn.flow.path import LinearPath
    b = args.global_batch // world
    g = torch.Generator().manual_seed(rank)
    image = torch.randn(b, 1, *args.patch, generator=g)
    seg = torch.randint(0, 3, (b, 1, *args.patch), generator=g)
    loss_fn, opt = FlowMatchingLoss("x1", ddp=ddp), torch.optim.SGD(net.parameters(), lr=1e-3)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        t = torch.zeros(b)
        path = LinearPath().sample(torch.randn(b, 3, *args.patch, generator=g), segmentation_to_target(seg, 3), t)
        opt.zero_grad(set_to_none=True)
        loss_fn(net(image, path.x_t, t), path, seg)["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel
    from medflowseg_nn.distributed import process_group, torchrun_environment
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    with process_group(torchrun_environment(), torch.device("cpu")):
        times = run_steps(DistributedDataParallel(build(args)), rank, world, args, ddp=True)
        if rank == 0:
            Path(out).write_text(",".join(map(str, times)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--global_batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--patch", type=int, nargs=3, default=[40, 56, 40])
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--out", type=Path, default=C.REPO_ROOT / "benchmarks" / "out" / "ddp.json")
    args = p.parse_args(argv)
    import torch
    import torch.multiprocessing as mp
    torch.set_num_threads(args.threads)
    single = run_steps(build(args), 0, 1, args, ddp=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times")
        mp.spawn(rank_main, args=(args.world, port, args, out), nprocs=args.world, join=True)
        ddp = [float(v) for v in Path(out).read_text().split(",")]
    rows = [{"setup": "1 process", "global batch": args.global_batch, "median s/step": statistics.median(single)},
            {"setup": f"{args.world} gloo ranks x {args.global_batch // args.world}",
             "global batch": args.global_batch, "median s/step": statistics.median(ddp)}]
    rows[1]["ratio"] = rows[1]["median s/step"] / rows[0]["median s/step"]
    print(C.markdown_table(rows, ["setup", "global batch", "median s/step", "ratio"]))
    C.write_json(args.out, {"machine": C.machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
                            "single": single, "ddp": ddp, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which CPU path a batch-1 3D convolution takes, and what routing ours to oneDNN buys (issue #14).

PyTorch's CPU convolution sends a batch-1 convolution with a kernel of at most 3 per axis to its im2col path
(``slow_conv3d``) when N·C·D·H ≤ 20480; ``medflowseg_nn.networks.layers.InferenceConv3d`` calls oneDNN directly
for such inference inputs. Two tables, 1 torch thread by default, times in ms (medians):

* conv shapes of a Hippocampus 3d_fullres tile: ``F.conv3d`` (PyTorch's choice) vs
  ``torch.ops.aten.mkldnn_convolution``, and their largest output difference;
* network level, one forward of a tile: nnU-Net's PlainConvUNet ("plain"), our field with every conv on
  ``nn.Conv3d``'s own path ("ours before", the code before the routing), and ours as built today ("ours"), at
  t = 0 prior-free as the sampler calls it, rounds alternating.

``--clock process`` times CPU seconds of this process (use it when other work loads the machine).

    python benchmarks/bench_conv_paths.py --work /work/bench_work
    python benchmarks/bench_conv_paths.py -d 140 --iters 2 --rounds 2 --skip_shapes --work /work/bench_work
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from gpu_check import timed  # noqa: E402

#: (input channels, output channels, spatial shape, kernel) of the convolutions in a Hippocampus tile
SHAPES = [(1, 8, (40, 56, 40), 3), (1, 32, (40, 56, 40), 3), (8, 8, (40, 56, 40), 3), (32, 32, (40, 56, 40), 3),
          (64, 64, (20, 28, 20), 3), (128, 128, (10, 14, 10), 3), (256, 256, (5, 7, 5), 3),
          (128, 128, (10, 14, 10), 1), (32, 32, (40, 56, 40), 1)]


def median_ms(f: Callable[[], object], iters: int, clock: Callable[[], float], warmup: int = 3) -> float:
    """Median ms of ``iters`` CPU calls after ``warmup`` (oneDNN's first calls for a new shape build its primitive)."""
    import torch
    return timed(f, torch.device("cpu"), warmup, iters, clock)


def shape_rows(iters: int, clock) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from medflowseg_nn.networks.layers import prefers_onednn
    rows = []
    with torch.inference_mode():
        for cin, cout, size, k in SHAPES:
            x, w, b = torch.randn(1, cin, *size), torch.randn(cout, cin, k, k, k) * 0.05, torch.randn(cout)
            pad = [k // 2] * 3
            ref = F.conv3d(x, w, b, 1, pad)
            onednn = torch.ops.aten.mkldnn_convolution(x, w, b, pad, [1] * 3, [1] * 3, 1)
            a = median_ms(lambda: F.conv3d(x, w, b, 1, pad), iters, clock)
            o = median_ms(lambda: torch.ops.aten.mkldnn_convolution(x, w, b, pad, [1] * 3, [1] * 3, 1), iters, clock)
            im2col = (k > 1 and cin * size[0] * size[1] <= 20480) or (k == 1 and torch.get_num_threads() == 1)
            rows.append({"conv": f"{cin} -> {cout}, {'x'.join(map(str, size))}, k{k}",
                         "PyTorch picks": "im2col" if im2col else "oneDNN",
                         "ours": "oneDNN" if prefers_onednn(x, w, 1) else "PyTorch's",
                         "F.conv3d ms": round(a, 2), "oneDNN ms": round(o, 2), "ratio": round(o / a, 2),
                         "max diff": f"{(ref - onednn).abs().max().item():.1e}"})
    return rows


def network_rows(name: str, iters: int, rounds: int, clock) -> tuple[list[dict], list[int], float]:
    import torch
    from torch import nn
    from medflowseg_nn.networks import layers
    from profile_network import build_networks
    nets, patch, n_in, _ = build_networks(name, "3d_fullres", ["plain", "ours"])
    routed = layers.InferenceConv3d._conv_forward
    x, t0 = torch.randn(1, n_in, *patch), torch.zeros(1)
    times: dict[str, list[float]] = {"plain": [], "ours before": [], "ours": []}
    outs = {}
    try:
        for _ in range(rounds):
            for key in times:
                layers.InferenceConv3d._conv_forward = nn.Conv3d._conv_forward if key == "ours before" else routed
                net = nets["plain" if key == "plain" else "ours"].eval()
                with torch.inference_mode():
                    f = (lambda: net(x)) if key == "plain" else (lambda: net(x, None, t0))
                    times[key].append(median_ms(f, iters, clock))
                    outs[key] = f()
    finally:
        layers.InferenceConv3d._conv_forward = routed
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"network": k, "ms per round": " ".join(f"{v:.0f}" for v in times[k]), "median ms": round(med[k]),
             "/ plain": round(med[k] / med["plain"], 3)} for k in times]
    rows.append({"network": "ours / ours before", "median ms": "", "ms per round": "",
                 "/ plain": round(med["ours"] / med["ours before"], 3)})
    diff = (outs["ours"] - outs["ours before"]).abs().max().item()
    return rows, patch, diff


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", default="4")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("wall", "process"), default="wall")
    p.add_argument("--skip_shapes", action="store_true")
    C.add_output_args(p, "bench_conv_paths.json", verbose=False)
    args = p.parse_args(argv)
    C.setup_logging()
    C.setup_env(args.work)
    import torch
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    name = C.resolve_dataset_name(args.d)
    C.ensure_planned(name, ["3d_fullres"], preprocess=False)
    shapes = [] if args.skip_shapes else shape_rows(args.iters, clock)
    net_rows, patch, diff = network_rows(name, args.iters, args.rounds, clock)
    head = f"{name} 3d_fullres tile {patch}, batch 1, {args.threads} thread(s), {args.clock} clock"
    if shapes:
        print(f"\n{head}: convolutions\n{C.markdown_table(shapes, list(shapes[0]))}")
    print(f"\n{head}: one forward (t = 0, prior-free), largest |ours - ours before| {diff:.1e}\n"
          f"{C.markdown_table(net_rows, list(net_rows[0]))}")
    C.write_json(args.out, {"benchmark": "conv_paths", "machine": C.machine_info(), "args": {k: str(v) for k, v in
                            vars(args).items()}, "shapes": shapes, "network": net_rows, "max_diff": diff})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Network-level GPU check (issue #14): PlainConvUNet vs VectorFieldUNet (default, noDBSA, noFAA) at real plans.

Runs with only torch, numpy, dynamic-network-architectures and this repository (no nnunetv2, SimpleITK,
batchgenerators): the plans it needs travel in ``benchmarks/gpu_plans.json``, written here beforehand with
``--export_plans`` (which does need nnU-Net: it plans Hippocampus and LeftAtrium with MedFlowSegPlanner).

Per plan (3d_fullres patch and batch of Hippocampus and LeftAtrium) and network:
* training step at the plans' batch: forward + backward + SGD (nnU-Net's momentum 0.99, Nesterov), bf16 autocast on
  CUDA (FAA's FFTs run in float32 inside the module), loss = soft Dice + CE for plain, the flow loss for ours
  (x_t from random noise, half the batch at t = 0); deep supervision off for both (network level);
* one-step inference at batch 1 (a sliding-window tile) under ``torch.inference_mode``;
* K = 1 / 4 / 8 one-step samples of one tile: K forwards at batch 1 vs one forward at batch K;
* peak ``torch.cuda.max_memory_allocated`` of the training step vs the planner's estimate (activation elements
  from ``compute_conv_feature_map_size``, times the batch; ours also counts the input tensor as
  MedFlowSegPlanner does), and that ratio relative to PlainConvUNet's — the network nnU-Net's reference values
  were calibrated on (≤ 1: the estimate is at least as safe as nnU-Net's).
Medians over ``--iterations`` after ``--warmup``. Prints a table and writes JSON.

    python benchmarks/gpu_check.py --export_plans              # here (nnU-Net installed), once
    python benchmarks/gpu_check.py                             # on the GPU machine, < 8 min on one H200
    python benchmarks/gpu_check.py --device cpu --tiny         # what the test runs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import pydoc
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_check")
PLANS_FILE = Path(__file__).resolve().parent / "gpu_plans.json"
NETWORKS = {"plain": None, "ours": {}, "ours noDBSA": {"use_dbsa": False}, "ours noFAA": {"use_faa": False}}
COLUMNS = ("plan", "network", "patch", "batch", "params (M)", "train step ms", "train vs plain", "infer ms",
           "infer vs plain", "K=4 batched/loop", "K=8 batched/loop", "peak MB", "estimate (M el)", "MB per M el",
           "vs plain")


def export_plans(datasets: Sequence[str], configuration: str, work: Path) -> dict:
    """The plans' patch, batch and architecture keywords per dataset (needs nnU-Net; run where it is)."""
    C.setup_env(work)
    out = {}
    for d in datasets:
        name = C.resolve_dataset_name(d)
        C.ensure_planned(name, [configuration], preprocess=False)
        plans, dataset_json = C.load_plans(name)
        cfg = plans["configurations"][configuration]
        labels = [v for v in dataset_json["labels"].values() if isinstance(v, int)]
        out[f"{name}/{configuration}"] = {
            "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
            "arch_kwargs": cfg["architecture"]["arch_kwargs"],
            "arch_kwargs_requires_import": cfg["architecture"]["_kw_requires_import"],
            "num_input_channels": len(dataset_json["channel_names"]), "num_classes": max(labels) + 1}
    return out


def tiny_plans() -> dict:
    """Two small 3D plans for the CPU test (same keys as the exported ones)."""
    def plan(patch, batch):
        return {"patch_size": patch, "batch_size": batch, "num_input_channels": 1, "num_classes": 3,
                "arch_kwargs_requires_import": ["conv_op", "norm_op", "nonlin"],
                "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                                "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                "nonlin_kwargs": {"inplace": True}}}
    return {"tiny_a/3d": plan([16, 16, 16], 2), "tiny_b/3d": plan([16, 24, 16], 1)}


def build(plan: dict, network: Optional[dict]) -> torch.nn.Module:
    """PlainConvUNet as nnUNetTrainer builds it (deep supervision off) or our vector field with ``network``
    options over the default flow configuration (what MedFlowSegTrainer builds on fresh plans)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from medflowseg_nn.config import FlowMatchingConfig
    from medflowseg_nn.model import build_vector_field
    kwargs = dict(plan["arch_kwargs"])
    for key in plan["arch_kwargs_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    torch.manual_seed(0)
    if network is None:
        return PlainConvUNet(input_channels=plan["num_input_channels"], num_classes=plan["num_classes"], **kwargs,
                             deep_supervision=False)
    config = FlowMatchingConfig().with_network(deep_supervision=False, **network)
    config = config.replace(network=config.network.resolved(kwargs["n_stages"]))

    class Manager:  # the two attributes model.build_vector_field reads from nnU-Net's ConfigurationManager
        network_arch_init_kwargs = dict(plan["arch_kwargs"])
        network_arch_init_kwargs_req_import = plan["arch_kwargs_requires_import"]

    return build_vector_field(Manager, plan["num_input_channels"], plan["num_classes"], config)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, iterations: int,
          clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of ``fn`` (CUDA synchronised) after ``warmup`` calls; ``clock``: wall time by default,
    ``time.process_time`` for this process's CPU time on a loaded machine."""
    times = []
    for i in range(warmup + iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, plan: dict, network: Optional[dict], args: argparse.Namespace) -> dict:
    from medflowseg_nn.flow.label_space import segmentation_to_target
    from medflowseg_nn.flow.loss import FlowMatchingLoss, soft_dice_loss
    from medflowseg_nn.flow.path import LinearPath
    device = torch.device(args.device)
    net = build(plan, network).to(device)
    ours = network is not None
    b, c_in, k = plan["batch_size"], plan["num_input_channels"], plan["num_classes"]
    patch = plan["patch_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(b, c_in, *patch, generator=g).to(device)
    seg = torch.randint(0, k, (b, 1, *patch), generator=g).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    flow_loss = FlowMatchingLoss("x1")
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or args.cpu_bf16)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**amp):
            if ours:
                x1 = segmentation_to_target(seg, k)
                t = torch.rand(b, device=device) * (torch.arange(b, device=device) % 2)
                path = LinearPath().sample(torch.randn_like(x1), x1, t)
                loss = flow_loss(net(image, path.x_t, t), path, seg)["loss"]
            else:
                out = net(image)
                loss = soft_dice_loss(out, seg[:, 0].long()) + torch.nn.functional.cross_entropy(
                    out.float(), seg[:, 0].long())
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    net.train()
    train_ms = timed(train_step, device, args.warmup, args.iterations)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    estimate = float(net.compute_conv_feature_map_size(patch)) + (
        float(torch.tensor(patch).prod()) * (c_in + k) if ours else 0.0)
    net.eval()
    tile = image[:1]

    def forward(batch: int) -> Callable[[], None]:
        x = tile.expand(batch, *tile.shape[1:]).contiguous()
        x_t = torch.randn(batch, k, *patch, device=device)
        t = torch.zeros(batch, device=device)

        def run() -> None:
            with torch.inference_mode(), torch.autocast(**amp):
                net(x, x_t, t) if ours else net(x)
        return run

    infer_ms = timed(forward(1), device, args.warmup, args.iterations)
    row = {"plan": name, "network": "plain" if not ours else next(n for n, o in NETWORKS.items() if o == network),
           "patch": "x".join(map(str, patch)), "batch": b,
           "params (M)": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
           "train step ms": round(train_ms, 2), "infer ms": round(infer_ms, 2),
           "peak MB": None if peak_mb is None else round(peak_mb, 1), "estimate (M el)": round(estimate * b / 1e6, 2),
           "MB per M el": None if peak_mb is None else round(peak_mb / (estimate * b / 1e6), 3)}
    if ours:
        for kk in args.ks:
            batched = timed(forward(kk), device, args.warmup, args.iterations)
            row[f"K={kk} batched ms"] = round(batched, 2)
            row[f"K={kk} loop ms"] = round(kk * infer_ms, 2)
            row[f"K={kk} batched/loop"] = round(batched / (kk * infer_ms), 3)
    return row  # net, optimizer and the closures over them are freed here


def add_ratios(rows: list[dict]) -> None:
    plain = {r["plan"]: r for r in rows if r["network"] == "plain"}
    for r in rows:
        p = plain[r["plan"]]
        r["train vs plain"] = round(r["train step ms"] / p["train step ms"], 3)
        r["infer vs plain"] = round(r["infer ms"] / p["infer ms"], 3)
        if r["MB per M el"] is not None:
            r["vs plain"] = round(r["MB per M el"] / p["MB per M el"], 3)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plans", type=Path, default=PLANS_FILE)
    p.add_argument("--tiny", action="store_true", help="two tiny built-in plans instead of --plans (CPU test)")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--cpu_bf16", action="store_true", help="bf16 autocast on the CPU as well")
    p.add_argument("--export_plans", action="store_true", help="write --plans from MedFlowSegPlanner (needs nnU-Net)")
    p.add_argument("--datasets", nargs="+", default=["4", "140"])
    p.add_argument("--work", type=Path, default=C.DEFAULT_WORK)
    p.add_argument("--out", type=Path, default=C.REPO_ROOT / "benchmarks" / "out" / "gpu_check.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    C.setup_logging()
    if args.export_plans:
        args.plans.write_text(json.dumps(export_plans(args.datasets, "3d_fullres", args.work), indent=1) + "\n")
        logger.info("wrote %s", args.plans)
        return 0
    plans = tiny_plans() if args.tiny else json.loads(args.plans.read_text())
    t0 = time.perf_counter()
    rows = []
    for name, plan in plans.items():
        for net_name in args.networks if "plain" in args.networks else ["plain", *args.networks]:
            rows.append(measure(name, plan, NETWORKS[net_name], args))
            logger.info("%s %s: %s", name, net_name, rows[-1])
    add_ratios(rows)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    table = C.markdown_table(rows, COLUMNS)
    print(f"\n{device_name}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s\n\n{table}")
    C.write_json(args.out, {"benchmark": "gpu_check", "device": device_name, "torch": torch.__version__,
                            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
